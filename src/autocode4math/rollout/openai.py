"""Backend for OpenAI-compatible /v1/completions servers (vLLM, SGLang, `transformers serve`), safe for training.

Token ids. Where the server offers it (vLLM's `return_token_ids`), the prompt goes in as the
engine's own token ids and the sampled ids come back, so a record holds exactly what the model
read and wrote (`tokens_from: server`). Otherwise the context goes in as text and the ids of the
answer come from the local tokenizer (`tokens_from: local`): the server tokenizes the context
itself, possibly differently at piece boundaries, so such records are flagged rather than
silently mixed into training data. `token_ids="auto"` asks each server once (a one-token probe).

Several servers. `base_url` may list several, comma-separated; each request goes to the one with
the fewest of this backend's requests in flight (at most `concurrency` per server), and a retry
goes to another server where there is one.

Failures. A 400/413/422 for one request (for example prompt + max_tokens over the context length)
ends that trajectory only: finish `length` when the server says the context is too long, `error`
otherwise, with the server's message. 401/403/404 (wrong key, model or URL) stop the run at once.
Connection failures, 408, 429 and 5xx are retried `retries` times with exponential backoff. With
streaming (the default) a live server sends its response headers at once, so a server that does
not answer within `first_byte_timeout_s` is given up on quickly: with the defaults a dead server
is reported within a minute (`ServerConfig.give_up_s`).

Servers differ in what they return at a stop string: vLLM and SGLang strip it and say which stop
matched (`stop_reason` / `matched_stop`), `transformers serve` keeps it in the text. Both are
normalised to "text ends with the stop string". A server that strips it without saying why it
stopped is read as stopping at the stop string when the text since the last output block ends
with a complete ```python block, and as EOS otherwise. Only the standard library is used.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from autocode4math.rollout.engine import (
    CODE_RE,
    Generation,
    GenerationRequest,
    SamplingParams,
    encode,
    finish_generation,
)

TOKEN_ID_MODES = ("auto", "server", "local")
CONTEXT_FULL = re.compile(r"context length|context window|maximum context|max_model_len|too long", re.IGNORECASE)
"""A refusal whose message matches this means prompt + max_tokens do not fit: the trajectory ends as `length`."""


@dataclass
class ServerConfig:
    """How the `openai` backend reaches its servers (one section shared by eval and train)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """The servers' /v1 URLs, comma-separated; each request goes to the least loaded."""
    tokenizer: str = ""
    """Local tokenizer (path or hub id) for prompts and text answers; "" means the model name."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable that holds the API key (the key itself never goes into a config file); "" for none."""
    concurrency: int = 16
    """Requests in flight per server."""
    token_ids: str = "auto"
    """server: token ids in and out (vLLM's return_token_ids), required; local: text in, local tokenizer on the
    answer; auto: server where the server supports it, else local."""
    stream: bool = True
    """Stream answers (server-sent events): a live server answers at once, so a dead one is found quickly."""
    connect_timeout_s: float = 10.0
    """Seconds to open a connection."""
    first_byte_timeout_s: float = 15.0
    """Seconds from sending a request to the response headers (without streaming: to the whole answer)."""
    read_timeout_s: float = 300.0
    """Longest silence while an answer streams in."""
    retries: int = 2
    """Further attempts after a connection failure, a timeout, 408, 429 or 5xx."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled for each further one."""

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("base_url must name at least one server URL")
        if self.concurrency < 1 or self.retries < 0:
            raise ValueError(f"concurrency must be >= 1 and retries >= 0, got {self.concurrency} and {self.retries}")
        if min(self.connect_timeout_s, self.first_byte_timeout_s, self.read_timeout_s) <= 0 or self.backoff_s < 0:
            raise ValueError("timeouts must be > 0 and backoff_s >= 0")
        if self.token_ids not in TOKEN_ID_MODES:
            raise ValueError(f"token_ids must be one of {TOKEN_ID_MODES}, got {self.token_ids!r}")

    @property
    def urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.base_url.split(",") if u.strip()]

    @property
    def give_up_s(self) -> float:
        """Longest wait before a server that never answers stops the run: each attempt ends at the connect timeout
        (nothing accepts) or at the first-byte timeout (a connection, no answer), then the backoffs."""
        wait = max(self.connect_timeout_s, self.first_byte_timeout_s)
        return (self.retries + 1) * wait + self.backoff_s * (2**self.retries - 1)


class ServerError(RuntimeError):
    """The servers cannot serve this run (unreachable, misconfigured, or failing after retries)."""


class _Retry(Exception):
    """A failure worth another attempt (connection, timeout, 408, 429, 5xx)."""


