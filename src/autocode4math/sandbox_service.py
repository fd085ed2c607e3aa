"""The sandbox as a service: `autocode sandbox serve` puts a SandboxPool behind HTTP; `RemoteSandbox` uses one.

Why: rollout workers on GPU nodes can run code on CPU nodes (`--set sandbox.url=http://cpu-node:8100`),
and frameworks that already speak the SandboxFusion API (verl's sandbox tool, others) can use this
hardened sandbox unchanged. The server is built on the standard library's `http.server` (threads, JSON):
the API is five small endpoints, and a runtime command should not need the dev extra's fastapi/uvicorn.

Endpoints (JSON in, JSON out; docs/sandbox.md has the field tables):
  POST /run_code                   SandboxFusion's request and response shape; a fresh session per request,
                                   or the stateful session named by the extra field `session`.
  POST /sessions/<id>/run          one block in session <id> (created on first use): an ExecResult.
  POST /run_many                   {"requests": [[id, code], ...]}: ExecResults, parallel across sessions.
  DELETE /sessions/<id>            close a session.
  GET /health                      status, isolation layers, limits, open sessions.

Every request is untrusted: bodies need a Content-Length and are capped, fields are type-checked, and
a bad request gets a 4xx JSON `{"error": ...}` without touching the pool. Concurrency is bounded: at
most `max_inflight` blocks run at once (others wait, then get 503), at most `max_sessions` stateful
sessions exist, and a session idle for `session_idle_s` is closed.

Deliberately simplified: python only; no authentication or TLS (bind to a private network or localhost,
or put it behind a proxy); `fetch_files` and `memory_limit_MB` of SandboxFusion are not supported (the
server's own limits apply).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import dataclasses
import http.client
import json
import math
import re
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from autocode4math.sandbox import STATUSES, ExecResult, SandboxConfig, SandboxError, SandboxPool, clean_text

LANGUAGES = ("python", "python3")
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class BadRequest(ValueError):
    """A request the server refuses (answered with HTTP 400 and its message)."""


@dataclass
class ServeConfig:
    """`autocode sandbox serve`: where to listen, request limits, and the pool's sandbox limits."""

    host: str = "127.0.0.1"
    """Address to bind (the server has no authentication: keep it on localhost or a private network)."""
    port: int = 8100
    """TCP port (0: any free port, printed at start)."""
    max_body_mb: float = 8.0
    """Largest request body; a bigger one is refused with 413 before it is read."""
    max_inflight: int = 0
    """Blocks running at once over all requests (0: 4 per pool worker); more wait, then get 503."""
    max_sessions: int = 1024
    """Stateful sessions open at once."""
    session_idle_s: float = 900.0
    """A stateful session unused for this long is closed (its client may have died)."""
    max_timeout_s: float = 60.0
    """Largest per-request `run_timeout` a client may ask for."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sandbox, dict):
            self.sandbox = SandboxConfig(**self.sandbox)
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ValueError(f"port must be 0..65535, got {self.port!r}")
        for name in ("max_body_mb", "session_idle_s", "max_timeout_s"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("max_inflight", "max_sessions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (name == "max_sessions"):
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.sandbox.url:
            raise ValueError("sandbox.url must be empty for the server: it runs the code itself")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


# ---------------------------------------------------------------- the server


class SandboxService:
    """The pool, the stateful sessions of remote clients, and the request handlers' logic (no HTTP here)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.pool = SandboxPool(config.sandbox)
        probe = self.pool.open_session()  # proves the sandbox works before any client relies on it
        result = self.pool.run(probe, "pass")
        self.pool.close_session(probe)
        if result.status != "ok":
            self.pool.close()
            raise SandboxError(f"the sandbox does not work here: {result.error}")
        self._slots = threading.BoundedSemaphore(config.max_inflight or 4 * self.pool.workers)
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, float]] = {}  # client id -> (pool session, last use)
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()  # closed ids -> why
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._expire_loop, daemon=True, name="sandbox-expiry")
        self._reaper.start()

    def close(self) -> None:
        self._stop.set()
        self.pool.close()

    # ------------------------------------------------------------ endpoints

    def run_code(self, body: dict) -> dict:
        """POST /run_code: SandboxFusion's request in, its response out."""
        code = _field(body, "code", str)
        language = _field(body, "language", str, "python")
        if language not in LANGUAGES:
            raise BadRequest(f"unsupported language {language[:40]!r}: this sandbox runs {' or '.join(LANGUAGES)}")
        if _field(body, "fetch_files", list, []):
            raise BadRequest("fetch_files is not supported by this sandbox")
        timeout = _field(body, "run_timeout", (int, float), self.config.sandbox.timeout_s)
        if not _positive(timeout):
            raise BadRequest(f"run_timeout must be a positive number, got {timeout!r}")
        options = {"timeout_s": min(float(timeout), self.config.max_timeout_s), "script": True,
                   "stdin": _field(body, "stdin", (str, type(None)), None), "files": _files(body)}  # fmt: skip
        session = _field(body, "session", (str, type(None)), None)
        if session is None:
            sid = self.pool.open_session()
            try:
                result = self._run(sid, code, options)
            finally:
                self.pool.close_session(sid)
        else:
            result = self.run_in_session(session, {**body, "script": True, "timeout_s": options["timeout_s"]})
        return fusion_response(result)

    def run_in_session(self, session: str, body: dict) -> ExecResult:
        """POST /sessions/<id>/run: one block in a stateful session."""
        code = _field(body, "code", str)
        timeout = _field(body, "timeout_s", (int, float, type(None)), None)
        if timeout is not None and not _positive(timeout):
            raise BadRequest(f"timeout_s must be a positive number, got {timeout!r}")
        options = {"timeout_s": min(float(timeout or self.config.sandbox.timeout_s), self.config.max_timeout_s),
                   "stdin": _field(body, "stdin", (str, type(None)), None), "files": _files(body),
                   "script": bool(_field(body, "script", bool, False))}  # fmt: skip
        sid = self._session(session)
        if isinstance(sid, ExecResult):
            return sid
        return self._run(sid, code, options)

    def run_many(self, body: dict) -> list[ExecResult]:
        """POST /run_many: [[session, code], ...] in parallel across sessions, in order within one."""
        requests = _field(body, "requests", list)
        if not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in requests):
            raise BadRequest("requests must be a list of [session, code] pairs of strings")
        results: list[ExecResult | None] = [None] * len(requests)
        todo = []
        for i, (session, code) in enumerate(requests):
            sid = self._session(session)
            if isinstance(sid, ExecResult):
                results[i] = sid
            else:
                todo.append((i, sid, code))
        with self._slots:
            done = self.pool.run_many([(sid, code) for _, sid, code in todo])
        for (i, _, _), result in zip(todo, done, strict=True):
            results[i] = result
        return [r for r in results if r is not None]

    def close_session(self, session: str) -> None:
        """DELETE /sessions/<id>."""
        with self._lock:
            entry = self._sessions.pop(session, None)
            self._remember_gone(session, "closed by its client")
        if entry is not None:
            self.pool.close_session(entry[0])

    def health(self) -> dict:
        with self._lock:
            open_sessions = len(self._sessions)
        return {"status": "ok", "layers": self.pool.layers, "sessions": open_sessions, "workers": self.pool.workers,
                "limits": dataclasses.asdict(self.config.sandbox)}  # fmt: skip

    # ------------------------------------------------------------ internals

    def _run(self, sid: str, code: str, options: dict) -> ExecResult:
        if not self._slots.acquire(timeout=2 * self.config.max_timeout_s):
            return ExecResult("sandbox_error", "", "SandboxError: the sandbox server is saturated", 0.0)
        try:
            return self.pool.run(sid, code, **options)
        finally:
            self._slots.release()

    def _session(self, session: str) -> str | ExecResult:
        """The pool session of a client's id (opened on first use), or the result saying why there is none."""
        if not isinstance(session, str) or not _SESSION_ID.match(session):
            raise BadRequest("a session id is 1-64 characters of letters, digits, '-' and '_'")
        with self._lock:
            if session in self._gone:
                return ExecResult("dead", "", f"SessionDead: the session was {self._gone[session]}", 0.0)
            if session not in self._sessions:
                if len(self._sessions) >= self.config.max_sessions:
                    msg = f"SandboxError: the server holds its maximum of {self.config.max_sessions} sessions"
                    return ExecResult("sandbox_error", "", msg, 0.0)
                self._sessions[session] = (self.pool.open_session(), time.monotonic())
            sid = self._sessions[session][0]
            self._sessions[session] = (sid, time.monotonic())
        return sid

    def _remember_gone(self, session: str, why: str) -> None:
        self._gone[session] = why
        while len(self._gone) > 100_000:
            self._gone.popitem(last=False)

    def _expire_loop(self) -> None:
        while not self._stop.wait(min(30.0, self.config.session_idle_s / 4)):
            cutoff = time.monotonic() - self.config.session_idle_s
            with self._lock:
                idle = [(cid, sid) for cid, (sid, used) in self._sessions.items() if used < cutoff]
                for cid, _sid in idle:
                    del self._sessions[cid]
                    self._remember_gone(cid, f"closed after {self.config.session_idle_s:g} s without use")
            for _cid, sid in idle:
                self.pool.close_session(sid)


