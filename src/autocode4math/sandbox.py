"""Isolated execution of model-written Python: one-shot runs, notebook-like sessions, a worker pool.

Model code is untrusted and runs millions of times during training, so this module is both a security
boundary and a hot path. A `SandboxPool` starts one *template* interpreter (sandbox_worker.py) that has
sympy, numpy and fractions imported; every session is forked from it (a fork, not an interpreter start),
then isolated in layers (sandbox_layers.py): its own PID, network, IPC and mount namespaces, a read-only
view of the host with a private, size-capped /tmp, a memory cgroup for the session as a whole, a uid
leased machine-wide (sandbox_host.py), rlimits, seccomp, Landlock and a scrubbed environment. The layers
a kernel refuses are replaced by weaker ones and reported in `SandboxPool.layers`; docs/sandbox.md lists
each layer, the threat it stops and what it needs.

What the caller gets: `ExecResult` with a status (`ok`, `error`, `timeout`, `memory`, `exited`, `killed`,
`crashed`, `dead`, `sandbox_error`), capped output that is valid UTF-8, and the end of the traceback.
Nothing the code does raises here, and a failure of the sandbox itself (a session that cannot start,
a session that breaks the message protocol) is the block's `sandbox_error` result, not an exception.
Everything a session sends is validated as untrusted input (sandbox_protocol); one session can neither crash
the pool nor slow other sessions. The pool is thread-safe: any thread may open, run and close sessions.

Throughput: sessions are forked ahead of need (`prefork`) so their set-up overlaps other sessions'
code, and closing a session only sends SIGKILL; the exit is collected later, when its slot is reused.

Deliberately simplified: only Python-level stdout/stderr are captured (not fd-level writes by C code or
subprocesses); reads of world-readable files stay allowed (the interpreter needs its libraries).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
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
from typing import Any

from autocode4math.sandbox_host import UID_BASE, MemoryCgroups, UidLeases, remove_tree, scratch_root
from autocode4math.sandbox_host import sweep_stale_scratch as _sweep_stale_scratch
from autocode4math.sandbox_protocol import MAX_FRAME, ProtocolError, parse_frame, poll, recv, send_before

__all__ = ["UID_BASE", "ExecResult", "SandboxConfig", "SandboxError", "SandboxPool", "execute", "open_sandbox"]

STATUSES = ("ok", "error", "timeout", "memory", "exited", "killed", "crashed", "dead", "sandbox_error")
"""Every status a block can end with (see docs/sandbox.md); `sandbox_error` means the sandbox failed, not the code."""
SESSION_MEMORY_SLACK_MB = 64
"""A session's memory cgroup holds memory_mb + scratch_mb + this (its copies of the template's pages)."""
_FATAL_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE, signal.SIGSYS}
_SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
             "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}  # fmt: skip
_SURROGATES = re.compile("[\ud800-\udfff]")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code it ran): the template or a session could not start."""


