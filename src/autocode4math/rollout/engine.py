"""Tool-integrated rollouts: generate, run the code block, insert its output, generate again.

Why token ids: training masks tool output out of the loss and reuses the exact tokens the model
sampled, so the engine keeps `prompt_ids`, `prefix_ids` and `response_ids` as produced, never
re-tokenizing a whole transcript. Tool-inserted text is tokenized on its own and appended with mask 0.
`response_tokens` replays a written response (an SFT demonstration) through the same appends, so
which tokens are trained is decided in one place for rollouts and fixed datasets alike.

Two schedules, with the same records for a deterministic backend:
- async (backends with `submit`, i.e. servers): each trajectory advances on its own. Its next
  generation is submitted as soon as its code block has run, its code runs (in a thread per
  sandbox worker) while others generate, and a finished trajectory is replaced at once, so the
  backend always has up to `max_active` requests in flight. Finished trajectories are graded in
  batches on one grading thread; `on_record` is called on the calling thread.
- rounds (batched backends: hf, in-process vLLM): each round, every active trajectory asks the
  backend for a continuation in one call, and every code block of the round runs in one
  `SandboxPool.run_many` call; finished trajectories are replaced from the queue between rounds.
At most `max_active` trajectories are in flight. `RolloutStats` reports the backend's occupancy
(time-weighted mean of requests in flight over `max_active`).

Deliberate simplifications:
- Only the last complete ```python block before a stop is executed (the one the output belongs to).
- The token budget counts every response token (model and tool), since both fill the context.
"""

from __future__ import annotations

import contextlib
import queue
import re
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from autocode4math.prompts import MODES, PromptConfig, build_prompt
from autocode4math.rollout.stats import Meter, RolloutStats

STOP = "```output"
CODE_RE = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
FINISH_REASONS = ("answer", "length", "round_limit", "error")
SCHEDULES = ("auto", "async", "rounds")
TOKENS_FROM = ("model", "server", "local")
"""Where a record's model tokens come from, best first: the model itself (in-process), a server's sampled ids, or
the local tokenizer re-encoding a server's text (the worst of a trajectory's generations is recorded)."""


@dataclass
class RolloutConfig:
    """How trajectories are generated."""

    max_new_tokens: int = 2048
    """Token budget of one trajectory's response, across all rounds (model and tool tokens)."""
    max_code_rounds: int = 4
    """Code blocks executed at most; one more ends the trajectory with `round_limit`."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (ignored when greedy)."""
    seed: int = 0
    """Base seed; each request's seed is derived from it and the request's identity."""
    max_active: int = 64
    """Generation requests in flight: in rounds, the trajectories of one backend call; in async, the trajectories
    waiting for the backend (up to as many more may be running code meanwhile)."""
    stop: str = STOP
    """Stop string that ends a code round; the tool output follows it."""
    schedule: str = "auto"
    """async (each trajectory advances on its own; needs a backend with `submit`), rounds, or auto (async when the
    backend can)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_code_rounds < 0:
            raise ValueError(f"max_code_rounds must be >= 0, got {self.max_code_rounds}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {self.max_active}")
        if not self.stop:
            raise ValueError("stop must not be empty")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class RolloutRequest:
    problem: Any
    """A `benchmarks.Problem` (anything with id, question, answer, benchmark)."""
    mode: str
    """auto, cot or code: selects the prompt variant."""
    sample: int
    """Sample index among the n samples of this (problem, mode)."""
    prefix: str
    """Forced start of the response."""

    def key(self) -> tuple[str, str, str, int]:
        return (str(self.problem.benchmark), self.mode, str(self.problem.id), self.sample)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    stop: str


@dataclass
class GenerationRequest:
    """One continuation to generate: the context both as ids and as text (backends use either)."""

    ids: list[int]
    text: str
    max_tokens: int
    seed: int


@dataclass
class Generation:
    """A backend's continuation. When `finish` is "stop", `text` ends with the stop string."""

    ids: list[int]
    text: str
    finish: str
    """"stop" (stop string), "eos" (end of sequence), "length" (max_tokens reached or the context is full) or
    "error" (the backend refused this request; the trajectory ends there)."""
    error: str = ""
    """Why the backend refused the request ("" when it did not)."""
    tokens_from: str = "model"
    """Where `ids` come from: see TOKENS_FROM."""


