"""The asynchronous schedule: same records as rounds, slots refilled at once, code overlapping generation."""

from __future__ import annotations

import itertools
import threading
import zlib

import pytest

from autocode4math.benchmarks import Problem
from autocode4math.rollout import RolloutConfig, RolloutRequest, run_rollouts
from autocode4math.rollout.scripted import AsyncScriptedBackend, ScriptedBackend, by_rounds
from autocode4math.rollout.stats import Meter, RolloutStats
from autocode4math.sandbox import ExecResult, SandboxPool


def code(body: str) -> str:
    return f"Let me compute.\n```python\n{body}\n```\n```output"


SCRIPTS = {
    "direct": ["So the answer is \\boxed{42}."],
    "one": [code("print(6 * 7)"), "\\boxed{42}"],
    "state": [code("x = 5\nprint(x)"), code("print(x * 2)"), "\\boxed{10}"],
    "error": [code("print(undefined_name)"), "It failed, so \\boxed{41}"],
    "loop": [code("print(1)")],
    "long": ["blah " * 300],
    "nocode": ["No code here.\n```output", "\\boxed{1}"],
}


def responder(context: str) -> str:
    name = next(k for k in SCRIPTS if f"[{k}]" in context)
    return by_rounds(SCRIPTS[name])(context)


def jitter(request) -> float:
    """A few milliseconds that differ from request to request, so answers come back out of order."""
    return (zlib.crc32(request.text.encode()) % 7) * 0.002


def requests_for(names, samples=2, modes=("auto", "code")):
    problems = [Problem(n, f"[{n}] What is 6 times 7?", "42", "toy", {}) for n in names]
    prefix = {"auto": "", "code": "Use code.\n"}
    return [RolloutRequest(p, mode, s, prefix[mode]) for mode in modes for p in problems for s in range(samples)]


def stable(record: dict) -> dict:
    """A record without its timings (code blocks may carry sandbox seconds)."""
    blocks = [{k: v for k, v in b.items() if k != "duration_s"} for b in record["code_blocks"]]
    return {**record, "code_blocks": blocks}


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


@pytest.mark.parametrize("max_active", [1, 3, 64])
def test_async_records_equal_rounds(tiny_tokenizer, pool, max_active):
    requests = requests_for(SCRIPTS)
    config = RolloutConfig(max_new_tokens=200, max_code_rounds=2, max_active=max_active)
    rounds = run_rollouts(ScriptedBackend(tiny_tokenizer, responder), requests, config, progress=False, sandbox=pool)
    backend = AsyncScriptedBackend(tiny_tokenizer, responder, latency=jitter)
    seen: list[dict] = []
    stats = RolloutStats()
    records = run_rollouts(backend, requests, config, progress=False, sandbox=pool, on_record=seen.append, stats=stats)
    assert [stable(r) for r in records] == [stable(r) for r in rounds]
    assert sorted((r["mode"], r["id"], r["sample"]) for r in seen) == sorted(
        (q.mode, q.problem.id, q.sample) for q in requests
    )
    assert {r["finish_reason"] for r in records} == {"answer", "length", "round_limit"}
    assert backend.max_in_flight <= max_active
    assert stats.schedule == "async" and stats.trajectories == len(requests)
    assert stats.generation_requests == len(backend.requests)
    assert stats.code_calls == sum(r["n_code_calls"] for r in records)
    assert 0 < stats.occupancy <= 1


def test_finished_slot_is_refilled_without_waiting_for_the_slowest(tiny_tokenizer, pool):
    """max_active=4, five trajectories: three hold their answer until the fifth has been submitted."""
    fifth_submitted = threading.Event()

    def latency(request):
        if "[q4]" in request.text:
            fifth_submitted.set()
        elif "[q0]" not in request.text:
            fifth_submitted.wait(5)  # in rounds this times out: the fifth waits for the whole round
        return 0.0

    problems = [Problem(id=f"q{i}", question=f"[q{i}] 6 x 7?", answer="42", benchmark="toy", meta={}) for i in range(5)]
    requests = [RolloutRequest(p, "auto", 0, "") for p in problems]
    backend = AsyncScriptedBackend(tiny_tokenizer, by_rounds(["\\boxed{42}"]), latency=latency)
    records = run_rollouts(backend, requests, RolloutConfig(max_active=4), progress=False, sandbox=pool)
    assert fifth_submitted.is_set() and all(r["correct"] for r in records)
    assert backend.max_in_flight == 4


class GatedSandbox:
    """A stand-in pool: a block containing `wait()` returns only when `gate` opens (status timeout after 3 s)."""

    workers = 2

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.ids = itertools.count()
        self.open: set[str] = set()

    def open_session(self) -> str:
        sid = f"s{next(self.ids)}"
        self.open.add(sid)
        return sid

    def run(self, session: str, code: str) -> ExecResult:
        if "wait()" in code and not self.gate.wait(3):
            return ExecResult("timeout", "", "gate never opened", 3.0)
        return ExecResult("ok", "1\n", "", 0.0)

    def run_many(self, requests):
        return [self.run(s, c) for s, c in requests]

    def close_session(self, session: str) -> None:
        self.open.discard(session)


