"""Isolated execution of model-written Python: one-shot runs, notebook-like sessions, a worker pool.

Model code is untrusted and runs millions of times during training, so this module is both a security
boundary and a hot path. A `SandboxPool` starts one *template* interpreter (sandbox_worker.py) that has
sympy, numpy and fractions imported; every session is forked from it (a fork, not an interpreter start),
then isolated in layers: its own session/process group and PID namespace (everything it starts dies
with it), a private network namespace, its own unprivileged uid, rlimits (memory, CPU, processes, file
size, no core files), Landlock (writes only in its scratch directory, no TCP, no signals out) and a
scrubbed environment. The layers a kernel refuses are replaced by weaker ones and reported in
`SandboxPool.layers`; docs/sandbox.md lists each layer, the threat it stops and what it needs.

What the caller gets: `ExecResult` with a status (`ok`, `error`, `timeout`, `memory`, `exited`, `killed`,
`crashed`, `dead`), capped output and the end of the traceback. Nothing the code does raises here;
only a broken sandbox (e.g. the template cannot start) raises `SandboxError`.

Deliberately simplified: only Python-level stdout/stderr are captured (not fd-level writes by C code or
subprocesses); no memory cgroup (the limit is RLIMIT_AS per process); reads of world-readable files stay
allowed (the interpreter needs its libraries).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from autocode4math.sandbox_worker import MAX_MSG

UID_BASE = 640_000  # session k runs as uid/gid UID_BASE + slot: no file on the machine is owned by it
_FATAL_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE, signal.SIGSYS}
_SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
             "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}  # fmt: skip


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code it ran): the template or a session could not start."""