class Backend(Protocol):
    tokenizer: Any

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]: ...


class AsyncBackend(Backend, Protocol):
    """A backend that takes requests at any time (a server): the engine then runs trajectories asynchronously."""

    def submit(self, request: GenerationRequest, sampling: SamplingParams) -> Future[Generation]: ...


def make_requests(
    problems: Sequence[Any], modes: Sequence[str], n: int, prompt_config: PromptConfig | None = None
) -> list[RolloutRequest]:
    """n samples per (problem, mode); the prefix is the mode's forced response start."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; expected a subset of {MODES}")
    out = []
    for mode in modes:
        prefix = build_prompt("x", mode, None, prompt_config).prefix
        out += [RolloutRequest(p, mode, s, prefix) for p in problems for s in range(n)]
    return out


def encode(tokenizer: Any, text: str) -> list[int]:
    """Tokens of `text` alone, with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt tokens, with the BOS token the tokenizer adds unless the text already starts with it."""
    ids = encode(tokenizer, text)
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is not None and not text.startswith(bos):
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        if with_special and with_special[0] == bos_id:
            ids = [bos_id, *ids]
    return ids


def cut_at_stop(ids: Sequence[int], tokenizer: Any, stop: str) -> tuple[list[int], bool]:
    """Shortest token prefix of `ids` whose text contains `stop` (True), or all of `ids` (False).

    Generation is cut at the token that completes the stop string; anything sampled after it (a
    batch neighbour kept the batch running) is dropped. Binary search: containment is monotone.
    """
    ids = list(ids)
    if stop not in tokenizer.decode(ids, skip_special_tokens=True):
        return ids, False
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if stop in tokenizer.decode(ids[:mid], skip_special_tokens=True):
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo], True


def finish_generation(ids: Sequence[int], tokenizer: Any, stop: str, max_tokens: int, eos_ids: set[int]) -> Generation:
    """Turn raw sampled ids into a Generation: cut at the first EOS or stop string, whichever is first."""
    ids = list(ids)[:max_tokens]
    eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    body = ids if eos_at is None else ids[:eos_at]
    body, stopped = cut_at_stop(body, tokenizer, stop)
    if stopped:
        finish = "stop"
    elif eos_at is not None:
        finish, body = "eos", ids[: eos_at + 1]
    else:
        finish = "length" if len(ids) >= max_tokens else "eos"
    return Generation(ids=body, text=tokenizer.decode(body, skip_special_tokens=True), finish=finish)


def request_seed(base: int, key: tuple, round_index: int) -> int:
    """A stable per-(request, round) seed, so n samples of one prompt differ on seeded servers."""
    return (base * 1_000_003 + zlib.crc32(repr((key, round_index)).encode())) % (2**31 - 1)


@dataclass
class _Trajectory:
    request: RolloutRequest
    prompt: str
    prompt_ids: list[int]
    prefix_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)
    code_blocks: list[dict] = field(default_factory=list)
    since_tool: str = ""
    session: str | None = None
    finish_reason: str | None = None
    error: str = ""
    tokens_from: str = "model"

    @property
    def response(self) -> str:
        return "".join(self.parts)

    def append(self, ids: list[int], text: str, kind: str) -> None:
        start = len(self.response_ids)
        self.response_ids += ids
        self.mask += [1 if kind == "model" else 0] * len(ids)
        self.parts.append(text)
        if ids:
            self.segments.append({"kind": kind, "start": start, "end": len(self.response_ids)})
        self.since_tool = self.since_tool + text if kind == "model" else ""


def tool_text(result: Any) -> str:
    """What the engine inserts after a stop string: the code block's feedback inside the output fence."""
    return "\n" + result.feedback() + "\n```\n"


