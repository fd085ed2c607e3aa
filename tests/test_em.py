"""The EM loop and baselines end to end on a tiny random model: stages, budgets, resume after a kill."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autocode4math.config import load_config
from autocode4math.em import TrainConfig, collect_sft, train
from autocode4math.io import read_jsonl

FAST = [
    "queries=toy",
    "queries_limit=2",
    "estep.k=2",
    "estep.per_query=2",
    "estep.batch_size=8",
    "estep.rollout.max_new_tokens=12",
    "rl_samples=2",
    "mstep.max_steps=2",
    "mstep.micro_batch_size=2",
    "mstep.save_every=1",
    "eval.source=toy:dev",
    "eval.limit=2",
    "eval.max_new_tokens=12",
]


def _config(model: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [*FAST, f"model={model}", f"out={out}", *extra])


@pytest.mark.slow
def test_em_loop_runs_every_stage_and_a_rerun_redoes_nothing(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path / "run", "iterations=2")
    rows = train(cfg, progress=False)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[0]["tokens"] == 0 < rows[1]["tokens"] < rows[2]["tokens"]
    for row in rows:
        assert {"auto_accuracy", "cot_accuracy", "code_accuracy", "union", "selection_accuracy"} <= set(row)
    audit = list(read_jsonl(tmp_path / "run" / "iter-01" / "collect" / "audit.jsonl"))
    assert {a["id"] for a in audit} and all(abs(sum(a["s_star"].values()) - 1) < 1e-9 for a in audit)
    assert (tmp_path / "run" / "iter-02" / "mstep" / "model" / "config.json").exists()
    rollouts = tmp_path / "run" / "iter-01" / "collect" / "rollouts.jsonl"
    before = rollouts.stat().st_mtime_ns
    again = train(cfg, progress=False)
    assert again == rows
    assert rollouts.stat().st_mtime_ns == before


@pytest.mark.slow
def test_rl_and_sft_baselines_count_their_budgets(tiny_model_dir, tmp_path):
    rl = train(_config(tiny_model_dir, tmp_path / "rl", "method=rl", "iterations=1", "eval.every=0"), progress=False)
    assert rl == []
    summary = json.loads((tmp_path / "rl" / "final.json").read_text())
    assert summary["tokens"] > 0
    train_rows = list(read_jsonl(tmp_path / "rl" / "iter-01" / "collect" / "train.jsonl"))
    assert len(train_rows) == 2 * 2  # queries_limit x rl_samples, all kept: on-policy, no subsampling
    assert {r["mode"] for r in train_rows} == {"auto"}

    sft_cfg = _config(tiny_model_dir, tmp_path / "sft", "method=sft", "sft_per_iteration=3")
    first = collect_sft(sft_cfg, str(tiny_model_dir), tmp_path / "s1", 1)
    second = collect_sft(sft_cfg, str(tiny_model_dir), tmp_path / "s2", 2)
    assert first["tokens"] == 0 and first["train_tokens"] > 0
    keys = [r["key"] for r in read_jsonl(first["data"])] + [r["key"] for r in read_jsonl(second["data"])]
    assert keys == [f"sft/{i}" for i in range(6)]  # consecutive slices of one fixed dataset
    for r in read_jsonl(first["data"]):
        assert len(r["response_mask"]) == len(r["response_ids"])
        assert (0 in r["response_mask"]) == r["used_code"]  # tool output inside code demos is masked


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "autocode4math.cli", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _stages(run: Path) -> set[str]:
    try:
        return set(json.loads((run / "state.json").read_text()))
    except (OSError, ValueError):  # not there yet, or caught mid-replace
        return set()


def _kill_points(run: Path) -> list[tuple[str, object]]:
    """Moments of a 2-iteration run, in order, spread over every kind of stage."""
    it1, it2 = run / "iter-01", run / "iter-02"
    return [
        ("iteration 0 evaluation", lambda: _lines(run / "iter-00" / "eval" / "samples.jsonl") >= 1),
        ("iteration 1 E-step", lambda: "0/eval" in _stages(run) and (it1 / "collect").exists()),
        ("iteration 1 E-step, rollouts written", lambda: _lines(it1 / "collect" / "rollouts.jsonl") >= 1),
        ("iteration 1 M-step before its first checkpoint", lambda: _lines(it1 / "mstep" / "metrics.jsonl") >= 1),
        ("iteration 1 M-step after a checkpoint", lambda: _lines(it1 / "mstep" / "metrics.jsonl") >= 3),
        ("iteration 1 evaluation", lambda: _lines(it1 / "eval" / "samples.jsonl") >= 2),
        ("iteration 2 E-step", lambda: "1/eval" in _stages(run)),
        ("iteration 2 M-step", lambda: _lines(it2 / "mstep" / "metrics.jsonl") >= 2),
        ("iteration 2 evaluation", lambda: (it2 / "eval" / "samples.jsonl").exists()),
    ]


def _kill_after(proc: subprocess.Popen, ready, delay: float, timeout: float = 300.0) -> bool:
    """SIGKILL the run `delay` seconds after `ready()` holds; False when it finished first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            return False
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _by_key(path: Path) -> dict[str, dict]:
    rows = list(read_jsonl(path))
    keyed = {f"{r['benchmark']}/{r['mode']}/{r['id']}/{r['sample']}": r for r in rows}
    assert len(keyed) == len(rows), f"{path}: a record is duplicated"
    return keyed


