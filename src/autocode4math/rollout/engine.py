"""Tool-integrated rollouts: generate, run the code block, insert its output, generate again.

Why token ids: training masks tool output out of the loss and reuses the exact tokens the model
sampled, so the engine keeps `prompt_ids`, `prefix_ids` and `response_ids` as produced, never
re-tokenizing a whole transcript. Tool-inserted text is tokenized on its own and appended with mask 0.
`response_tokens` replays a written response (an SFT demonstration) through the same appends, so
which tokens are trained is decided in one place for rollouts and fixed datasets alike.

Rounds are batched across trajectories: each round, every active trajectory asks the backend for
a continuation in one call, and every code block of the round runs in one `SandboxPool.run_many`
call. At most `max_active` trajectories are in flight; finished ones are replaced from the queue.

Deliberate simplifications:
- Only the last complete ```python block before a stop is executed (the one the output belongs to).
- The token budget counts every response token (model and tool), since both fill the context.
- One sampling seed per backend call on batched backends; per-request seeds on servers.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from autocode4math.prompts import MODES, PromptConfig, build_prompt

STOP = "```output"
CODE_RE = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
FINISH_REASONS = ("answer", "length", "round_limit")


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
    """Trajectories in flight at once (one backend call per round covers all of them)."""
    stop: str = STOP
    """Stop string that ends a code round; the tool output follows it."""

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
    """"stop" (stop string), "eos" (end of sequence) or "length" (max_tokens reached)."""


class Backend(Protocol):
    tokenizer: Any

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]: ...


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
        "n_prompt_tokens": len(t.prompt_ids),
        "n_generated_tokens": sum(t.mask),
        "pred": grade.pred,
        "correct": bool(grade.correct) and t.finish_reason != "length",
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
) -> list[dict[str, Any]]:
    """Run every request to completion; return records in request order.

    `sandbox` is a `SandboxPool` (one is opened and closed here when None); `grader` maps
    (response, gold, benchmark) triples to grades (default `grading.grade_many`). `on_record` is
    called with each record as soon as its trajectory is graded, for append-as-you-go files.
    """
    own_pool = sandbox is None
    if own_pool:
        from autocode4math.sandbox import SandboxPool

        sandbox = SandboxPool()
    try:
        return _run(
            backend, list(requests), config, on_record, progress, sandbox, grader or _default_grader, prompt_config
        )
    finally:
        if own_pool:
            sandbox.close()


def _run(
    backend: Backend,
    requests: list[RolloutRequest],
    config: RolloutConfig,
    on_record: Callable[[dict[str, Any]], None] | None,
    progress: bool,
    sandbox: Any,
    grader: Callable,
    prompt_config: PromptConfig | None,
) -> list[dict[str, Any]]:
    from autocode4math.rollout.progress import progress_bar

    sampling = SamplingParams(config.temperature, config.top_p, config.stop)
    records: list[dict[str, Any] | None] = [None] * len(requests)
    pending = list(enumerate(requests))[::-1]
    active: list[tuple[int, _Trajectory]] = []
    try:
        with progress_bar(len(requests), "rollouts", enabled=progress) as advance:
            while pending or active:
                while pending and len(active) < config.max_active:
                    i, req = pending.pop()
                    active.append((i, _start(backend.tokenizer, req, prompt_config)))
                gens = backend.generate([_generation_request(t, config) for _, t in active], sampling)
                if len(gens) != len(active):
                    raise RuntimeError(f"backend returned {len(gens)} generations for {len(active)} requests")
                codes = [_after_generation(t, g, config) for (_, t), g in zip(active, gens, strict=True)]
                _execute_round(active, codes, sandbox, backend.tokenizer, config)
                done = [(i, t) for i, t in active if t.finish_reason is not None]
                active = [(i, t) for i, t in active if t.finish_reason is None]
                for i, rec in _finish(done, sandbox, grader):
                    records[i] = rec
                    if on_record is not None:
                        on_record(rec)
                    advance(1)
    finally:
        _close_sessions(active, sandbox)
    return [r for r in records if r is not None]


def _close_sessions(items: list[tuple[int, _Trajectory]], sandbox: Any) -> None:
    from autocode4math.sandbox import SandboxError

    for _, t in items:
        if t.session is not None:
            with contextlib.suppress(SandboxError):  # a broken sandbox has nothing left to close
                sandbox.close_session(t.session)
            t.session = None


def _execute_round(
    active: list[tuple[int, _Trajectory]], codes: list[str | None], sandbox: Any, tokenizer: Any, config: RolloutConfig
) -> None:
    runs = [(t, code) for (_, t), code in zip(active, codes, strict=True) if code is not None]
    for (t, code), result in zip(runs, _run_code(runs, sandbox), strict=True):
        _insert_output(t, code, result, tokenizer, config)


def _run_code(runs: list[tuple[_Trajectory, str]], sandbox: Any) -> list[Any]:
    """Run the round's blocks, opening sessions as needed. When the sandbox itself fails (SandboxError),
    every block of the round gets status `sandbox_error` (the model sees the failure) instead of a crash."""
    from autocode4math.sandbox import ExecResult, SandboxError

    if not runs:
        return []
    try:
        for t, _ in runs:
            if t.session is None:
                t.session = sandbox.open_session()
        return sandbox.run_many([(t.session, code) for t, code in runs])
    except SandboxError as e:
        return [ExecResult("sandbox_error", "", f"SandboxError: {e}", 0.0)] * len(runs)


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