def response_tokens(
    tokenizer: Any, response: str, eos_id: int | None = None, stop: str = STOP
) -> tuple[list[int], list[int], list[dict]]:
    """(response_ids, response_mask, segments) the engine records when a model writes `response`.

    The text is cut as the engine builds it: model text up to and including each stop string (mask 1:
    the model writes the stop string), then the tool's inserted output up to its closing fence (mask 0),
    each piece tokenized on its own; `eos_id` ends the last model piece, as a model that finished does.
    """
    t = _Trajectory(request=None, prompt="", prompt_ids=[], prefix_ids=[])
    pieces = re.split(f"(?<={re.escape(stop)})(\n.*?\n```\n)", response, flags=re.DOTALL)
    for i, piece in enumerate(pieces):
        ids = encode(tokenizer, piece) + ([eos_id] if eos_id is not None and i == len(pieces) - 1 else [])
        t.append(ids, piece, "tool" if i % 2 else "model")
    return t.response_ids, t.mask, t.segments


def _start(tokenizer: Any, request: RolloutRequest, prompt_config: PromptConfig | None) -> _Trajectory:
    prompt = build_prompt(request.problem.question, request.mode, tokenizer, prompt_config)
    return _Trajectory(request, prompt.text, encode_prompt(tokenizer, prompt.text), encode(tokenizer, request.prefix))


def _generation_request(t: _Trajectory, config: RolloutConfig) -> GenerationRequest:
    return GenerationRequest(
        ids=t.prompt_ids + t.prefix_ids + t.response_ids,
        text=t.prompt + t.request.prefix + t.response,
        max_tokens=config.max_new_tokens - len(t.response_ids),
        seed=request_seed(config.seed, t.request.key(), len(t.code_blocks)),
    )


def _after_generation(t: _Trajectory, gen: Generation, config: RolloutConfig) -> str | None:
    """Record the model's text; return the code to run, or None after setting the finish reason."""
    t.append(gen.ids, gen.text, "model")
    t.tokens_from = max(t.tokens_from, gen.tokens_from, key=TOKENS_FROM.index)
    t.error = gen.error
    if gen.finish == "error":
        t.finish_reason = "error"
        return None
    if gen.finish == "length" or len(t.response_ids) >= config.max_new_tokens:
        t.finish_reason = "length"
        return None
    if gen.finish != "stop":
        t.finish_reason = "answer"
        return None
    blocks = CODE_RE.findall(t.since_tool.rsplit(config.stop, 1)[0])
    if not blocks:
        t.finish_reason = "answer"
        return None
    if len(t.code_blocks) >= config.max_code_rounds:
        t.code_blocks.append({"code": blocks[-1], "status": "not_run", "output": "", "error": "round limit"})
        t.finish_reason = "round_limit"
        return None
    return blocks[-1]


def _insert_output(t: _Trajectory, code: str, result: Any, tokenizer: Any, config: RolloutConfig) -> None:
    text = tool_text(result)
    block = {"code": code, "status": result.status, "output": result.stdout, "error": result.error}
    t.code_blocks.append({**block, "duration_s": result.duration_s})
    t.append(encode(tokenizer, text), text, "tool")
    if len(t.response_ids) >= config.max_new_tokens:
        t.finish_reason = "length"


def _record(t: _Trajectory, grade: Any) -> dict[str, Any]:
    p, r = t.request.problem, t.request
    executed = [b for b in t.code_blocks if b["status"] != "not_run"]
    return {
        "id": p.id,
        "benchmark": p.benchmark,
        "mode": r.mode,
        "sample": r.sample,
        "question": p.question,
        "answer": p.answer,
        "meta": dict(getattr(p, "meta", None) or {}),
        "prompt": t.prompt,
        "prefix": r.prefix,
        "response": t.response,
        "prompt_ids": t.prompt_ids,
        "prefix_ids": t.prefix_ids,
        "response_ids": t.response_ids,
        "response_mask": t.mask,
        "segments": t.segments,
        "code_blocks": t.code_blocks,
        "n_code_calls": len(executed),
        "used_code": bool(executed),
        "finish_reason": t.finish_reason,
        "error": t.error,
        "tokens_from": t.tokens_from,
        "n_prompt_tokens": len(t.prompt_ids),
        "n_generated_tokens": sum(t.mask),
        "pred": grade.pred,
        "correct": bool(grade.correct) and t.finish_reason not in ("length", "error"),
        "grade_status": getattr(grade, "status", "ok"),
        "grade_error": getattr(grade, "error", ""),
    }


