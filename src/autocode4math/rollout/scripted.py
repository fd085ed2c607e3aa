"""A deterministic stand-in model: emits text chosen by a Python function, through the Backend protocol.

Tests (of this engine and of the E-step, M-step, evaluation) need a "model" whose output is known
exactly. The scripted backend tokenizes the text its responder returns and then behaves like a real
backend: it stops at the token that completes the stop string, ends with EOS when the scripted text
ends, and is cut at `max_tokens` with finish `length`. Because it shares `finish_generation` with the
HF backend, the engine sees the same kind of output from both.

What the responder sees is the full context text (prompt, prefix and response so far), so a script
can depend on the question, the mode's prefix, or how many tool outputs were inserted already.

`AsyncScriptedBackend` takes the same script through `submit`, as a server does: each request is
answered on a thread of its own after `latency(request)` seconds, so the engine runs asynchronously.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from autocode4math.rollout.engine import Generation, GenerationRequest, SamplingParams, encode, finish_generation

Responder = Callable[[str], str]


def by_rounds(turns: Sequence[str], marker: str = "```output") -> Responder:
    """Responder that emits `turns[k]` after k tool outputs (the last turn repeats)."""
    if not turns:
        raise ValueError("by_rounds needs at least one turn")

    def respond(context: str) -> str:
        return turns[min(context.count(marker), len(turns) - 1)]

    return respond


class ScriptedBackend:
    """Backend whose continuation of a context is `responder(context_text)`, tokenized.

    With `eos=True` a scripted text that ends without a stop string ends with the EOS token, like a
    model that finished its answer; with `eos=False` it ends with finish "eos" but no token (for
    tokenizers without one) unless it filled `max_tokens`, which reads as `length`.
    `calls` records the batch size of every generate call and `requests` every request, in order.
    """

    def __init__(self, tokenizer: Any, responder: Responder, eos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.responder = responder
        self.eos_id = tokenizer.eos_token_id if eos else None
        self.calls: list[int] = []
        self.requests: list[GenerationRequest] = []

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        self.calls.append(len(requests))
        self.requests += requests
        return [self._one(r, sampling) for r in requests]

    def _one(self, request: GenerationRequest, sampling: SamplingParams) -> Generation:
        ids = encode(self.tokenizer, self.responder(request.text))
        if self.eos_id is not None:
            ids.append(self.eos_id)
        eos_ids = {self.eos_id} if self.eos_id is not None else set()
        return finish_generation(ids, self.tokenizer, sampling.stop, request.max_tokens, eos_ids)


class AsyncScriptedBackend(ScriptedBackend):
    """The scripted model behind `submit`: answers after `latency(request)` seconds, many requests at once.

    `latency` may also block (e.g. on an event) to hold a request until a test has seen what it wants.
    `in_flight` / `max_in_flight` count submitted requests not yet answered.
    """

    def __init__(
        self,
        tokenizer: Any,
        responder: Responder,
        eos: bool = True,
        latency: Callable[[GenerationRequest], float | None] | None = None,
        workers: int = 64,
    ) -> None:
        super().__init__(tokenizer, responder, eos)
        self.latency = latency or (lambda request: 0.0)
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="scripted")

    def submit(self, request: GenerationRequest, sampling: SamplingParams) -> Future[Generation]:
        with self._lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return self._pool.submit(self._answer, request, sampling)

    def _answer(self, request: GenerationRequest, sampling: SamplingParams) -> Generation:
        try:
            time.sleep(self.latency(request) or 0.0)
            return self._one(request, sampling)
        finally:
            with self._lock:
                self.in_flight -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