def _field(body: dict, name: str, kind: Any, default: Any = ...) -> Any:
    """A typed field of a request body; BadRequest when missing (without a default) or mistyped."""
    if name not in body or (body[name] is None and default is not ...):
        if default is ...:
            raise BadRequest(f"missing field {name!r}")
        return default
    value = body[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _files(body: dict) -> dict[str, str]:
    """The request's `files` ({relative path: base64 or null}), checked."""
    files = _field(body, "files", dict, {})
    for name, content in files.items():
        parts = name.replace("\\", "/").split("/")
        if not name or name.startswith("/") or ".." in parts:
            raise BadRequest(f"file name {name[:80]!r} must be a relative path inside the working directory")
        if content is not None:
            if not isinstance(content, str):
                raise BadRequest(f"file {name[:80]!r}: content must be base64 text or null")
            try:
                base64.b64decode(content, validate=True)
            except binascii.Error:
                raise BadRequest(f"file {name[:80]!r}: content is not valid base64") from None
    return {name: content or "" for name, content in files.items()}


def fusion_response(result: ExecResult) -> dict:
    """SandboxFusion's /run_code response for one block's result."""
    if result.status == "sandbox_error":
        run = {"status": "Error", "execution_time": result.duration_s, "return_code": None,
               "stdout": result.stdout, "stderr": result.error}  # fmt: skip
        return _fusion("SandboxError", result.error, run)
    code = _return_code(result)
    message = result.error.removeprefix("SystemExit: ") if result.status == "exited" else result.error
    stderr = result.stderr + (message + "\n" if message and message != "None" and code != 0 else "")
    if result.status == "exited" and re.fullmatch(r"-?\d{1,9}", message):
        stderr = result.stderr  # sys.exit(3) prints nothing
    status = "TimeLimitExceeded" if result.status == "timeout" else "Finished"
    run = {"status": status, "execution_time": result.duration_s, "return_code": None if status != "Finished" else code,
           "stdout": result.stdout, "stderr": stderr}  # fmt: skip
    return _fusion("Success" if status == "Finished" and code == 0 else "Failed", "", run)


def _fusion(status: str, message: str, run: dict) -> dict:
    return {"status": status, "message": message, "compile_result": None, "run_result": run,
            "executor_pod_name": None, "files": {}}  # fmt: skip


def _return_code(result: ExecResult) -> int:
    """The exit code a `python script.py` run would have had (sys.exit's argument; 1 for an error)."""
    if result.status == "ok":
        return 0
    if result.status == "exited":
        arg = result.error.removeprefix("SystemExit: ")
        return 0 if arg == "None" else int(arg) if re.fullmatch(r"-?\d{1,9}", arg) else 1
    return 1


class _Handler(BaseHTTPRequestHandler):
    """HTTP glue: parse and bound the request, call SandboxService, answer JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "autocode-sandbox"
    timeout = 120  # seconds a connection may sit idle or trickle its request

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/health":
            self._answer(200, self.server.service.health())
        else:
            self._answer(404, {"error": f"no such endpoint: GET {self.path[:100]}"})

    def do_DELETE(self) -> None:  # noqa: N802
        session = self._session_path(run=False)
        if session is None:
            self._answer(404, {"error": f"no such endpoint: DELETE {self.path[:100]}"})
        else:
            self.server.service.close_session(session)
            self._answer(200, {"closed": session})

    def do_POST(self) -> None:  # noqa: N802
        service: SandboxService = self.server.service
        body = self._body()
        if body is None:
            return
        try:
            if self.path == "/run_code":
                self._answer(200, service.run_code(body))
            elif self.path == "/run_many":
                self._answer(200, {"results": [r.to_dict() for r in service.run_many(body)]})
            elif (session := self._session_path(run=True)) is not None:
                self._answer(200, service.run_in_session(session, body).to_dict())
            else:
                self._answer(404, {"error": f"no such endpoint: POST {self.path[:100]}"})
        except BadRequest as e:
            self._answer(400, {"error": str(e)})

    def _session_path(self, run: bool) -> str | None:
        match = re.fullmatch(r"/sessions/([^/]+)" + ("/run" if run else ""), self.path)
        return urllib.parse.unquote(match.group(1)) if match else None

    def _body(self) -> dict | None:
        """The JSON object of the request, or None after answering the error (bodies are capped)."""
        if self.headers.get("Transfer-Encoding"):
            self._answer(411, {"error": "send the body with a Content-Length, not chunked"}, close=True)
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(411, {"error": "a Content-Length header is required"}, close=True)
            return None
        limit = int(self.server.service.config.max_body_mb * 2**20)
        if not 0 <= length <= limit:
            self._answer(413, {"error": f"the body is {length} bytes; the limit is {limit}"}, close=True)
            return None
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, RecursionError):
            self._answer(400, {"error": "the body is not valid JSON"})
            return None
        if not isinstance(body, dict):
            self._answer(400, {"error": "the body must be a JSON object"})
            return None
        return body

    def _answer(self, code: int, payload: dict, close: bool = False) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8", "replace")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Quiet: one line per request would swamp a rollout's log."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, service: SandboxService) -> None:
        self.service = service
        super().__init__((service.config.host, service.config.port), _Handler)


def start_server(config: ServeConfig) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start serving in a background thread; the server's `server_address` has the bound port."""
    service = SandboxService(config)
    try:
        server = _Server(service)
    except OSError:
        service.close()
        raise
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="sandbox-http")
    thread.start()
    return server, thread