class _Refused(Exception):
    """The server refused this one request (400, 413, 422)."""


@dataclass
class _Endpoint:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    mode: str = ""
    """"server" or "local" once known."""

    def __post_init__(self) -> None:
        self.probe_lock = threading.Lock()


class OpenAIBackend:
    """Completions over HTTP, `concurrency` requests in flight per server; takes requests at any time (`submit`)."""

    def __init__(self, model: str, server: ServerConfig | None = None, *, tokenizer: Any = None) -> None:
        self.model, self.server = model, server or ServerConfig()
        if tokenizer is None or isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.server.tokenizer or model)
        self.tokenizer = tokenizer
        self.eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.api_key = os.environ.get(self.server.api_key_env, "") if self.server.api_key_env else ""
        self.endpoints = [_Endpoint(url) for url in self.server.urls]
        for e in self.endpoints:
            e.mode = "local" if self.server.token_ids == "local" else ""
        self._lock = threading.Lock()
        workers = self.server.concurrency * len(self.endpoints)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="openai")

    def submit(self, request: GenerationRequest, sampling: SamplingParams) -> Future[Generation]:
        return self._pool.submit(self._one, request, sampling)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        return [f.result() for f in [self.submit(r, sampling) for r in requests]]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ dispatch and retries

    def _one(self, request: GenerationRequest, sampling: SamplingParams) -> Generation:
        tried: set[str] = set()
        errors: list[str] = []
        for attempt in range(self.server.retries + 1):
            endpoint = self._acquire(tried)
            if endpoint.url in tried and attempt:
                time.sleep(self.server.backoff_s * 2 ** (attempt - 1))
            tried.add(endpoint.url)
            mode = ""
            try:
                mode = self._mode(endpoint)
                return self._complete(endpoint.url, mode, request, sampling)
            except _Refused as e:
                finish = "length" if CONTEXT_FULL.search(str(e)) else "error"
                return Generation([], "", finish, error=f"{endpoint.url}: {e}", tokens_from=_TOKENS_FROM[mode])
            except _Retry as e:
                errors.append(f"{endpoint.url}: {e}")
                endpoint.down_until = time.monotonic() + 5 * self.server.first_byte_timeout_s
            finally:
                self._release(endpoint)
        raise ServerError(f"no answer after {self.server.retries + 1} attempts: {'; '.join(errors)}")

    def _acquire(self, tried: set[str]) -> _Endpoint:
        """The least loaded server, preferring ones not tried for this request and not failing lately."""
        now = time.monotonic()
        with self._lock:
            fresh = [e for e in self.endpoints if e.url not in tried] or self.endpoints
            up = [e for e in fresh if e.down_until <= now] or fresh
            endpoint = min(up, key=lambda e: e.in_flight)
            endpoint.in_flight += 1
        return endpoint

    def _release(self, endpoint: _Endpoint) -> None:
        with self._lock:
            endpoint.in_flight -= 1

    def _mode(self, endpoint: _Endpoint) -> str:
        """server or local for this endpoint, decided once: unless told local, a one-token request with token ids
        asks whether the server returns them (required when told server)."""
        with endpoint.probe_lock:
            if not endpoint.mode:
                probe = {"model": self.model, "prompt": encode(self.tokenizer, "1") or [0], "max_tokens": 1,
                         "temperature": 0.0, "return_token_ids": True, "stream": self.server.stream}  # fmt: skip
                try:
                    answers_ids = isinstance(self._post(endpoint.url, probe).get("token_ids"), list)
                except _Refused:
                    answers_ids = False
                if self.server.token_ids == "server" and not answers_ids:
                    raise ServerError(
                        f"{endpoint.url} does not take and return token ids (vLLM's return_token_ids);"
                        " set token_ids=local or auto for this server"
                    )
                endpoint.mode = "server" if answers_ids else "local"
            return endpoint.mode

    # ------------------------------------------------------------ one completion

    def _complete(self, url: str, mode: str, request: GenerationRequest, sampling: SamplingParams) -> Generation:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": request.ids if mode == "server" else request.text,
            "max_tokens": request.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p if sampling.temperature > 0 else 1.0,
            "seed": request.seed,
            "stop": [sampling.stop],
            "n": 1,
            "stream": self.server.stream,
        }
        if mode == "server":
            body |= {"return_token_ids": True, "include_stop_str_in_output": True}
        choice = self._post(url, body)
        if mode == "local":
            return self._normalise(choice, sampling.stop, request.max_tokens)
        ids = choice.get("token_ids")
        if not isinstance(ids, list):
            raise ServerError(f"{url} returned no token ids; set token_ids=local for this server")
        return self._from_ids(ids, choice, sampling.stop, request.max_tokens)

    def _from_ids(self, ids: list[int], choice: dict[str, Any], stop: str, max_tokens: int) -> Generation:
        gen = finish_generation(ids, self.tokenizer, stop, max_tokens, self.eos_ids)
        stopped_on_token = choice.get("finish_reason") == "stop" and gen.finish != "stop"
        if stopped_on_token and not (gen.ids and gen.ids[-1] in self.eos_ids) and len(gen.ids) < max_tokens:
            reason = choice.get("stop_reason")
            end = reason if isinstance(reason, int) else self.tokenizer.eos_token_id
            gen.ids = gen.ids + ([end] if end is not None else [])
        gen.finish = "length" if choice.get("finish_reason") == "length" and gen.finish != "stop" else gen.finish
        gen.tokens_from = "server"
        return gen

    def _normalise(self, choice: dict[str, Any], stop: str, max_tokens: int) -> Generation:
        text = choice.get("text") or ""
        reason = choice.get("finish_reason")
        matched = choice.get("stop_reason", choice.get("matched_stop"))
        if stop in text:
            text, finish = text[: text.index(stop) + len(stop)], "stop"
        elif reason == "length":
            finish = "length"
        elif matched == stop or (matched is None and _ends_with_code(text, stop)):
            text, finish = text + stop, "stop"
        else:
            finish = "eos"
        ids = encode(self.tokenizer, text)
        if finish == "eos" and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if len(ids) > max_tokens:
            ids, finish = ids[:max_tokens], "length"
        return Generation(ids=ids, text=text, finish=finish, tokens_from="local")

    # ------------------------------------------------------------ HTTP

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST {url}/completions; the first choice (streamed pieces joined). Raises _Retry, _Refused, ServerError."""
        parts = urllib.parse.urlsplit(url + "/completions")
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname or "127.0.0.1", parts.port, timeout=self.server.connect_timeout_s)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.connect()
            sock = conn.sock  # the response keeps reading from it after `conn` lets go of it
            sock.settimeout(self.server.first_byte_timeout_s)
            conn.request("POST", parts.path, body=json.dumps(body).encode(), headers=headers)
            resp = conn.getresponse()
            sock.settimeout(self.server.read_timeout_s)
            if resp.status != 200:
                _raise_for(resp.status, resp.read(2000).decode("utf-8", "replace"), url)
            if "text/event-stream" in (resp.getheader("Content-Type") or ""):
                return _read_stream(resp)
            return _first_choice(json.loads(resp.read()))  # not streamed (asked for, or a server that does not stream)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise _Retry(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        finally:
            conn.close()


_TOKENS_FROM = {"server": "server", "local": "local", "": "local"}


def _raise_for(status: int, text: str, url: str) -> None:
    message = _error_message(text)
    if status in (400, 413, 422):
        raise _Refused(f"HTTP {status}: {message}")
    if status in (408, 429) or status >= 500:
        raise _Retry(f"HTTP {status}: {message}")
    raise ServerError(f"{url}: HTTP {status}: {message} (check the URL, the model name and the API key)")


def _error_message(text: str) -> str:
    try:
        payload = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    message = error.get("message", error.get("detail", error)) if isinstance(error, dict) else error
    return str(message)[:500]


def _first_choice(payload: Any) -> dict[str, Any]:
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise ValueError(f"no choices in the answer: {str(payload)[:200]}")
    return choices[0]


def _read_stream(resp: http.client.HTTPResponse) -> dict[str, Any]:
    """Join the choice pieces of a server-sent event stream (text, token_ids; the last finish/stop reason)."""
    text: list[str] = []
    ids: list[int] = []
    joined: dict[str, Any] = {}
    for line in resp:
        payload = line.strip()[5:].strip() if line.startswith(b"data:") else b""
        if not payload:
            continue
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if isinstance(chunk, dict) and chunk.get("error"):
            raise ValueError(f"the server failed while streaming: {_error_message(json.dumps(chunk))}")
        piece = _first_choice(chunk)
        text.append(piece.get("text") or "")
        ids += piece.get("token_ids") or []
        has_ids = "token_ids" in piece or "token_ids" in joined
        joined |= {k: v for k, v in piece.items() if v is not None}
        if has_ids:
            joined["token_ids"] = ids
    if not joined.get("finish_reason"):
        raise ValueError("the answer stream ended before the server said why it stopped")
    joined["text"] = "".join(text)
    return joined


def _ends_with_code(text: str, stop: str) -> bool:
    tail = text.rsplit(stop, 1)[-1]
    blocks = list(CODE_RE.finditer(tail))
    return bool(blocks) and not tail[blocks[-1].end() :].strip()