@pytest.mark.parametrize(("schedule", "status"), [("async", "ok"), ("rounds", "timeout")])
def test_code_runs_while_other_trajectories_generate(tiny_tokenizer, schedule, status):
    """A's block waits for B's second generation, which in rounds only comes after A's block."""
    sandbox = GatedSandbox()
    b_requests = itertools.count(1)

    def latency(request):
        if "[B]" in request.text and next(b_requests) == 2:
            sandbox.gate.set()
        return 0.0

    def respond(context: str) -> str:
        body = "wait()" if "[A]" in context else "print(1)"
        return by_rounds([code(body), "\\boxed{1}"])(context)

    requests = [RolloutRequest(Problem(n, f"[{n}] 1?", "1", "toy", {}), "auto", 0, "") for n in "AB"]
    backend = AsyncScriptedBackend(tiny_tokenizer, respond, latency=latency)
    config = RolloutConfig(schedule=schedule)
    a, b = run_rollouts(backend, requests, config, progress=False, sandbox=sandbox)
    assert a["code_blocks"][0]["status"] == status and b["code_blocks"][0]["status"] == "ok"
    assert not sandbox.open  # every session closed


def test_backend_failure_stops_the_run_and_closes_sessions(tiny_tokenizer):
    def respond(context: str) -> str:
        if "[boom]" in context and "```output\n1\n```" in context:  # boom's second generation
            raise ConnectionError("server went away")
        return by_rounds([code("print(1)"), "\\boxed{1}"])(context)

    sandbox = GatedSandbox()
    requests = [RolloutRequest(Problem(n, f"[{n}] 1?", "1", "toy", {}), "auto", 0, "") for n in ("ok", "boom")]
    seen: list[dict] = []
    backend = AsyncScriptedBackend(tiny_tokenizer, respond, latency=lambda r: 0.2 if "[boom]" in r.text else 0.0)
    with pytest.raises(ConnectionError, match="went away"):
        run_rollouts(backend, requests, RolloutConfig(), progress=False, sandbox=sandbox, on_record=seen.append)
    assert not sandbox.open
    assert [r["id"] for r in seen] == ["ok"]  # finished before the failure: kept


def test_schedule_choice(tiny_tokenizer, pool):
    requests = requests_for(["direct"], samples=1, modes=("auto",))
    with pytest.raises(ValueError, match="schedule 'async' needs a backend"):
        run_rollouts(ScriptedBackend(tiny_tokenizer, responder), requests, RolloutConfig(schedule="async"),
                     progress=False, sandbox=pool)  # fmt: skip
    backend = AsyncScriptedBackend(tiny_tokenizer, responder)
    stats = RolloutStats()
    run_rollouts(backend, requests, RolloutConfig(schedule="rounds"), progress=False, sandbox=pool, stats=stats)
    assert stats.schedule == "rounds" and len(backend.requests) == 1
    with pytest.raises(ValueError, match="schedule"):
        RolloutConfig(schedule="sometimes")


def test_occupancy_is_the_time_weighted_share_of_slots():
    now = [0.0]
    meter = Meter(clock=lambda: now[0])
    meter.change(2)  # t=0: two requests in flight
    now[0] = 1.0
    meter.change(-1)  # t=1: one
    now[0] = 3.0
    meter.change(-1)  # t=3: none
    now[0] = 4.0
    stats = meter.stats("async", capacity=2)
    # area = 2 x 1 s + 1 x 2 s = 4 request-seconds over 4 s x 2 slots
    assert (stats.wall_s, stats.occupancy, stats.generation_requests) == (4.0, 0.5, 2)
    total = RolloutStats("rounds", 4.0, 0.5, 2)
    total.add(RolloutStats("async", 12.0, 0.9, 5, 3, 1))
    assert total.wall_s == 16.0 and total.occupancy == pytest.approx((0.5 * 4 + 0.9 * 12) / 16)
    assert (total.schedule, total.generation_requests, total.code_calls, total.trajectories) == ("async", 7, 3, 1)


def test_sandbox_pool_serves_sessions_from_many_threads(pool):
    """The async engine opens, runs and closes sessions from several threads at once."""
    outputs: dict[int, list[str]] = {}

    def worker(i: int) -> None:
        sid = pool.open_session()
        first = pool.run(sid, f"x = {i}\nprint(x)")
        second = pool.run(sid, "print(x * 10)")
        pool.close_session(sid)
        outputs[i] = [first.stdout, second.stdout]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outputs == {i: [f"{i}\n", f"{10 * i}\n"] for i in range(6)}


@pytest.mark.slow
def test_bench_async_compares_both_schedules_on_the_same_requests():
    from typer.testing import CliRunner

    from autocode4math.bench_async import AsyncBenchConfig, bench_async, scripted_turns
    from autocode4math.cli import app

    cfg = AsyncBenchConfig(n=4, max_active=2, slots=2, base_s=0.0, prefill_s=0.0, decode_s=0.0, code_s=0.0)
    result = bench_async(cfg)
    assert result["schedules"] == ["rounds", "async"] and result["same_records"] is True
    assert result["generation_requests"][0] == result["generation_requests"][1] > 4
    assert all(0 <= x <= 1 for x in result["occupancy"] + result["slot_occupancy"])
    turns = scripted_turns("What is 2 + 3?", 5, cfg)
    assert turns[-1].endswith("\\boxed{5}.") and all(t.endswith("```output") for t in turns[:-1]) and len(turns) <= 3
    bad = CliRunner().invoke(app, ["bench", "async", "--n", "0"])
    assert bad.exit_code == 2 and "n must be >= 1" in bad.output