def _default_grader(items: list[tuple[str, Any, str | None]]) -> list[Any]:
    from autocode4math.grading import grade_many

    return grade_many(items)


def run_rollouts(
    backend: Backend,
    requests: Sequence[RolloutRequest],
    config: RolloutConfig,
    *,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    sandbox: Any = None,
    grader: Callable[[list[tuple[str, Any, str | None]]], list[Any]] | None = None,
    prompt_config: PromptConfig | None = None,
    stats: RolloutStats | None = None,
) -> list[dict[str, Any]]:
    """Run every request to completion; return records in request order.

    `sandbox` is a `SandboxPool` (one is opened and closed here when None); `grader` maps
    (response, gold, benchmark) triples to grades (default `grading.grade_many`). `on_record` is
    called with each record as soon as its trajectory is graded, for append-as-you-go files.
    `stats`, when given, has this call's `RolloutStats` added to it.
    """
    from autocode4math.rollout.progress import progress_bar

    schedule = _schedule(backend, config)
    own_pool = sandbox is None
    if own_pool:
        from autocode4math.sandbox import SandboxPool

        sandbox = SandboxPool()
    run = _Run(backend, config, sandbox, grader or _default_grader, prompt_config, [None] * len(requests), on_record)
    try:
        with progress_bar(len(requests), "rollouts", enabled=progress) as run.advance:
            (_run_async if schedule == "async" else _run_rounds)(run, list(enumerate(requests)))
    finally:
        if own_pool:
            sandbox.close()
        if stats is not None:
            done = run.meter.stats(schedule, config.max_active)
            done.code_calls, done.trajectories = run.code_calls, sum(r is not None for r in run.records)
            stats.add(done)
    return [r for r in run.records if r is not None]


def _schedule(backend: Backend, config: RolloutConfig) -> str:
    can = callable(getattr(backend, "submit", None))
    if config.schedule == "async" and not can:
        raise ValueError(f"schedule 'async' needs a backend that takes requests at any time; {type(backend).__name__}")
    return "async" if can and config.schedule != "rounds" else "rounds"


@dataclass
class _Run:
    """What both schedules share: the backend, settings, where records go, and the figures measured."""

    backend: Backend
    config: RolloutConfig
    sandbox: Any
    grader: Callable
    prompt_config: PromptConfig | None
    records: list[dict[str, Any] | None]
    on_record: Callable[[dict[str, Any]], None] | None
    advance: Callable[[int], None] = lambda k: None
    meter: Meter = field(default_factory=Meter)
    code_calls: int = 0

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.config.temperature, self.config.top_p, self.config.stop)

    def start(self, request: RolloutRequest) -> _Trajectory:
        return _start(self.backend.tokenizer, request, self.prompt_config)

    def emit(self, graded: list[tuple[int, dict[str, Any]]]) -> None:
        for i, rec in graded:
            self.records[i] = rec
            if self.on_record is not None:
                self.on_record(rec)
            self.advance(1)