def _assert_same_run(run: Path, ref: Path) -> None:
    """Records identical, metrics equal (up to the run directory in model paths), weights within float tolerance."""
    from safetensors.torch import load_file

    for name in ("rollouts.jsonl", "train.jsonl", "audit.jsonl"):
        for it in ("iter-01", "iter-02"):
            a, b = run / it / "collect" / name, ref / it / "collect" / name
            if name == "rollouts.jsonl":
                assert _by_key(a) == _by_key(b), a
            else:
                assert list(read_jsonl(a)) == list(read_jsonl(b)), a
    for it in ("iter-00", "iter-01", "iter-02"):
        assert _by_key(run / it / "eval" / "samples.jsonl") == _by_key(ref / it / "eval" / "samples.jsonl")
    for it in ("iter-01", "iter-02"):
        got, want = (
            list(read_jsonl(run / it / "mstep" / "metrics.jsonl")),
            list(read_jsonl(ref / it / "mstep" / "metrics.jsonl")),
        )
        assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=1e-5)
    rows = (run / "metrics.jsonl").read_text().replace(str(run), "RUN")
    assert rows == (ref / "metrics.jsonl").read_text().replace(str(ref), "RUN")
    a, b = (
        load_file(run / "iter-02/mstep/model/model.safetensors"),
        load_file(ref / "iter-02/mstep/model/model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


KILL_RUN = ["iterations=2", "estep.k=3", "mstep.max_steps=4", "mstep.save_every=2", "eval.limit=3"]


@pytest.mark.slow
def test_kill_nine_at_random_points_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    ref = tmp_path / "ref"
    train(_config(tiny_model_dir, ref, *KILL_RUN), progress=False)
    run = tmp_path / "run"
    args = [f"--set={s}" for s in [*FAST, *KILL_RUN]] + [f"--model={tiny_model_dir}", f"--out={run}"]
    rng = random.Random(13)
    kills = []
    for name, ready in _kill_points(run):
        if _kill_after(_cli(args), ready, delay=rng.uniform(0.0, 0.4)):
            kills.append(name)
    assert len(kills) >= 8, kills
    final = _cli(args)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]
    _assert_same_run(run, ref)
    for it in ("iter-01", "iter-02"):  # half-written checkpoints of killed attempts are gone
        assert [d.name for d in (run / it / "mstep" / "state").iterdir()] == ["step-00000004"]

    before = (run / "config.yaml").read_text()
    refused = _cli([*args, "--set=mstep.lr=1e-3"])
    assert refused.wait(timeout=120) == 2
    message = refused.stderr.read().decode()
    assert "iter-01/mstep" in message and "mstep.lr: 1e-05 -> 0.001" in message and "--overwrite" in message
    assert "Traceback" not in message
    assert (run / "config.yaml").read_text() == before  # the config file still describes the run on disk


@pytest.mark.slow
def test_overwrite_redoes_only_the_stages_whose_settings_changed(tiny_model_dir, tiny_model_factory, tmp_path):
    from autocode4math.fingerprint import ResumeError

    run = tmp_path / "run"
    train(_config(tiny_model_dir, run, "iterations=1", "eval.every=0"), progress=False)
    rollouts = run / "iter-01" / "collect" / "rollouts.jsonl"
    kept = rollouts.read_bytes()
    changed = _config(tiny_model_dir, run, "iterations=1", "eval.every=0", "mstep.lr=1e-3")
    with pytest.raises(ResumeError, match=r"iter-01/mstep holds M-step results made with other settings: mstep.lr"):
        train(changed, progress=False)
    train(changed, progress=False, overwrite=True)
    assert rollouts.read_bytes() == kept  # the E-step did not depend on mstep.lr: kept
    assert [r["lr"] for r in read_jsonl(run / "iter-01" / "mstep" / "metrics.jsonl")][0] == 1e-3
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"iter-01/collect holds em collection results .*estep.k: 2 -> 3"):
        train(
            _config(tiny_model_dir, run, "iterations=1", "eval.every=0", "mstep.lr=1e-3", "estep.k=3"), progress=False
        )
    same = tmp_path / "same-weights"  # the model is known by content, not by its path
    shutil.copytree(tiny_model_dir, same)
    train(_config(same, run, "iterations=1", "eval.every=0", "mstep.lr=1e-3"), progress=False)
    with pytest.raises(ResumeError, match=r"iter-01/collect .*model: \"sha256:"):
        train(_config(tiny_model_factory(seed=1), run, "iterations=1", "eval.every=0", "mstep.lr=1e-3"), progress=False)


def test_sft_records_train_exactly_the_model_written_tokens():
    """The stop string is the model's (trained); the tool's output, from its newline to the closing fence, is not."""
    import re

    from transformers import AutoTokenizer

    from autocode4math.em import toy_sft_records
    from autocode4math.rollout import SHIPPED_CHECKPOINTS

    policy = str(SHIPPED_CHECKPOINTS / "toy-base")
    tok = AutoTokenizer.from_pretrained(policy)
    rows = toy_sft_records(policy, 24)
    assert any(r["used_code"] for r in rows) and not all(r["used_code"] for r in rows)
    for r in rows:
        masked = tok.decode([t for t, m in zip(r["response_ids"], r["response_mask"], strict=True) if not m])
        tool_outputs = re.findall(r"```output(\n.*?\n```\n)", r["response"], flags=re.DOTALL)
        assert masked == "".join(tool_outputs)
        trained = tok.decode([t for t, m in zip(r["response_ids"], r["response_mask"], strict=True) if m])
        assert trained.count("```output") == r["response"].count("```output") == len(tool_outputs)
        assert r["response_ids"][-1] == tok.eos_token_id and r["response_mask"][-1] == 1
        assert r["c"] == int(r["used_code"] or (r["prefix"] + r["response"]).startswith("Let's first analyze"))