def stop_server(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()
    server.service.close()


# ---------------------------------------------------------------- the client


class RemoteSandbox:
    """SandboxPool's interface over HTTP (open_session, run, run_many, close_session, close; thread-safe).

    Session ids are made here (the server opens a session on its first block), so opening never fails;
    a network or server failure is the block's `sandbox_error` result, as with a local pool.
    """

    def __init__(self, config: SandboxConfig) -> None:
        if not config.url:
            raise ValueError("RemoteSandbox needs SandboxConfig.url")
        self.config = config
        parsed = urllib.parse.urlsplit(config.url)
        self._https = parsed.scheme == "https"
        self._netloc = parsed.netloc
        self._prefix = parsed.path.rstrip("/")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[str] = set()
        self._layers: list[str] | None = None

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def layers(self) -> list[str]:
        """The server's isolation layers ([] when it cannot be reached)."""
        if self._layers is None:
            try:
                self._layers = list(self._call("GET", "/health", None, 10.0)["layers"])
            except (OSError, ValueError, KeyError, TypeError):
                return []
        return self._layers

    def open_session(self) -> str:
        sid = "r" + uuid.uuid4().hex
        with self._lock:
            self._open.add(sid)
        return sid

    def run(self, session: str, code: str, *, timeout_s: float | None = None, stdin: str | None = None,
            files: dict[str, str] | None = None, script: bool = False) -> ExecResult:  # fmt: skip
        """Run one block in `session` on the server (KeyError for an unknown or closed session)."""
        self._check(session)
        body = {"code": code, "timeout_s": timeout_s, "stdin": stdin, "files": files or {}, "script": script}
        start = time.monotonic()
        try:
            answer = self._call("POST", f"/sessions/{session}/run", body, self._wait(timeout_s))
            return _result(answer)
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as e:
            return _failed(e, time.monotonic() - start)

    def run_many(self, requests: list[tuple[str, str]]) -> list[ExecResult]:
        """Run (session, code) pairs on the server in one request; results in order."""
        for session, _code in requests:
            self._check(session)
        if not requests:
            return []
        start = time.monotonic()
        try:
            answer = self._call(
                "POST", "/run_many", {"requests": [list(r) for r in requests]}, self._wait(None, n=len(requests))
            )
            results = [_result(r) for r in answer["results"]]
            if len(results) != len(requests):
                raise ValueError(f"the server answered {len(results)} results for {len(requests)} blocks")
            return results
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as e:
            return [_failed(e, time.monotonic() - start) for _ in requests]

    def close_session(self, session: str) -> None:
        with self._lock:
            if session not in self._open:
                return
            self._open.discard(session)
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):  # else closed once idle
            self._call("DELETE", f"/sessions/{session}", None, 10.0)

    def close(self) -> None:
        with self._lock:
            sessions = list(self._open)
        for session in sessions:
            self.close_session(session)

    def _check(self, session: str) -> None:
        with self._lock:
            if session not in self._open:
                raise KeyError(f"unknown sandbox session {session!r} (closed, or not opened with open_session())")

    def _wait(self, timeout_s: float | None, n: int = 1) -> float:
        """How long to wait for an answer: the blocks' time limits plus a margin for queueing."""
        return 30.0 + n * float(timeout_s or self.config.timeout_s)

    def _call(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        """One request on this thread's keep-alive connection (one reconnect if it was dropped)."""
        data = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in range(2):
            conn = self._connection(timeout)
            reused = conn.sock is not None
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._local.conn = None
                # a kept-alive connection the server closed meanwhile never got the request: send it again
                stale = reused and isinstance(
                    e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
                )
                if attempt or not stale:
                    raise
                continue
            if response.status != 200:
                message = _error_message(payload)
                raise ValueError(f"the sandbox server answered HTTP {response.status}: {message}")
            answer = json.loads(payload)
            if not isinstance(answer, dict):
                raise ValueError("the sandbox server answered something other than a JSON object")
            return answer
        raise OSError("unreachable")

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._local.conn = cls(self._netloc, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn


def _error_message(payload: bytes) -> str:
    try:
        return str(json.loads(payload).get("error", ""))[:300]
    except (ValueError, AttributeError):
        return payload[:300].decode("utf-8", "replace")


def _result(answer: Any) -> ExecResult:
    """An ExecResult from the server's JSON (checked: the network is not trusted either)."""
    if not isinstance(answer, dict) or answer.get("status") not in STATUSES:
        raise ValueError("the sandbox server sent a malformed result")
    texts = [answer.get(k, "") for k in ("stdout", "error", "stderr")]
    duration = answer.get("duration_s", 0.0)
    if not all(isinstance(t, str) for t in texts) or not _positive(duration) and duration != 0:
        raise ValueError("the sandbox server sent a malformed result")
    return ExecResult(
        answer["status"], clean_text(texts[0]), clean_text(texts[1]), float(duration), clean_text(texts[2])
    )


def _failed(error: Exception, duration: float) -> ExecResult:
    return ExecResult("sandbox_error", "", f"SandboxError: remote sandbox failed: {error}", duration)
