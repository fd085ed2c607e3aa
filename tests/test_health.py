"""Visible failures: grading and sandbox statuses in records and summaries, and the tool-health alarms.

Three broken tools are played here: a sandbox that fails (a fake pool that raises SandboxError or
answers `sandbox_error`), a grader that raises or times out, and a model that never emits the stop
string (the scripted backend), through the engine, `autocode eval` and `autocode train`.
"""

from __future__ import annotations

import json
import re

import pytest

from autocode4math.benchmarks import Problem
from autocode4math.evaluate import EvalConfig, run_eval
from autocode4math.grading import Grade
from autocode4math.health import HealthConfig, ToolHealthError, alarms, reusable_records, tool_counts
from autocode4math.io import read_jsonl
from autocode4math.prompts import CODE_PREFIX
from autocode4math.rollout import RolloutConfig, RolloutRequest, run_rollouts
from autocode4math.rollout.scripted import AsyncScriptedBackend, ScriptedBackend
from autocode4math.sandbox import ExecResult, SandboxError, SandboxPool


def rec(mode="code", blocks=(), grade="ok", error="", qid="q"):
    return {
        "id": qid,
        "mode": mode,
        "code_blocks": [{"status": s, "error": f"{s} happened"} for s in blocks],
        "grade_status": grade,
        "grade_error": error,
    }


# --- counts and alarms on hand-built records ---


def test_counts_cover_every_status_and_leave_out_unrun_blocks():
    records = [rec(blocks=("ok", "error", "not_run")), rec("auto", ("sandbox_error", "timeout")), rec("cot")]
    records.append({**rec("auto"), "grade_status": "timeout"})
    counts = tool_counts(records)
    assert counts["code_calls"] == {
        "ok": 1,
        "error": 1,
        "timeout": 1,
        "memory": 0,
        "exited": 0,
        "killed": 0,
        "crashed": 0,
        "dead": 0,
        "sandbox_error": 1,
    }
    assert counts["grading"] == {"ok": 3, "timeout": 1, "error": 0}
    assert (counts["code_mode_rollouts"], counts["code_mode_rollouts_with_code"]) == (1, 1)


@pytest.mark.parametrize(
    ("broken", "calls", "fires"),
    [(0, 40, False), (2, 40, False), (3, 40, True), (1, 1, True), (20, 20, True)],  # 2/40 = 5% is not above 5%
)
def test_sandbox_failure_alarm_fires_above_the_threshold(broken, calls, fires):
    records = [rec(blocks=("sandbox_error",)) for _ in range(broken)] + [rec(blocks=("ok",))] * (calls - broken)
    found = alarms(records, HealthConfig())
    assert bool(found) == fires
    if fires:
        assert f"{broken} of {calls} code calls" in found[0] and "sandbox_error happened" in found[0]


@pytest.mark.parametrize(
    ("failed", "total", "threshold", "fires"),
    [(1, 100, 0.01, False), (2, 100, 0.01, True), (1, 10, 0.01, True), (1, 10, 0.1, False), (3, 10, 0.2, True)],
)
def test_grading_failure_alarm_fires_above_the_threshold(failed, total, threshold, fires):
    records = [rec("cot", grade="error", error="ValueError: bad")] * failed + [rec("cot")] * (total - failed)
    found = alarms(records, HealthConfig(max_grade_failure_rate=threshold))
    assert bool(found) == fires
    if fires:
        assert f"{failed} of {total} rollouts" in found[0] and "ValueError: bad" in found[0]


@pytest.mark.parametrize(
    ("code_mode", "with_code", "fires"), [(8, 0, True), (7, 0, False), (8, 1, False), (40, 0, True), (0, 0, False)]
)
def test_no_code_alarm_needs_enough_code_mode_rollouts_all_without_code(code_mode, with_code, fires):
    records = [rec("code", ("ok",))] * with_code + [rec("code")] * (code_mode - with_code)
    records += [rec("auto")] * 20  # other modes never count
    found = alarms(records, HealthConfig(min_code_mode_rollouts=8))
    assert bool(found) == fires
    if fires:
        assert f"none of the {code_mode} code-mode rollouts ran any code" in found[0]