def _run_rounds(run: _Run, pending: list[tuple[int, RolloutRequest]]) -> None:
    """Every active trajectory generates in one backend call, then all code blocks of the round run."""
    config = run.config
    pending = pending[::-1]
    active: list[tuple[int, _Trajectory]] = []
    try:
        while pending or active:
            while pending and len(active) < config.max_active:
                i, req = pending.pop()
                active.append((i, run.start(req)))
            gens = _generate_round(run, [_generation_request(t, config) for _, t in active])
            if len(gens) != len(active):
                raise RuntimeError(f"backend returned {len(gens)} generations for {len(active)} requests")
            codes = [_after_generation(t, g, config) for (_, t), g in zip(active, gens, strict=True)]
            _execute_round(run, active, codes)
            done = [(i, t) for i, t in active if t.finish_reason is not None]
            active = [(i, t) for i, t in active if t.finish_reason is None]
            run.emit(_finish(done, run.sandbox, run.grader))
    finally:
        _close_sessions(active, run.sandbox)


def _generate_round(run: _Run, requests: list[GenerationRequest]) -> list[Generation]:
    """One round's generations. A backend that takes requests one by one gets them so, and each counts as in flight
    until its own answer; a batched backend holds the whole batch until the call returns."""
    if not callable(getattr(run.backend, "submit", None)):
        run.meter.change(len(requests))
        try:
            return run.backend.generate(requests, run.sampling)
        finally:
            run.meter.change(-len(requests))
    futures = []
    for request in requests:
        run.meter.change(1)
        futures.append(run.backend.submit(request, run.sampling))  # type: ignore[attr-defined]
        futures[-1].add_done_callback(lambda f: run.meter.change(-1))
    return [f.result() for f in futures]


def _run_async(run: _Run, requests: list[tuple[int, RolloutRequest]]) -> None:
    """Each trajectory advances on its own: generate, run its block, generate again; graded in batches."""
    scheduler = _AsyncScheduler(run, requests)
    try:
        scheduler.loop()
    finally:
        scheduler.close()


class _AsyncScheduler:
    """Keeps `max_active` generation requests in flight while trajectories run code and get graded.

    Trajectories ready to generate (back from the sandbox first, then new ones) wait for one of the
    `max_active` generation slots; trajectories running code hold no slot, and at most `max_active`
    of them are live besides the generating ones (which bounds open sandbox sessions). Only the loop's
    thread touches trajectories; the backend's, the code threads' and the grading thread's results
    come back as events.
    """

    def __init__(self, run: _Run, requests: list[tuple[int, RolloutRequest]]) -> None:
        self.run, self.config = run, run.config
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = deque(requests)
        self.live: dict[int, _Trajectory] = {}
        self.ready: deque[int] = deque()
        self.done: list[tuple[int, _Trajectory]] = []
        self.in_flight: set[Future] = set()
        self.grading: Future | None = None
        workers = max(1, int(getattr(run.sandbox, "workers", 1)))
        self.code_pool = ThreadPoolExecutor(workers, thread_name_prefix="rollout-code")
        self.grade_pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-grade")

    def loop(self) -> None:
        while self.pending or self.live or self.done or self.grading is not None:
            self._fill()
            if self.done and self.grading is None:
                self.grading = self.grade_pool.submit(_finish, self.done, self.run.sandbox, self.run.grader)
                self.grading.add_done_callback(lambda f: self.events.put(("graded", -1, f)))
                self.done = []
            kind, i, future = self.events.get()
            if kind == "graded":
                self.grading = None
                self.run.emit(future.result())
            elif kind == "generated":
                self.in_flight.discard(future)
                self._advance(i, _after_generation(self.live[i], future.result(), self.config))
            else:
                _insert_output(self.live[i], *future.result(), self.run.backend.tokenizer, self.config)
                self._advance(i, None)

    def _fill(self) -> None:
        """Give free generation slots to ready trajectories, then to new ones."""
        while len(self.in_flight) < self.config.max_active:
            if self.ready:
                self._generate(self.ready.popleft())
            elif self.pending and len(self.live) < 2 * self.config.max_active:
                i, request = self.pending.popleft()
                self.live[i] = self.run.start(request)
                self._generate(i)
            else:
                return

    def _generate(self, i: int) -> None:
        self.run.meter.change(1)
        request = _generation_request(self.live[i], self.config)
        future = self.run.backend.submit(request, self.run.sampling)  # type: ignore[attr-defined]
        self.in_flight.add(future)
        future.add_done_callback(lambda f: (self.run.meter.change(-1), self.events.put(("generated", i, f))))

    def _advance(self, i: int, code: str | None) -> None:
        t = self.live[i]
        if t.finish_reason is not None:
            self.done.append((i, self.live.pop(i)))
        elif code is not None:
            self.run.code_calls += 1
            future = self.code_pool.submit(_run_block, self.run.sandbox, t, code)
            future.add_done_callback(lambda f: self.events.put(("ran", i, f)))
        else:
            self.ready.append(i)

    def close(self) -> None:
        """Stop what is queued, wait for running code and grading, keep graded work, close every session."""
        for future in self.in_flight:
            future.cancel()
        self.code_pool.shutdown(wait=True, cancel_futures=True)
        self.grade_pool.shutdown(wait=True)
        if self.grading is not None and self.grading.done() and self.grading.exception() is None:
            self.run.emit(self.grading.result())  # a batch graded while the run failed is finished work: keep it
        _close_sessions([*self.live.items(), *self.done], self.run.sandbox)