@dataclass
class SandboxConfig:
    """Limits for every execution and where it runs; the defaults suit math code (sympy, numpy) in a rollout."""

    timeout_s: float = 10.0
    """Wall-clock limit per code block; the session's whole process tree is SIGKILLed when it passes."""
    memory_mb: int = 1024
    """Address space the code may add on top of the preloaded template (RLIMIT_AS, per process)."""
    max_processes: int = 32
    """RLIMIT_NPROC for the session's uid: bounds a fork bomb (binding only with a per-session uid)."""
    file_size_mb: int = 64
    """Largest file the code may write (RLIMIT_FSIZE); bigger writes fail with OSError."""
    scratch_mb: int = 256
    """Total size of the session's private /tmp (its working directory), a tmpfs counted in its memory."""
    scratch_files: int = 20_000
    """Files and directories the session's private /tmp may hold."""
    session_cpu_s: int = 600
    """Hard CPU-time cap of a session over all its blocks (RLIMIT_CPU); each block also gets a soft cap."""
    max_output_chars: int = 4000
    """Output kept per block: the first and last half of this, with a truncation marker between."""
    max_code_chars: int = 200_000
    """Longer code blocks are refused with status `error` without running."""
    workers: int = 0
    """Blocks of different sessions run in parallel by `run_many` (0: one per CPU)."""
    prefork: int = 2
    """Sessions forked and isolated ahead of need, so their start-up overlaps other code (0: none)."""
    url: str = ""
    """A sandbox server (`autocode sandbox serve`) to run code on instead of a local pool, e.g. http://host:8100."""
    namespaces: bool = True
    """Use PID, network, IPC and mount namespaces when the kernel allows (turn off only to test the fallbacks)."""
    landlock: bool = True
    """Use Landlock when the kernel has it (turn off only to test the fallbacks)."""
    start_timeout_s: float = 30.0
    """How long to wait for the template (imports sympy/numpy) or a session to come up."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the code; nothing of the caller's environment is passed."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "start_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"SandboxConfig.{name} must be a positive number of seconds, got {value!r}")
        positive = ("memory_mb", "max_processes", "file_size_mb", "scratch_mb", "scratch_files", "session_cpu_s",
                    "max_output_chars", "max_code_chars")  # fmt: skip
        for name in positive:
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"SandboxConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("workers", "prefork"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"SandboxConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.url, str) or (self.url and not re.match(r"^https?://[^/\s]+", self.url)):
            raise ValueError(f"SandboxConfig.url must be empty or an http(s)://host[:port] URL, got {self.url!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ExecResult:
    """What one code block did. `error` is "" when `status` is ok; `duration_s` is measured by the pool."""

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


def clean_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD, so it always encodes as UTF-8."""
    return _SURROGATES.sub("\ufffd", text)


def execute(code: str, config: SandboxConfig | None = None) -> ExecResult:
    """Run one block in a fresh isolated session (starts a template: ~1 s; use a pool for many)."""
    with SandboxPool(dataclasses.replace(config or SandboxConfig(), prefork=0), workers=1) as pool:
        session = pool.open_session()
        return pool.run(session, code)


def open_sandbox(config: SandboxConfig | None = None) -> Any:
    """The sandbox a command runs code in: a local `SandboxPool`, or a `RemoteSandbox` when `config.url` is set.

    Both have the same interface (open_session, run, run_many, close_session, close, layers).
    """
    config = config or SandboxConfig()
    if config.url:
        from autocode4math.sandbox_service import RemoteSandbox

        return RemoteSandbox(config)
    return SandboxPool(config)


@dataclass
class _Slot:
    """What a session runs as: a uid leased machine-wide (None when not root), its cgroup and scratch dir."""

    uid: int | None
    scratch: str
    cgroup: str = ""
    oom_kills: int = 0
    fresh: bool = True
    """Not yet used by this pool: the template first kills whatever a previous holder of the uid left."""


class _Proc:
    """One session process B: the data socket to it, the report socket from the template, its pidfd."""

    def __init__(self, slot: _Slot, data: socket.socket, report: socket.socket) -> None:
        self.slot, self.data, self.report = slot, data, report
        self.pid, self.pidfd = 0, -1
        self.layers: list[str] | None = None
        self.exit: int | None = None
        self.exited = False  # the template reported the exit (or is gone)
        self.abandoned = False  # killed (or to be killed as soon as its pid is known)


class _Session:
    """A session id's state: its process (started lazily), its block count, and why it is dead."""

    def __init__(self, sid: str) -> None:
        self.id, self.lock = sid, threading.Lock()
        self.proc: _Proc | None = None
        self.blocks = 0
        self.dead = ""  # why the process is gone; "" while usable