def test_failed_records_are_redone_and_the_file_keeps_one_record_per_key(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    rows = [rec(qid="a"), rec(qid="b", blocks=("sandbox_error",)), rec(qid="c", grade="timeout"), rec(qid="d")]
    rows.append({**rec(qid="d"), "note": "appended again"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = reusable_records(path, lambda r: r["id"])
    assert sorted(done) == ["a", "d"] and done["d"]["note"] == "appended again"
    assert [r["id"] for r in read_jsonl(path)] == ["a", "d"]


# --- the engine with broken tools ---


CODE = "Compute.\n```python\nprint(6 * 7)\n```\n```output"


def responder(context: str) -> str:
    """After the code prefix: one code block, then the answer from its output; without it: an answer."""
    if "```output" in context or CODE_PREFIX not in context:
        return "So \\boxed{42}."
    return CODE


class BrokenPool:
    """A pool whose sandbox itself fails: raises SandboxError where `where` says, else answers sandbox_error."""

    def __init__(self, where: str) -> None:
        self.where = where

    def open_session(self) -> str:
        if self.where == "open":
            raise SandboxError("the template process is gone")
        return "s"

    def run_many(self, requests):
        if self.where == "run":
            raise SandboxError("lost the connection to the sandbox service")
        return [ExecResult("sandbox_error", "", "SandboxError: worker pool exhausted", 0.0) for _ in requests]

    def run(self, session: str, code: str):  # the async schedule runs blocks one at a time
        return self.run_many([(session, code)])[0]

    def close_session(self, session: str) -> None:
        if self.where != "status":
            raise SandboxError("cannot close")

    def close(self) -> None:
        pass


def _problem(i: int = 0) -> Problem:
    return Problem(f"q{i}", f"What is {i} times 7?", "42", "toy", {})


@pytest.mark.parametrize("schedule", [ScriptedBackend, AsyncScriptedBackend])
@pytest.mark.parametrize("where", ["open", "run", "status"])
def test_a_broken_sandbox_gives_sandbox_error_blocks_not_a_crash(tiny_tokenizer, where, schedule):
    backend = schedule(tiny_tokenizer, responder)
    requests = [RolloutRequest(_problem(i), "code", 0, CODE_PREFIX) for i in range(3)]
    records = run_rollouts(backend, requests, RolloutConfig(), progress=False, sandbox=BrokenPool(where))
    assert len(records) == 3
    for r in records:
        assert [b["status"] for b in r["code_blocks"]] == ["sandbox_error"]
        assert r["code_blocks"][0]["error"] and r["n_code_calls"] == 1
    assert tool_counts(records)["code_calls"]["sandbox_error"] == 3


@pytest.mark.parametrize(
    ("grader", "status", "message"),
    [
        (lambda items: 1 / 0, "error", "ZeroDivisionError"),
        (lambda items: [Grade(None, False, "timeout", "took longer than 10 s")] * len(items), "timeout", "10 s"),
        (lambda items: [Grade("42", False, "error", "RecursionError: deep")] * len(items), "error", "Recursion"),
    ],
)
@pytest.mark.parametrize("schedule", [ScriptedBackend, AsyncScriptedBackend])
def test_grader_failures_are_recorded_with_their_message(tiny_tokenizer, grader, status, message, schedule):
    backend = schedule(tiny_tokenizer, lambda ctx: "\\boxed{42}")
    requests = [RolloutRequest(_problem(i), "cot", 0, "") for i in range(2)]
    records = run_rollouts(
        backend, requests, RolloutConfig(), progress=False, sandbox=BrokenPool("status"), grader=grader
    )
    for r in records:
        assert (r["grade_status"], r["correct"]) == (status, False) and message in r["grade_error"]


def test_a_raising_equivalence_check_is_an_error_grade_not_a_wrong_one(monkeypatch):
    import autocode4math.grading as grading

    assert grading.grade("\\boxed{42}", "42") == Grade("42", True)

    def boom(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(grading, "is_equivalent", boom)
    verdict = grading.grade("\\boxed{42}", "42")
    assert (verdict.status, verdict.correct) == ("error", False) and "RecursionError" in verdict.error


# --- `autocode eval` with broken tools ---


def _bench(tmp_path, count=8):
    path = tmp_path / "tiny.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"What is {i} times 7?", "answer": "42"}) + "\n"
            for i in range(count)
        )
    )
    return path


def _eval_config(tmp_path, **changes):
    bench = str(_bench(tmp_path))
    return EvalConfig(
        model="scripted", benchmarks=[], benchmark_files=[bench], out=str(tmp_path / "run"), modes=["code"], **changes
    )


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


def test_eval_stops_on_a_broken_sandbox_keeps_its_work_and_resumes_after_the_fix(tmp_path, tiny_tokenizer, pool):
    cfg = _eval_config(tmp_path)
    backend = ScriptedBackend(tiny_tokenizer, responder)
    with pytest.raises(ToolHealthError, match=r"8 of 8 code calls \(100%\) failed in the sandbox itself"):
        run_eval(cfg, backend=backend, sandbox=BrokenPool("status"), progress=False)
    out = tmp_path / "run"
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8  # the work stays
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tools"]["code_calls"]["sandbox_error"] == 8 and metrics["tools"]["alarms"]
    assert metrics["benchmarks"]["tiny"]["modes"]["code"]["code_calls"]["sandbox_error"] == 8
    report = (out / "report.md").read_text()
    assert "**Tool health alarm**" in report and "code calls sandbox_error 8" in report
    backend = ScriptedBackend(tiny_tokenizer, responder)
    metrics = run_eval(cfg, backend=backend, sandbox=pool, progress=False)  # the sandbox is fixed: resume
    assert sum(backend.calls[:1]) == 8  # the 8 failed samples were redone
    assert metrics["tools"]["code_calls"]["ok"] == 8 and metrics["tools"]["alarms"] == []
    assert metrics["benchmarks"]["tiny"]["modes"]["code"]["accuracy"] == 1.0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8
    assert "code calls ok 8, sandbox_error 0; grading ok 8, timeout 0, error 0" in (out / "report.md").read_text()


def test_eval_stops_on_a_broken_grader(tmp_path, tiny_tokenizer, pool):
    def flaky(items):
        return [
            Grade("42", False, "error", "TypeError: odd input") if i % 4 == 0 else Grade("42", True)
            for i, _ in enumerate(items)
        ]

    backend = ScriptedBackend(tiny_tokenizer, responder)
    with pytest.raises(ToolHealthError, match=r"2 of 8 rollouts \(25%\) could not be graded .*TypeError: odd input"):
        run_eval(_eval_config(tmp_path), backend=backend, sandbox=pool, grader=flaky, progress=False)
    grades = [r["grade_status"] for r in read_jsonl(tmp_path / "run" / "samples.jsonl")]
    assert sorted(grades) == ["error"] * 2 + ["ok"] * 6


def test_eval_stops_when_code_mode_never_runs_code_unless_told_to_go_on(tmp_path, tiny_tokenizer, pool):
    def never_stops(context: str) -> str:  # writes code, but never the stop string: a template mismatch
        return "```python\nprint(6 * 7)\n```\nThe result is \\boxed{42}."

    backend = ScriptedBackend(tiny_tokenizer, never_stops)
    with pytest.raises(ToolHealthError, match="none of the 8 code-mode rollouts ran any code"):
        run_eval(_eval_config(tmp_path), backend=backend, sandbox=pool, progress=False)
    going_on = _eval_config(tmp_path, health=HealthConfig(check=False))
    metrics = run_eval(going_on, backend=backend, sandbox=pool, progress=False)
    assert metrics["tools"]["code_mode_rollouts_with_code"] == 0 and len(metrics["tools"]["alarms"]) == 1


# --- `autocode train` with broken tools ---


@pytest.mark.slow
def test_train_stops_with_a_clear_message_and_resumes_after_the_fix(tiny_model_dir, tmp_path, monkeypatch):
    """The E-step's sandbox is broken: exit 1 with the alarm, rollouts kept; fixed, the same command finishes."""
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    import autocode4math.rollout as rollout
    import autocode4math.sandbox as sandbox
    from autocode4math.cli import app

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    real_pool = sandbox.SandboxPool
    monkeypatch.setattr(rollout, "make_backend", lambda name, model, **kw: ScriptedBackend(tokenizer, responder))
    monkeypatch.setattr(sandbox, "SandboxPool", lambda *a, **kw: BrokenPool("run"))
    run = tmp_path / "run"
    args = ["train", f"--model={tiny_model_dir}", f"--out={run}", "--iterations=1"]
    args += [
        f"--set={s}"
        for s in ("queries_limit=2", "estep.k=4", "mstep.max_steps=1", "mstep.micro_batch_size=2", "eval.every=0")
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert re.search(r"Error: tool health alarm in the E-step in .*iter-01/collect: 8 of 8 code calls", result.output)
    assert "--ignore-tool-health" in result.output and "Traceback" not in result.output
    rollouts = run / "iter-01" / "collect" / "rollouts.jsonl"
    assert len(rollouts.read_text().splitlines()) == 16 and not (run / "iter-01" / "collect" / "train.jsonl").exists()

    ignored = CliRunner().invoke(app, [*args, f"--out={tmp_path / 'ignored'}", "--ignore-tool-health"])
    assert ignored.exit_code == 0, ignored.output
    summary = json.loads((tmp_path / "ignored" / "iter-01" / "collect" / "summary.json").read_text())
    assert summary["tools"]["code_calls"]["sandbox_error"] == 8 and summary["tools"]["alarms"]

    monkeypatch.setattr(sandbox, "SandboxPool", real_pool)  # the sandbox is fixed
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = list(read_jsonl(rollouts))
    assert len(records) == 16 and all(b["status"] == "ok" for r in records for b in r["code_blocks"])
    summary = json.loads((run / "iter-01" / "collect" / "summary.json").read_text())
    assert summary["tools"]["code_calls"]["ok"] == 8
    assert summary["tools"]["grading"] == {"ok": 16, "timeout": 0, "error": 0}
