"""Tool health: count what the sandbox and the grader did in a stage, and stop a run whose tools broke.

A training run whose sandbox fails on most calls silently becomes RL without tools; a chat template
whose code blocks never reach the stop string trains a model that never runs code; a grader that
raises turns right answers into "wrong". Each looks like a normal run. So every stage that rolls out
(E-step, RL collection, evaluation) counts, over its records:

- code calls by status (`ok`, `error`, `timeout`, `memory`, ..., and `sandbox_error`: the sandbox
  itself failed, not the code);
- rollouts by grading status (`ok`, `timeout`, `error`);
- code-mode rollouts, and how many of them ran any code;

and raises `ToolHealthError` when an alarm fires (`HealthConfig`): sandbox failures above 5% of the
calls, grading failures above 1% of the rollouts, or code-mode rollouts that never ran code at all.
Records are written before the check, so the stage's work stays on disk; a rerun redoes the
records whose tools failed (`reusable_records`) and keeps the rest. (Code-mode rollouts without
code are not failed records: fixing a template changes the stage's settings, so that rerun needs
`--overwrite`.) `check=False` (the CLI's `--ignore-tool-health`) keeps the counts and goes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocode4math.grading import GRADE_STATUSES
from autocode4math.io import read_done, write_jsonl
from autocode4math.sandbox import STATUSES as CODE_STATUSES


@dataclass
class HealthConfig:
    """When a stage's tools look broken enough to stop the run."""

    check: bool = True
    """Stop a stage whose alarms fire; False only records the counts (the CLI's --ignore-tool-health)."""
    max_sandbox_failure_rate: float = 0.05
    """Alarm when more than this share of a stage's code calls end in `sandbox_error`."""
    max_grade_failure_rate: float = 0.01
    """Alarm when more than this share of a stage's rollouts could not be graded (`timeout` or `error`)."""
    min_code_mode_rollouts: int = 8
    """The no-code alarm needs at least this many code-mode rollouts in the stage; it fires if none ran code."""

    def __post_init__(self) -> None:
        for name in ("max_sandbox_failure_rate", "max_grade_failure_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_code_mode_rollouts < 1:
            raise ValueError(f"min_code_mode_rollouts must be >= 1, got {self.min_code_mode_rollouts}")


class ToolHealthError(RuntimeError):
    """A stage's sandbox or grader failed too often, or its code-mode rollouts never ran code."""


def _executed(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in record.get("code_blocks", []) if b["status"] != "not_run"]


def tool_counts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Code calls by status, rollouts by grading status, and code-mode rollouts with and without code."""
    calls = Counter(b["status"] for r in records for b in _executed(r))
    grading = Counter(r.get("grade_status", "ok") for r in records)
    code_mode = [r for r in records if r["mode"] == "code"]
    return {
        "code_calls": {**{s: calls.get(s, 0) for s in CODE_STATUSES}, **calls},
        "grading": {**{s: grading.get(s, 0) for s in GRADE_STATUSES}, **grading},
        "code_mode_rollouts": len(code_mode),
        "code_mode_rollouts_with_code": sum(bool(_executed(r)) for r in code_mode),
    }


def _example(records: Sequence[dict[str, Any]], failed: Callable[[dict[str, Any]], str]) -> str:
    return next((f" (e.g. {m[:200]!r})" for r in records if (m := failed(r))), "")


def alarms(records: Sequence[dict[str, Any]], config: HealthConfig) -> list[str]:
    """The alarms a stage's records raise under `config`, as sentences (empty when the tools look healthy)."""
    return _alarms(records, tool_counts(records), config)


def _alarms(records: Sequence[dict[str, Any]], counts: dict[str, Any], config: HealthConfig) -> list[str]:
    out: list[str] = []
    calls = sum(counts["code_calls"].values())
    broken = counts["code_calls"]["sandbox_error"]
    if calls and broken / calls > config.max_sandbox_failure_rate:
        why = _example(
            records, lambda r: next((b["error"] for b in _executed(r) if b["status"] == "sandbox_error"), "")
        )
        out.append(
            f"{broken} of {calls} code calls ({broken / calls:.0%}) failed in the sandbox itself{why}, above "
            f"health.max_sandbox_failure_rate={config.max_sandbox_failure_rate:g}"
        )
    failed = len(records) - counts["grading"]["ok"]
    if records and failed / len(records) > config.max_grade_failure_rate:
        why = _example(records, lambda r: r.get("grade_error", "") if r.get("grade_status", "ok") != "ok" else "")
        out.append(
            f"{failed} of {len(records)} rollouts ({failed / len(records):.0%}) could not be graded (timeout "
            f"{counts['grading']['timeout']}, error {counts['grading']['error']}){why}, above "
            f"health.max_grade_failure_rate={config.max_grade_failure_rate:g}"
        )
    n_code = counts["code_mode_rollouts"]
    if n_code >= config.min_code_mode_rollouts and counts["code_mode_rollouts_with_code"] == 0:
        out.append(
            f"none of the {n_code} code-mode rollouts ran any code: the stop string never followed a ```python "
            "block (a chat-template or parser mismatch?)"
        )
    return out


def report(records: Sequence[dict[str, Any]], config: HealthConfig) -> dict[str, Any]:
    """Counts of a finished stage (tool_counts) plus its `alarms`, counted once."""
    counts = tool_counts(records)
    return {**counts, "alarms": _alarms(records, counts, config)}


def raise_alarms(tools: dict[str, Any], config: HealthConfig, stage: str) -> None:
    """Raise ToolHealthError when a `report` holds alarms and `config.check` is on."""
    if tools["alarms"] and config.check:
        raise ToolHealthError(
            f"tool health alarm in {stage}: {'; '.join(tools['alarms'])}. The rollouts written so far stay on disk: "
            "after the fix, rerun the same command (records whose sandbox or grading failed are redone; a changed "
            "template or stop string needs --overwrite), or go on anyway with --ignore-tool-health"
            " (--set health.check=false)"
        )


def check(records: Sequence[dict[str, Any]], config: HealthConfig, stage: str) -> dict[str, Any]:
    """`report` of a finished stage; raise ToolHealthError when an alarm fires and `config.check`."""
    tools = report(records, config)
    raise_alarms(tools, config, stage)
    return tools


def tool_failed(record: dict[str, Any]) -> bool:
    """Whether a record's tools failed (sandbox_error block, grading timeout or error): redone on resume."""
    return record.get("grade_status", "ok") != "ok" or any(b["status"] == "sandbox_error" for b in _executed(record))


def reusable_records(path: str | Path, key: Callable[[dict[str, Any]], Any]) -> dict[Any, dict[str, Any]]:
    """Finished records of a resumable JSONL by key, leaving out those whose tools failed so they are redone.

    When records are left out, the file is rewritten (atomically) without them, so it never holds
    two records of one key.
    """
    rows = read_done(path)
    done = {key(r): r for r in rows if not tool_failed(r)}
    if len(done) != len(rows):
        write_jsonl(path, done.values())
    return done
