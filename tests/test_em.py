"""The EM loop and baselines end to end on a tiny random model: stages, budgets, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _keys(path: Path) -> list[str]:
    return [f"{r['mode']}/{r['id']}/{r['sample']}" for r in read_jsonl(path)]


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


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_during_rollouts_and_during_optimizer_steps_resumes(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = [f"--set={s}" for s in FAST] + [
        f"--model={tiny_model_dir}",
        f"--out={run}",
        "--iterations=1",
        "--set=estep.k=4",
        "--set=mstep.max_steps=4",
        "--set=eval.every=0",
    ]
    rollouts = run / "iter-01" / "collect" / "rollouts.jsonl"
    proc = _cli(args)
    _kill_when(proc, lambda: rollouts.exists() and len(rollouts.read_bytes().splitlines()) >= 2)
    lines = rollouts.read_bytes().split(b"\n")[:-1]  # a torn last line (no newline yet) is not finished work
    kept = [f"{r['mode']}/{r['id']}/{r['sample']}" for r in map(json.loads, lines)]

    metrics = run / "iter-01" / "mstep" / "metrics.jsonl"
    proc = _cli(args)
    _kill_when(proc, lambda: metrics.exists() and len(metrics.read_bytes().splitlines()) >= 2)

    proc = _cli(args)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    final = _keys(rollouts)
    assert final[: len(kept)] == kept  # finished rollouts were reused, not regenerated
    assert len(final) == len(set(final)) == 2 * 2 * 4  # queries x decisions x k, each exactly once
    steps = [r["step"] for r in read_jsonl(metrics)]
    assert steps == [1, 2, 3, 4]
    assert (run / "iter-01" / "mstep" / "model" / "config.json").exists()


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