class SandboxPool:
    """Sessions on a warm template, run in parallel by `workers` threads (default: config.workers or one per CPU)."""

    def __init__(self, config: SandboxConfig | None = None, workers: int | None = None) -> None:
        self.config = config or SandboxConfig()
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers or self.config.workers or os.cpu_count() or 1
        self.layers: list[str] = []
        self._root = os.geteuid() == 0
        self._base = tempfile.mkdtemp(prefix="autocode-sandbox-")
        os.chmod(self._base, 0o711)
        self._leases = UidLeases() if self._root else None
        self._cgroups = MemoryCgroups()
        if self._leases is not None:
            _sweep_stale_scratch(self._leases)
            self._cgroups.sweep(self._leases)
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._warm: collections.deque[_Proc] = collections.deque()
        self._closing: list[_Proc] = []
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        self._template: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._closed = False
        try:
            with self._lock:
                self._start_template()
        except BaseException:
            self.close()
            raise
        self._refill()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ public API

    def open_session(self) -> str:
        """A new notebook-like interpreter; its process starts lazily on the first run."""
        with self._lock:
            sid = f"s{next(self._ids)}"
            self._sessions[sid] = _Session(sid)
        return sid

    def run(
        self,
        session: str,
        code: str,
        *,
        timeout_s: float | None = None,
        stdin: str | None = None,
        files: dict[str, str] | None = None,
        script: bool = False,
    ) -> ExecResult:
        """Run one block in `session`; later blocks see the names this one defines.

        `timeout_s` overrides config.timeout_s for this block; `stdin` is what input() reads; `files`
        ({relative path: base64}) are written to the working directory first; `script` turns off the
        notebook echo of a final bare expression.
        """
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < math.inf):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        options = {"timeout_s": timeout_s or self.config.timeout_s, "stdin": stdin, "files": files or {},
                   "script": script}  # fmt: skip
        return self._run_block(self._get(session), code, options)

    def run_many(self, requests: Sequence[tuple[str, str]]) -> list[ExecResult]:
        """Run (session, code) pairs in parallel across sessions, in order within a session; results in order."""
        groups: dict[str, list[int]] = {}
        for i, (sid, _code) in enumerate(requests):
            self._get(sid)
            groups.setdefault(sid, []).append(i)
        results: list[ExecResult | None] = [None] * len(requests)

        def run_group(indices: list[int]) -> None:
            for i in indices:
                results[i] = self.run(requests[i][0], requests[i][1])

        for future in [self._executor.submit(run_group, idx) for idx in groups.values()]:
            future.result()
        return [r for r in results if r is not None]

    def close_session(self, session: str) -> None:
        """Kill the session's processes; its scratch and kernel objects go with them (unknown ids are ignored).

        Returns without waiting for the kernel to finish the teardown; the slot is reused once it has.
        """
        with self._lock:
            sess = self._sessions.pop(session, None)
        if sess is not None:
            with sess.lock:
                self._kill(sess, "closed")

    def close(self) -> None:
        """Close every session, stop the template, release uids, cgroups and scratch directories (never raises)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions, self._sessions = list(self._sessions.values()), {}
            warm, self._warm = list(self._warm), collections.deque()
        for sess in sessions:
            with sess.lock:
                self._kill(sess, "closed")
        for proc in warm:
            self._abandon(proc)
        self._executor.shutdown(wait=True)
        deadline = time.monotonic() + 5.0
        while self._closing and time.monotonic() < deadline:
            self._collect(wait=0.05)
        with self._lock:
            self._stop_template()
            for proc in self._closing:
                self._finish(proc)
            self._closing = []
            for slot in self._slots:
                self._release(slot)
            self._slots = self._free = []
        shutil.rmtree(self._base, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """CPU used so far by the template and every session it has reaped (user + system; for benchmarks)."""
        template = self._template
        if template is None:
            return 0.0
        try:
            with open(f"/proc/{template.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    # ------------------------------------------------------------ template

    def _start_template(self) -> None:
        """(Re)start the template; called with the lock held."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(_SAFE_ENV, PYTHONPATH=src, PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "autocode4math.sandbox_worker", str(child.fileno())]
        self._template = subprocess.Popen(cmd, env=env, pass_fds=[child.fileno()], cwd=self._base,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
        child.close()
        self._ctl = parent
        ready = recv(parent, self.config.start_timeout_s)
        if not ready or b"template-ready" not in ready[0]:
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

    # ------------------------------------------------------------ slots (uid, cgroup, scratch)

    def _take_slot(self) -> _Slot:
        """A free slot, reusing those of finished sessions, else a newly leased uid; called with the lock held."""
        self._collect(wait=0)
        if self._free:
            return self._free.pop()
        uid = self._leases.lease() if self._leases is not None else None
        if uid is None:
            slot = _Slot(None, os.path.join(self._base, f"slot{len(self._slots)}"))
        else:
            slot = _Slot(uid, os.path.join(scratch_root(), str(uid)))
            limit = (self.config.memory_mb + self.config.scratch_mb + SESSION_MEMORY_SLACK_MB) * 2**20
            slot.cgroup = self._cgroups.create(uid, limit)
            slot.oom_kills = self._cgroups.oom_kills(slot.cgroup) if slot.cgroup else 0
        self._slots.append(slot)
        if not self._fresh_scratch(slot):
            raise SandboxError(f"could not clear the scratch directory {slot.scratch}")
        return slot

    def _fresh_scratch(self, slot: _Slot) -> bool:
        """An empty scratch directory owned by the slot's uid (any previous tree removed); False if impossible."""
        if not remove_tree(slot.scratch):
            return False
        os.mkdir(slot.scratch, 0o700)
        if slot.uid is not None:
            os.chown(slot.scratch, slot.uid, slot.uid)
        return True

    def _release(self, slot: _Slot) -> None:
        """Give the slot's uid back to the machine (only once its scratch tree is gone)."""
        gone = remove_tree(slot.scratch)
        self._cgroups.remove(slot.cgroup)
        if slot.uid is not None and self._leases is not None and gone:
            self._leases.release(slot.uid)

    # ------------------------------------------------------------ session processes

    def _spec(self, slot: _Slot) -> dict:
        cfg = self.config
        return {"uid": slot.uid, "cgroup": slot.cgroup, "scratch": slot.scratch, "sweep": slot.fresh,
                "ns": cfg.namespaces, "landlock": cfg.landlock, "memory_mb": cfg.memory_mb,
                "fsize_mb": cfg.file_size_mb, "max_processes": cfg.max_processes,
                "session_cpu_s": cfg.session_cpu_s, "max_output_chars": cfg.max_output_chars,
                "scratch_mb": cfg.scratch_mb, "scratch_files": cfg.scratch_files,
                "env": dict(_SAFE_ENV, **cfg.env)}  # fmt: skip

    def _request(self) -> _Proc:
        """Ask the template to fork a session (it starts in the background; `_claim` waits for it)."""
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            if self._template is None or self._template.poll() is not None:
                self._stop_template()
                self._start_template()
            slot = self._take_slot()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            report, report_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_FRAME)
            proc = _Proc(slot, ours, report)
            try:
                spec = json.dumps(self._spec(slot)).encode()
                socket.send_fds(self._ctl, [spec], [theirs.fileno(), report_theirs.fileno()])
                slot.fresh = False
            except OSError as e:
                self._finish(proc)
                raise SandboxError(f"the sandbox template is not reachable: {e}") from None
            finally:
                theirs.close()
                report_theirs.close()
        return proc

    def _refill(self) -> None:
        """Keep `prefork` started sessions waiting (their fork and set-up overlap other sessions' code)."""
        with self._lock:
            while not self._closed and len(self._warm) < self.config.prefork:
                try:
                    self._warm.append(self._request())
                except SandboxError:
                    return

    def _claim(self, proc: _Proc) -> None:
        """Wait until the template reported the pid and the session its layers (raises SandboxError)."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while proc.pid == 0 or proc.layers is None:
            ready = poll([proc.report, proc.data], deadline - time.monotonic())
            if not ready:
                raise SandboxError(f"a sandbox session did not start within {self.config.start_timeout_s:g} s")
            if proc.report in ready:
                msg = self._report(proc)
                if msg.get("t") == "fatal" or proc.exited:
                    raise SandboxError(f"a sandbox session failed to start: {msg.get('error') or msg}")
            if proc.data in ready:
                got = recv(proc.data, 0)
                if got is None:
                    raise SandboxError("a sandbox session exited while starting")
                try:
                    msg = parse_frame(*got)
                except ProtocolError as e:
                    raise SandboxError(f"a sandbox session sent {e} while starting") from None
                if msg["t"] != "ready":
                    raise SandboxError(f"a sandbox session failed to start: {msg.get('error', msg['t'])}")
                proc.layers = list(msg["layers"])

    def _report(self, proc: _Proc) -> dict:
        """Read one message from the template about `proc` (trusted); EOF means the template is gone."""
        got = recv(proc.report, 0)
        msg = json.loads(got[0]) if got and got[0] else {}
        if msg.get("t") == "hello" and isinstance(msg.get("pid"), int) and proc.pid == 0:
            proc.pid = msg["pid"]
            with contextlib.suppress(OSError):
                proc.pidfd = os.pidfd_open(proc.pid)
                if proc.abandoned:
                    signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
        elif msg.get("t") == "exit" or not got:
            proc.exited = True
            proc.exit = msg.get("code") if isinstance(msg.get("code"), int) else None
        return msg

    def _start(self, sess: _Session) -> None:
        """Give the session a process: a pre-forked one when available (a stale one is replaced once)."""
        with self._lock:
            proc = self._warm.popleft() if self._warm else None
        for attempt in range(2):
            proc = proc or self._request()
            self._refill()
            try:
                self._claim(proc)
            except SandboxError:
                self._abandon(proc)
                proc = None
                if attempt:
                    raise
                continue
            sess.proc, self.layers = proc, list(proc.layers or [])
            return

    def _kill(self, sess: _Session, why: str) -> None:
        """SIGKILL the session's process (its PID namespace dies with it) and mark the session dead."""
        sess.dead = sess.dead or why
        if sess.proc is not None:
            self._abandon(sess.proc)
            sess.proc = None

    def _abandon(self, proc: _Proc) -> None:
        """Kill `proc` and leave its exit to be collected in the background."""
        proc.abandoned = True
        if proc.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
        with self._lock:
            self._closing.append(proc)

    def _collect(self, wait: float) -> None:
        """Finish closed processes whose exit the template reported (waiting up to `wait` seconds for one)."""
        with self._lock:
            closing = list(self._closing)
        if not closing:
            return
        for proc in poll([p.report for p in closing], wait):
            owner = next(p for p in closing if p.report is proc)
            while not owner.exited and poll([owner.report], 0):
                self._report(owner)
        with self._lock:
            done = [p for p in self._closing if p.exited]
            self._closing = [p for p in self._closing if not p.exited]
            for proc in done:
                self._finish(proc)

    def _finish(self, proc: _Proc) -> None:
        """Release a dead process's fds; its slot becomes free once its scratch (if on the host) is empty."""
        for sock in (proc.data, proc.report):
            sock.close()
        if proc.pidfd >= 0:
            os.close(proc.pidfd)
            proc.pidfd = -1
        slot = proc.slot
        try:
            usable = "private-tmp" in (proc.layers or []) or self._fresh_scratch(slot)
        except OSError:
            usable = False  # the slot is retired; close() tries its scratch tree once more
        if usable and slot not in self._free:
            self._free.append(slot)

    def _get(self, session: str) -> _Session:
        sess = self._sessions.get(session)
        if sess is None:
            raise KeyError(f"unknown sandbox session {session!r} (closed, or not opened with open_session())")
        return sess

    # ------------------------------------------------------------ one block

    def _run_block(self, sess: _Session, code: str, options: dict) -> ExecResult:
        with sess.lock:
            if sess.dead:
                return ExecResult("dead", "", f"SessionDead: the session's interpreter is gone ({sess.dead})", 0.0)
            if len(code) > self.config.max_code_chars:
                msg = f"CodeTooLong: {len(code)} characters (limit {self.config.max_code_chars})"
                return ExecResult("error", "", msg, 0.0)
            start = time.monotonic()
            if sess.proc is None:
                try:
                    self._start(sess)
                except (SandboxError, OSError) as e:
                    sess.dead = "it failed to start"
                    return ExecResult("sandbox_error", "", f"SandboxError: {e}", time.monotonic() - start)
            sess.blocks += 1
            return self._exchange(sess, {"code": code, "n": sess.blocks, **options})

    def _exchange(self, sess: _Session, msg: dict) -> ExecResult:
        """Send one block, then read its frames (untrusted) and the template's report until done or deadline."""
        proc, n, timeout = sess.proc, msg["n"], float(msg["timeout_s"])
        start = time.monotonic()
        deadline = start + timeout
        payload = json.dumps(msg, ensure_ascii=False).encode("utf-8", "replace")
        sent = send_before(proc.data, payload, deadline) if len(payload) <= MAX_FRAME else None
        if sent is None:
            return ExecResult("error", "", f"CodeTooLong: the block is {len(payload)} bytes encoded", 0.0)
        if not sent:
            return self._died(sess, "", start)
        head: list[str] = []
        room = self.config.max_output_chars // 2
        budget = 64 * self.config.max_output_chars + 2 * MAX_FRAME  # bytes a block may send in all
        while True:
            ready = poll([proc.data, proc.report], deadline - time.monotonic())
            if not ready:
                return self._timed_out(sess, "".join(head), start, timeout)
            if proc.report in ready:
                self._report(proc)
                if proc.exited:
                    return self._died(sess, "".join(head), start)
            if proc.data not in ready:
                continue
            got = recv(proc.data, 0)
            if got is None:  # B closed its end: it is dying; the template reports how
                self._await_exit(proc, 2.0)
                return self._died(sess, "".join(head), start)
            budget -= len(got[0])
            try:
                frame = parse_frame(*got)
                if budget < 0:
                    raise ProtocolError("more data than any block may produce")
                if frame["t"] not in ("out", "done"):
                    raise ProtocolError(f"an unexpected {frame['t']!r} frame")
            except ProtocolError as e:
                return self._broken(sess, str(e), "".join(head), start)
            if frame["n"] != n:
                continue  # a stray frame from an earlier block (e.g. a thread it left running)
            if frame["t"] == "out" and room > 0:
                piece = frame["s"][:room]
                head.append(piece)
                room -= len(piece)
            elif frame["t"] == "done":
                return _finished(frame, "".join(head), self.config.max_output_chars, time.monotonic() - start)

    def _await_exit(self, proc: _Proc, wait: float) -> None:
        deadline = time.monotonic() + wait
        while not proc.exited and poll([proc.report], deadline - time.monotonic()):
            self._report(proc)

    def _timed_out(self, sess: _Session, head: str, start: float, timeout: float) -> ExecResult:
        self._kill(sess, f"killed after exceeding the {timeout:g} s timeout")
        error = f"Timeout: execution exceeded {timeout:g} s"
        return ExecResult("timeout", clean_text(_cut_marker(head, "killed at the timeout")), error,
                          time.monotonic() - start)  # fmt: skip

    def _broken(self, sess: _Session, why: str, head: str, start: float) -> ExecResult:
        self._kill(sess, "it broke the sandbox protocol")
        error = f"SandboxError: the session sent {why}; it was killed"
        return ExecResult("sandbox_error", clean_text(head), error, time.monotonic() - start)

    def _died(self, sess: _Session, head: str, start: float) -> ExecResult:
        proc = sess.proc
        status, error = _classify_exit(proc.exit if proc.exited else None)
        if proc.exited and proc.exit is None:
            status, error = "sandbox_error", "SandboxError: the sandbox template vanished"
        elif status == "killed" and proc.slot.cgroup:
            kills = self._cgroups.oom_kills(proc.slot.cgroup)
            if kills > proc.slot.oom_kills:
                status, error = "memory", "MemoryError: the session exceeded its memory limit and was killed"
            proc.slot.oom_kills = kills
        self._kill(sess, error)
        return ExecResult(status, clean_text(_cut_marker(head, "the process died")), error, time.monotonic() - start)