def _close_sessions(items: Sequence[tuple[int, _Trajectory]], sandbox: Any) -> None:
    from autocode4math.sandbox import SandboxError

    for _, t in items:
        if t.session is not None:
            with contextlib.suppress(SandboxError):  # a broken sandbox has nothing left to close
                sandbox.close_session(t.session)
            t.session = None


def _run_block(sandbox: Any, t: _Trajectory, code: str) -> tuple[str, Any]:
    """Run one block in the trajectory's session (opened at its first block); (code, result).

    When the sandbox itself fails (SandboxError) the block's result has status `sandbox_error`."""
    from autocode4math.sandbox import SandboxError

    try:
        if t.session is None:
            t.session = sandbox.open_session()
        return code, sandbox.run(t.session, code)
    except SandboxError as e:
        return code, _sandbox_failure(e)


def _sandbox_failure(e: Exception) -> Any:
    from autocode4math.sandbox import ExecResult

    return ExecResult("sandbox_error", "", f"SandboxError: {e}", 0.0)


def _execute_round(run: _Run, active: list[tuple[int, _Trajectory]], codes: list[str | None]) -> None:
    runs = [(t, code) for (_, t), code in zip(active, codes, strict=True) if code is not None]
    for (t, code), result in zip(runs, _run_code(runs, run.sandbox), strict=True):
        _insert_output(t, code, result, run.backend.tokenizer, run.config)
    run.code_calls += len(runs)


def _run_code(runs: list[tuple[_Trajectory, str]], sandbox: Any) -> list[Any]:
    """Run the round's blocks, opening sessions as needed. When the sandbox itself fails (SandboxError),
    every block of the round gets status `sandbox_error` (the model sees the failure) instead of a crash."""
    from autocode4math.sandbox import SandboxError

    if not runs:
        return []
    try:
        for t, _ in runs:
            if t.session is None:
                t.session = sandbox.open_session()
        return sandbox.run_many([(t.session, code) for t, code in runs])
    except SandboxError as e:
        return [_sandbox_failure(e)] * len(runs)


def _grade(items: list[tuple[str, Any, str | None]], grader: Callable) -> list[Any]:
    """The grader's verdicts; a grader that raises fails every item with grade status `error`."""
    from autocode4math.grading import Grade

    try:
        return grader(items)
    except Exception as e:  # a broken grader is recorded per record (and stops the run by a health alarm)
        return [Grade(None, False, "error", f"{type(e).__name__}: {e}"[:500])] * len(items)


def _finish(done: list[tuple[int, _Trajectory]], sandbox: Any, grader: Callable) -> list[tuple[int, dict[str, Any]]]:
    _close_sessions(done, sandbox)
    if not done:
        return []
    grades = _grade([(t.response, t.request.problem.answer, t.request.problem.benchmark) for _, t in done], grader)
    return [(i, _record(t, g)) for (i, t), g in zip(done, grades, strict=True)]