@dataclass
class SandboxConfig:
    """Limits for every execution; the defaults suit math code (sympy, numpy) in a rollout."""

    timeout_s: float = 10.0
    """Wall-clock limit per code block; the session's whole process tree is SIGKILLed when it passes."""
    memory_mb: int = 1024
    """Address space the code may add on top of the preloaded template (RLIMIT_AS, per process)."""
    max_processes: int = 32
    """RLIMIT_NPROC for the session's uid: bounds a fork bomb (binding only with a per-session uid)."""
    file_size_mb: int = 64
    """Largest file the code may write (RLIMIT_FSIZE); bigger writes fail with OSError."""
    session_cpu_s: int = 600
    """Hard CPU-time cap of a session over all its blocks (RLIMIT_CPU); each block also gets a soft cap."""
    max_output_chars: int = 4000
    """Output kept per block: the first and last half of this, with a truncation marker between."""
    max_code_chars: int = 200_000
    """Longer code blocks are refused with status `error` without running."""
    namespaces: bool = True
    """Use network + PID namespaces when the kernel allows (turn off only to test the fallbacks)."""
    landlock: bool = True
    """Use Landlock when the kernel has it (turn off only to test the fallbacks)."""
    start_timeout_s: float = 30.0
    """How long to wait for the template (imports sympy/numpy) or a session to come up."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the code; nothing of the caller's environment is passed."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("memory_mb", "max_processes", "file_size_mb", "session_cpu_s", "max_output_chars"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"SandboxConfig.{name} must be a positive integer, got {getattr(self, name)!r}")


@dataclass
class ExecResult:
    """What one code block did. `error` is "" when `status` is ok."""

    status: str
    stdout: str
    error: str
    duration_s: float
    stderr: str = ""

    def feedback(self) -> str:
        """The text the model sees in the ```output block: stdout, then the error's last line."""
        parts = [self.stdout.rstrip("\n")] if self.stdout.strip() else []
        if self.status != "ok":
            lines = [ln for ln in self.error.splitlines() if ln.strip()]
            parts.append(lines[-1] if lines else self.status)
        return "\n".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def execute(code: str, config: SandboxConfig | None = None) -> ExecResult:
    """Run one block in a fresh isolated session (starts a template: ~1 s; use a pool for many)."""
    with SandboxPool(config, workers=1) as pool:
        session = pool.open_session()
        return pool.run(session, code)


class _Session:
    """The pool's handle on one session process (B in sandbox_worker's tree)."""

    def __init__(self, sid: str) -> None:
        self.id, self.lock = sid, threading.Lock()
        self.sock: socket.socket | None = None
        self.pidfd = -1
        self.slot: int | None = None
        self.scratch = ""
        self.blocks = 0
        self.dead = ""  # why the process is gone; "" while usable


class SandboxPool:
    """Sessions on a warm template, run in parallel by `workers` threads (default: one per CPU)."""

    def __init__(self, config: SandboxConfig | None = None, workers: int | None = None) -> None:
        self.config = config or SandboxConfig()
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers or os.cpu_count() or 1
        self.layers: list[str] = []
        self._root = os.getuid() == 0
        self._base = tempfile.mkdtemp(prefix="autocode-sandbox-")
        os.chmod(self._base, 0o711)
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count()
        self._free_slots: list[int] = []
        self._next_slot = itertools.count()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        self._template: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._start_template()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ public API

    def open_session(self) -> str:
        """A new notebook-like interpreter; its process starts lazily on the first run."""
        sid = f"s{next(self._ids)}"
        with self._lock:
            self._sessions[sid] = _Session(sid)
        return sid

    def run(self, session: str, code: str) -> ExecResult:
        """Run one block in `session`; later blocks see the names this one defines."""
        return self._run_block(self._get(session), code)

    def run_many(self, requests: Sequence[tuple[str, str]]) -> list[ExecResult]:
        """Run (session, code) pairs in parallel across sessions, in order within a session; results in order."""
        groups: dict[str, list[int]] = {}
        for i, (sid, _code) in enumerate(requests):
            self._get(sid)
            groups.setdefault(sid, []).append(i)
        results: list[ExecResult | None] = [None] * len(requests)

        def run_group(indices: list[int]) -> None:
            for i in indices:
                results[i] = self._run_block(self._get(requests[i][0]), requests[i][1])

        for future in [self._executor.submit(run_group, idx) for idx in groups.values()]:
            future.result()
        return [r for r in results if r is not None]

    def close_session(self, session: str) -> None:
        """Kill the session's processes and delete its scratch directory (unknown ids are ignored)."""
        with self._lock:
            sess = self._sessions.pop(session, None)
        if sess is not None:
            with sess.lock:
                self._stop(sess, "closed")

    def close(self) -> None:
        """Close every session, stop the template and remove the scratch directories."""
        for sid in list(self._sessions):
            self.close_session(sid)
        self._executor.shutdown(wait=True)
        self._stop_template()
        shutil.rmtree(self._base, ignore_errors=True)

    # ------------------------------------------------------------ template and session processes

    def _start_template(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(_SAFE_ENV, PYTHONPATH=src, PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "autocode4math.sandbox_worker", str(child.fileno())]
        self._template = subprocess.Popen(cmd, env=env, pass_fds=[child.fileno()], cwd=self._base,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
        child.close()
        self._ctl = parent
        msg = _recv(parent, self.config.start_timeout_s)
        if not msg or msg.get("t") != "template-ready":
            self._stop_template()
            raise SandboxError("the sandbox template did not start (see its stderr above)")

    def _stop_template(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._template is not None:
            try:
                self._template.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._template.kill()
                self._template.wait()
            self._template = None

    def _spawn(self, sess: _Session) -> None:
        """Fork the session from the template and wait until it reports its isolation layers."""
        with self._lock:
            sess.slot = self._free_slots.pop() if self._free_slots else next(self._next_slot)
        uid = UID_BASE + sess.slot if self._root else None
        sess.scratch = os.path.join(self._base, sess.id)
        os.mkdir(sess.scratch, 0o700)
        if uid is not None:
            os.chown(sess.scratch, uid, uid)
        spec = self._spec(sess.scratch, uid)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MSG)
        sess.sock = ours
        try:
            with self._lock:
                if self._template is None or self._template.poll() is not None:
                    raise SandboxError("the sandbox template has exited")
                socket.send_fds(self._ctl, [json.dumps(spec).encode()], [theirs.fileno()])
        finally:
            theirs.close()
        got: dict[str, dict] = {}  # the template's "hello" and the session's "ready" come in either order
        deadline = time.monotonic() + self.config.start_timeout_s
        while not ({"hello", "ready"} <= got.keys() or "fatal" in got or "exit" in got):
            msg = _recv(ours, deadline - time.monotonic())
            if msg is None:
                break
            got[str(msg.get("t"))] = msg
        if "hello" in got:
            sess.pidfd = os.pidfd_open(int(got["hello"]["pid"]))
        if "ready" not in got or "hello" not in got:
            self._stop(sess, "failed to start")
            raise SandboxError(f"a sandbox session failed to start: {got.get('fatal') or got}")
        self.layers = list(got["ready"].get("layers", []))

    def _spec(self, scratch: str, uid: int | None) -> dict:
        cfg = self.config
        env = dict(_SAFE_ENV, HOME=scratch, TMPDIR=scratch, MPLCONFIGDIR=scratch, **cfg.env)
        return {"scratch": scratch, "uid": uid, "memory_mb": cfg.memory_mb, "fsize_mb": cfg.file_size_mb,
                "max_processes": cfg.max_processes, "session_cpu_s": cfg.session_cpu_s, "env": env,
                "max_output_chars": cfg.max_output_chars, "namespaces": cfg.namespaces,
                "landlock": cfg.landlock}  # fmt: skip

    def _stop(self, sess: _Session, why: str) -> None:
        """SIGKILL the session (its PID namespace dies with it), wait for the template's report, clean up."""
        if sess.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(sess.pidfd, signal.SIGKILL)
            os.close(sess.pidfd)
            sess.pidfd = -1
        if sess.sock is not None:
            deadline = time.monotonic() + 5.0
            while not sess.dead and time.monotonic() < deadline:
                msg = _recv(sess.sock, deadline - time.monotonic())
                if msg is None or msg.get("t") == "exit":
                    break
            sess.sock.close()
            sess.sock = None
        sess.dead = sess.dead or why
        if sess.scratch:
            shutil.rmtree(sess.scratch, ignore_errors=True)
            sess.scratch = ""
        if sess.slot is not None:
            with self._lock:
                self._free_slots.append(sess.slot)
            sess.slot = None

    def _get(self, session: str) -> _Session:
        sess = self._sessions.get(session)
        if sess is None:
            raise KeyError(f"unknown sandbox session {session!r} (closed, or not opened with open_session())")
        return sess

    # ------------------------------------------------------------ one block

    def _run_block(self, sess: _Session, code: str) -> ExecResult:
        with sess.lock:
            if sess.dead:
                return ExecResult("dead", "", f"SessionDead: the session's interpreter is gone ({sess.dead})", 0.0)
            if len(code) > self.config.max_code_chars:
                msg = f"CodeTooLong: {len(code)} characters (limit {self.config.max_code_chars})"
                return ExecResult("error", "", msg, 0.0)
            if sess.sock is None:
                self._spawn(sess)
            sess.blocks += 1
            return self._exchange(sess, code, sess.blocks)

    def _exchange(self, sess: _Session, code: str, n: int) -> ExecResult:
        timeout = self.config.timeout_s
        start = time.monotonic()
        try:
            sess.sock.send(json.dumps({"code": code, "n": n, "timeout_s": timeout}).encode())
        except OSError:
            return self._died(sess, {"t": "exit", "code": None}, "", start)
        head: list[str] = []
        room = self.config.max_output_chars // 2
        while True:
            msg = _recv(sess.sock, start + timeout - time.monotonic())
            if msg is None or msg.get("t") == "exit":
                if msg is None and time.monotonic() - start >= timeout:
                    return self._timed_out(sess, "".join(head), start)
                return self._died(sess, msg or {"t": "exit", "code": None}, "".join(head), start)
            if msg.get("n") != n:
                continue  # a stray message from an earlier block (e.g. a thread it left printing)
            if msg.get("t") == "out" and room > 0:
                piece = str(msg.get("s", ""))[:room]
                head.append(piece)
                room -= len(piece)
            elif msg.get("t") == "done":
                return _finished(msg, "".join(head), self.config.max_output_chars)

    def _timed_out(self, sess: _Session, head: str, start: float) -> ExecResult:
        self._stop(sess, f"killed after exceeding the {self.config.timeout_s:g} s timeout")
        error = f"Timeout: execution exceeded {self.config.timeout_s:g} s"
        return ExecResult("timeout", _cut_marker(head, "killed at the timeout"), error, time.monotonic() - start)

    def _died(self, sess: _Session, msg: dict, head: str, start: float) -> ExecResult:
        code = msg.get("code")
        status, error = _classify_exit(code if isinstance(code, int) else None)
        self._stop(sess, error)
        return ExecResult(status, _cut_marker(head, "the process died"), error, time.monotonic() - start)


def _classify_exit(code: int | None) -> tuple[str, str]:
    """Status and reason for a session process that ended (code < 0: killed by that signal)."""
    if code is None:
        return "crashed", "Crashed: the sandbox process vanished"
    if code >= 0:
        return "crashed", f"Exited: the process exited with code {code} (os._exit or a fatal error)"
    sig = signal.Signals(-code)
    if sig == signal.SIGXCPU:
        return "timeout", "Timeout: CPU time limit exceeded"
    if sig in _FATAL_SIGNALS:
        return "crashed", f"Crashed: {signal.strsignal(sig)} ({sig.name})"
    return "killed", f"Killed: terminated by {sig.name}"


def _finished(msg: dict, head: str, max_chars: int) -> ExecResult:
    """Build the result of a completed block from its streamed head and the final message (untrusted)."""
    tail = str(msg.get("tail", ""))[-max(1, max_chars // 2) :]
    dropped = msg.get("dropped", 0) if isinstance(msg.get("dropped"), int) else 0
    mid = f"\n... [{dropped} characters truncated] ...\n" if dropped > 0 else ""
    status = str(msg.get("status", "error"))
    duration = msg.get("duration_s", 0.0)
    return ExecResult(status, head + mid + tail, str(msg.get("error", ""))[:4000],
                      float(duration) if isinstance(duration, (int, float)) else 0.0,
                      str(msg.get("stderr", ""))[:max_chars])  # fmt: skip


def _cut_marker(head: str, why: str) -> str:
    return f"{head}\n... [output cut: {why}]" if head else ""


def _recv(sock: socket.socket, timeout: float) -> dict | None:
    """One JSON message, or None on timeout / closed socket; invalid messages become {}."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if timeout <= 0 or not poller.poll(timeout * 1000):
        return None
    try:
        data = sock.recv(MAX_MSG)
    except OSError:
        return None
    if not data:
        return None
    try:
        msg = json.loads(data)
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}
