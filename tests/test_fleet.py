"""The rollout fleet: shards, one engine vs Ray workers, a worker killed mid E-step, weight refresh per iteration."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from autocode4math.benchmarks import load_problems
from autocode4math.config import ConfigError, load_config
from autocode4math.em import TrainConfig, train
from autocode4math.estep import EStepConfig, main_requests, run_estep
from autocode4math.fleet import EngineSpec, Fleet, FleetConfig, LocalEngines, open_engines, shards
from autocode4math.io import read_jsonl
from autocode4math.rollout import RolloutConfig, make_requests

SERVER = f"{sys.executable} {Path(__file__).with_name('weights_server.py')} --model {{model}} --port {{port}}"
GREEDY = RolloutConfig(max_new_tokens=10, temperature=0.0, max_active=8)
FAST = [
    "queries=toy",
    "queries_limit=3",
    "estep.k=2",
    "estep.per_query=2",
    "estep.batch_size=4",
    "estep.rollout.max_new_tokens=10",
    "estep.rollout.temperature=0",
    "mstep.max_steps=2",
    "mstep.micro_batch_size=2",
    "mstep.lr=0.05",
    "eval.every=0",
    "fleet.shard_size=4",
]


def _requests(questions: int = 6, k: int = 2):
    return make_requests(load_problems("toy", split="train", limit=questions), ["auto", "code"], k)


def _run(engines, policy: str, requests, config: RolloutConfig) -> dict[tuple, dict]:
    got: list[dict] = []
    engines.rollouts(policy).run(requests, config, on_record=got.append, progress=False)
    keys = [(r["benchmark"], r["mode"], str(r["id"]), r["sample"]) for r in got]
    assert len(keys) == len(set(keys)), "a record arrived twice"
    return dict(zip(keys, got, strict=True))


def _fleet(workers: int, **options) -> Fleet:
    return open_engines(FleetConfig(workers=workers, **options), "hf", {"batch_size": 4})


# --- shards and config: no Ray needed ---


@pytest.mark.parametrize(("questions", "k", "size"), [(6, 2, 4), (7, 3, 5), (1, 4, 2), (20, 1, 64)])
def test_shards_keep_questions_together_and_lose_nothing(questions, k, size):
    requests = _requests(questions, k)
    parts = shards(requests, size)
    flat = [r.key() for part in parts for r in part]
    assert sorted(flat) == sorted(r.key() for r in requests)  # every request once
    owner = {}
    for i, part in enumerate(parts):
        position = [requests.index(r) for r in part]
        assert position == sorted(position)  # request order kept inside a shard
        for r in part:
            assert owner.setdefault(str(r.problem.id), i) == i  # a question never spans two shards
        per_question = 2 * k
        assert len(part) <= max(size, per_question)
    assert parts == shards(list(requests), size)  # the split depends only on the requests and the size


def test_fleet_config_checks():
    for bad in ({"workers": 0}, {"shard_size": 0}, {"gpus_per_worker": -2}, {"max_restarts": -1}):
        with pytest.raises(ValueError):
            FleetConfig(**bad)
    for template in ("vllm serve {model}", "serve --port {port}", "serve {model} --port {port} {nope}"):
        with pytest.raises(ValueError, match="placeholders"):
            FleetConfig(server=template)
    assert not FleetConfig().distributed and FleetConfig(workers=2).distributed
    assert FleetConfig(address="auto").distributed


def test_training_refuses_a_server_it_cannot_refresh(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="fleet.server"):
        load_config(TrainConfig, None, [f"model={tiny_model_dir}", "estep.backend=openai"])
    with pytest.raises(ConfigError, match="estep.backend=openai"):
        load_config(TrainConfig, None, [f"model={tiny_model_dir}", f"fleet.server={SERVER}"])


# --- Ray: one shared local cluster (tests/conftest.py) ---


@pytest.mark.slow
def test_one_engine_and_two_workers_give_the_same_records(ray_session, tiny_model_dir):
    requests = _requests(6, 2)
    sampled = RolloutConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, max_active=8, seed=3)
    with LocalEngines(EngineSpec("hf", {"batch_size": 4}), shard_size=4) as one, _fleet(2, shard_size=4) as two:
        for config in (GREEDY, sampled):
            a = _run(one, str(tiny_model_dir), requests, config)
            b = _run(two, str(tiny_model_dir), requests, config)
            assert set(a) == set(b) == {r.key() for r in requests}  # none lost, none twice
            if config is GREEDY:
                for key in a:
                    assert a[key]["response_ids"] == b[key]["response_ids"], key
                    assert a[key]["response"] == b[key]["response"] and a[key]["correct"] == b[key]["correct"]
        assert len(set(two.worker_pids())) == 2


@pytest.mark.slow
def test_eval_on_two_workers_writes_what_one_engine_writes(ray_session, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from autocode4math.cli import app

    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        args = ["eval", "--model", str(tiny_model_dir), "--benchmarks", "toy", "--limit", "3", "--out", str(out),
                "--workers", str(workers), "--set", "max_new_tokens=10", "--set", "fleet.shard_size=3"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        rows = sorted(read_jsonl(out / "samples.jsonl"), key=lambda r: (r["mode"], str(r["id"])))
        outputs[workers] = (
            [(r["mode"], r["id"], r["response_ids"]) for r in rows],
            json.loads((out / "metrics.json").read_text()),
        )
    assert len(outputs[1][0]) == 3 * 3  # questions x modes
    assert outputs[1][0] == outputs[2][0]
    assert outputs[1][1]["benchmarks"] == outputs[2][1]["benchmarks"]


class _KillOnce:
    """Rollouts that SIGKILL one fleet worker process once `after` records have arrived."""

    def __init__(self, rollouts, pid: int, after: int) -> None:
        self.inner, self.pid, self.after, self.seen = rollouts, pid, after, 0
        self.tokenizer = rollouts.tokenizer

    def run(self, requests, config, *, on_record, prompt_config=None, progress=True, stats=None):
        def keep(record):
            on_record(record)
            self.seen += 1
            if self.seen == self.after:
                os.kill(self.pid, signal.SIGKILL)

        self.inner.run(requests, config, on_record=keep, prompt_config=prompt_config, progress=progress, stats=stats)


@pytest.mark.slow
def test_a_worker_killed_mid_estep_loses_and_repeats_nothing(ray_session, tiny_model_dir, tmp_path):
    problems = load_problems("toy", split="train", limit=6)
    config = EStepConfig(k=2, per_query=2, batch_size=4, rollout=RolloutConfig(max_new_tokens=16, max_active=4))
    with _fleet(2, shard_size=4, max_restarts=2) as fleet:
        victim = fleet.worker_pids()[0]
        rollouts = _KillOnce(fleet.rollouts(str(tiny_model_dir)), victim, after=3)
        summary = run_estep(rollouts, problems, config, tmp_path, progress=False)
        assert rollouts.seen > 3 and fleet.deaths[0] >= 1
        assert not fleet.lost and victim not in fleet.worker_pids()  # Ray restarted the worker in a new process
    keys = [(r["mode"], r["id"], r["sample"]) for r in read_jsonl(tmp_path / "rollouts.jsonl")]
    wanted = [(r.mode, r.problem.id, r.sample) for r in main_requests(problems, config)]
    assert Counter(keys) == Counter(wanted)  # every request exactly once in the resumable file
    assert summary["n_rollouts"] == len(wanted) == 6 * 2 * 2
    assert len(list(read_jsonl(tmp_path / "train.jsonl"))) == 6 * 2


@pytest.mark.slow
def test_iteration_two_samples_from_the_mstep_one_model(ray_session, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(
        TrainConfig, None, [*FAST, f"model={tiny_model_dir}", f"out={run}", "iterations=2", "fleet.workers=2"]
    )
    train(cfg, progress=False)
    got = {
        (r["mode"], str(r["id"]), r["sample"]): r for r in read_jsonl(run / "iter-02" / "collect" / "rollouts.jsonl")
    }
    problems = load_problems("toy", split="train", limit=3)
    requests = main_requests(problems, cfg.estep)
    updated = run / "iter-01" / "mstep" / "model"
    with LocalEngines(EngineSpec("hf", {"batch_size": 4}), shard_size=4) as here:
        mstep_one = _run(here, str(updated), requests, cfg.estep.rollout)
        initial = _run(here, str(tiny_model_dir), requests, cfg.estep.rollout)

    def agreeing(reference: dict) -> int:
        return sum(got[key[1:]]["response_ids"] == r["response_ids"] for key, r in reference.items())

    assert agreeing(mstep_one) == len(requests)  # every trajectory is the M-step-1 model's greedy output
    assert agreeing(initial) < len(requests)  # and that model differs from the initial one here


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_server_from_a_template_serves_each_iterations_policy(ray_session, tiny_model_dir, tmp_path, workers):
    sys.path.insert(0, str(Path(__file__).parent))
    from weights_server import weights_digest

    run = tmp_path / "run"
    extra = ["estep.backend=openai", f"fleet.server={SERVER}", f"fleet.workers={workers}", "iterations=2"]
    train(load_config(TrainConfig, None, [*FAST, f"model={tiny_model_dir}", f"out={run}", *extra]), progress=False)
    served = {}
    for it in (1, 2):
        texts = {r["response"] for r in read_jsonl(run / f"iter-{it:02d}" / "collect" / "rollouts.jsonl")}
        assert len(texts) == 1
        served[it] = texts.pop()
    assert weights_digest(str(tiny_model_dir)) in served[1]
    assert weights_digest(str(run / "iter-01" / "mstep" / "model")) in served[2]
    assert served[1] != served[2]


@pytest.mark.slow
def test_a_fleet_whose_engines_cannot_start_stops_with_the_reason(ray_session, tiny_model_dir):
    from autocode4math.fleet import FleetError

    broken = EngineSpec("hf", {"model_kwargs_nobody_knows": 1}, sandbox="not a sandbox config")
    with Fleet(FleetConfig(workers=2, max_restarts=0), broken) as fleet, pytest.raises(FleetError) as failed:
        _run(fleet, str(tiny_model_dir), _requests(2, 1), GREEDY)
    assert "every rollout worker died" in str(failed.value) and fleet.lost == {0, 1}


def test_fleet_without_ray_says_how_to_install_it(monkeypatch):
    from autocode4math import fleet as fleet_module

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(fleet_module.FleetError, match=r"autocode4math\[fleet\]"):
        _fleet(2).worker_pids()


def test_eval_cli_takes_workers(tmp_path):
    from typer.testing import CliRunner

    from autocode4math.cli import app

    result = CliRunner().invoke(
        app, ["eval", "--model", "m", "--benchmarks", "toy", "--workers", "0", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "workers must be >= 1" in result.output
    assert "Traceback" not in result.output


def test_bench_fleet_prints_figures_and_a_json_last_line():
    from typer.testing import CliRunner

    from autocode4math.cli import app

    args = ["bench", "fleet", "--workers", "1", "--queries", "2", "--k", "1", "--max-new-tokens", "8", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert last["workers"] == [1] and last["speedup"] == 1.0 and last["same_records"] is True
    assert last["tokens_per_s"][0] > 0 and last["runs"][0]["trajectories"] == 2 * 2 * 1
    for bad in ("0", "1,x", ""):
        result = CliRunner().invoke(app, ["bench", "fleet", "--workers", bad])
        assert result.exit_code == 2 and "--workers" in result.output
