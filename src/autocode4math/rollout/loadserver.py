"""A local OpenAI-compatible /v1/completions server with a load model, for benchmarks and tests (stdlib only).

It answers with a scripted continuation (a `Responder`, as the scripted backend uses) and behaves
like vLLM's completions endpoint in what the engine relies on: prompts as text or token ids,
`return_token_ids`, `include_stop_str_in_output`, `stop_reason`, streaming as server-sent events
with the response headers sent at once, and a 400 when prompt plus `max_tokens` exceed
`max_model_len`.

Load model (a stand-in for a GPU server on a machine that has none; it measures no real engine):
a request holds one of `slots` slots for `base_s + prefill_s * prompt tokens + decode_s * output
tokens`; requests beyond `slots` queue. Wall time and occupancy of a client then follow what an
engine with that many concurrent sequences and those per-token costs would give.

Misbehaviour for tests: `refuse(prompt_text) -> (status, message) | None`, `fail_first` requests
answered 500, `hang` (accept and never answer), `token_ids=False` (a server that takes only text
prompts and returns no ids, like `transformers serve`), `streams=False` (answers in one JSON body even
when asked to stream).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from autocode4math.rollout.engine import encode, finish_generation

Responder = Callable[[str], str]


@dataclass
class LoadModel:
    """Per-request latency of the load model: base_s + prefill_s x prompt tokens + decode_s x output tokens."""

    slots: int = 64
    """Requests served at once; more wait for a free slot."""
    base_s: float = 0.0
    """Fixed seconds per request."""
    prefill_s: float = 0.0
    """Seconds per prompt token."""
    decode_s: float = 0.0
    """Seconds per generated token."""

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if min(self.base_s, self.prefill_s, self.decode_s) < 0:
            raise ValueError("base_s, prefill_s and decode_s must be >= 0")

    def seconds(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.base_s + self.prefill_s * prompt_tokens + self.decode_s * output_tokens


class LoadServer:
    """`with LoadServer(tokenizer, responder) as server:` serves on `server.url` (http://127.0.0.1:PORT/v1)."""

    def __init__(
        self,
        tokenizer: Any,
        responder: Responder,
        *,
        load: LoadModel | None = None,
        token_ids: bool = True,
        max_model_len: int | None = None,
        refuse: Callable[[str], tuple[int, str] | None] | None = None,
        fail_first: int = 0,
        hang: bool = False,
        streams: bool = True,
    ) -> None:
        self.tokenizer, self.responder = tokenizer, responder
        self.load = load or LoadModel()
        self.token_ids, self.max_model_len = token_ids, max_model_len
        self.refuse, self.fail_first, self.hang, self.streams = refuse, fail_first, hang, streams
        self.requests = 0
        """POSTs received."""
        self.seen: list[dict[str, Any]] = []
        """Every request: {"body": the JSON body, "authorization": its Authorization header}."""
        self.served = 0
        """Completions answered with 200."""
        self.busy = 0
        self.max_busy = 0
        self._busy_area = 0.0
        self._last = time.monotonic()
        self._started = self._last
        self._slots = threading.Semaphore(self.load.slots)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._http = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def slot_occupancy(self) -> float:
        """Time-weighted mean share of busy slots since the server started."""
        with self._lock:
            self._tick(0)
            wall = self._last - self._started
            return self._busy_area / (wall * self.load.slots) if wall > 0 else 0.0

    def close(self) -> None:
        self._stop.set()
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> LoadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tick(self, delta: int) -> None:
        now = time.monotonic()
        self._busy_area += self.busy * (now - self._last)
        self._last, self.busy = now, self.busy + delta
        self.max_busy = max(self.max_busy, self.busy)

    def check(self, body: dict[str, Any]) -> tuple[int, str, tuple[str, int, int]]:
        """Validate a request at once: (status, error message, (prompt text, prompt tokens, max_tokens))."""
        with self._lock:
            self.requests += 1
            failing = self.requests <= self.fail_first
        prompt = body.get("prompt")
        if failing:
            return 500, "injected server error", ("", 0, 0)
        if isinstance(prompt, list) and not self.token_ids:
            return 400, "prompt must be a string.", ("", 0, 0)
        if not isinstance(prompt, (str, list)) or not prompt:
            return 400, "prompt must be a non-empty string or list of token ids", ("", 0, 0)
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
        n_prompt = len(prompt) if isinstance(prompt, list) else len(encode(self.tokenizer, text))
        refused = self.refuse(text) if self.refuse else None
        if refused:
            return refused[0], refused[1], ("", 0, 0)
        max_tokens = int(body.get("max_tokens") or 16)
        if self.max_model_len is not None and n_prompt + max_tokens > self.max_model_len:
            msg = (
                f"This model's maximum context length is {self.max_model_len} tokens; the request asks for"
                f" {n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} to generate)."
            )
            return 400, msg, ("", 0, 0)
        return 200, "", (text, n_prompt, max_tokens)

    def answer(self, body: dict[str, Any], text: str, n_prompt: int, max_tokens: int) -> dict[str, Any]:
        """Generate the scripted continuation after the load model's latency; the completion choice."""
        stops = body.get("stop") or []
        stop = stops[0] if stops else "\0never"
        eos = self.tokenizer.eos_token_id
        raw = encode(self.tokenizer, self.responder(text)) + ([eos] if eos is not None else [])
        gen = finish_generation(raw, self.tokenizer, stop, max_tokens, {eos} if eos is not None else set())
        with self._slots:
            with self._lock:
                self._tick(1)
            try:
                self._stop.wait(self.load.seconds(n_prompt, len(gen.ids)))
            finally:
                with self._lock:
                    self._tick(-1)
        out = gen.text
        if gen.finish == "stop" and not body.get("include_stop_str_in_output"):
            out = out[: out.rindex(stop)]
        choice: dict[str, Any] = {
            "index": 0,
            "text": out,
            "finish_reason": "length" if gen.finish == "length" else "stop",
            "stop_reason": stop if gen.finish == "stop" else None,
        }
        if self.token_ids and body.get("return_token_ids"):
            choice["token_ids"] = gen.ids
        with self._lock:
            self.served += 1
        return choice


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (closed the connection) is expected here; anything else is reported."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(server: LoadServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            """Quiet: tests and benchmarks read the counters instead."""

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with server._lock:
                server.seen.append({"body": body, "authorization": self.headers.get("Authorization", "")})
            if server.hang:
                server._stop.wait()
                self.close_connection = True
                return
            status, message, job = server.check(body)
            if status != 200:
                self._send(status, {"error": {"message": message, "code": status}})
            elif body.get("stream") and server.streams:
                self._stream(body, job)
            else:
                choice = server.answer(body, *job)
                self._send(200, {"object": "text_completion", "model": body.get("model"), "choices": [choice]})

        def _stream(self, body: dict[str, Any], job: tuple[str, int, int]) -> None:
            """Headers at once (as vLLM sends them), then the text in one chunk and a final chunk with the reason."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            choice = server.answer(body, *job)
            final = {"index": 0, "text": "", "finish_reason": choice.pop("finish_reason"),
                     "stop_reason": choice.pop("stop_reason")}  # fmt: skip
            for piece in ({**choice, "finish_reason": None}, final):
                self.wfile.write(f"data: {json.dumps({'choices': [piece]})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