def _classify_exit(code: int | None) -> tuple[str, str]:
    """Status and reason for a session process that ended (code < 0: killed by that signal)."""
    if code is None:
        return "crashed", "Crashed: the sandbox process vanished"
    if code >= 0:
        return "crashed", f"Exited: the process exited with code {code} (os._exit or a fatal error)"
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return "killed", f"Killed: terminated by signal {-code}"
    if sig == signal.SIGXCPU:
        return "timeout", "Timeout: CPU time limit exceeded"
    if sig in _FATAL_SIGNALS:
        return "crashed", f"Crashed: {signal.strsignal(sig)} ({sig.name})"
    return "killed", f"Killed: terminated by {sig.name}"


def _finished(msg: dict, head: str, max_chars: int, duration: float) -> ExecResult:
    """The result of a completed block from its streamed head and its validated final frame."""
    tail = msg["tail"][-max(1, max_chars // 2) :]
    mid = f"\n... [{msg['dropped']} characters truncated] ...\n" if msg["dropped"] > 0 else ""
    return ExecResult(msg["status"], clean_text(head + mid + tail), clean_text(msg["error"][:4000]), duration,
                      clean_text(msg["stderr"][:max_chars]))  # fmt: skip


def _cut_marker(head: str, why: str) -> str:
    return f"{head}\n... [output cut: {why}]" if head else ""
