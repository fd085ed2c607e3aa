"""The processes behind `sandbox.SandboxPool`: a warm template, and one isolated interpreter per session.

Why a separate module: this file runs in a fresh interpreter (`python -m autocode4math.sandbox_worker FD`)
spawned by the pool with a scrubbed environment. That interpreter is the *template*: it imports the
heavy modules (sympy, numpy, fractions, ...) once, then forks for every session, so a session costs a
fork instead of an interpreter start plus seconds of imports.

Process tree for one session and its two channels:

    pool (caller)  ──control socket──>  template (root, warm)  ──fork──>  B (one session: the code)
         │  └──────── report socket (hello, exit status) ─────────┘                │
         └─────────── data socket (ready, output, results) ────────────────────────┘

* Before each fork the template unshares a PID namespace, so B is PID 1 of a fresh one: when B dies,
  the kernel kills every process the code started. The template reports B's pid and, when it has reaped
  B, its exit status on the session's *report* socket, which B never holds: the pool can trust it. The
  template only ever writes to report sockets without blocking, so no session can stall it.
* B applies the isolation layers of sandbox_layers (cgroup, namespaces, read-only host, private /tmp,
  rlimits, uid, seccomp, Landlock) and then executes code blocks received on its *data* socket. The code
  runs in B's own process and can reach that socket, so everything B sends is untrusted input for the
  pool (sandbox_protocol.parse_frame validates it).

Messages are JSON (never pickle: whatever B sends is untrusted data).
Deliberately simplified: only Python-level `sys.stdout`/`sys.stderr` are captured; output written to
file descriptors 1/2 directly (os.write, C code, subprocesses) goes to /dev/null. See docs/sandbox.md.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import ctypes
import errno
import gc
import io
import json
import linecache
import os
import resource
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable

from autocode4math import sandbox_layers as layers
from autocode4math.sandbox_protocol import MAX_FRAME, send

PRELOAD = ("math", "itertools", "fractions", "numpy", "sympy")
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25

_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------- executing blocks (in B)


class CappedStream(io.TextIOBase):
    """A text stream keeping the first `head` and last `tail` characters; the rest is only counted.

    With a `sink`, the head is forwarded as it is written (so output survives a timeout kill). Writes
    from threads that belong to another block (see `Interpreter`) are dropped.
    """

    def __init__(self, head: int, tail: int, block: int, sink: Callable[[str], None] | None = None) -> None:
        self.head_cap, self.tail_cap, self.block, self.sink = head, tail, block, sink
        self.head: list[str] = []
        self.head_len, self.total, self.tail = 0, 0, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        n = len(s)
        if getattr(threading.current_thread(), "_autocode_block", None) != self.block:
            return n  # a thread left running by an earlier block: its output belongs to no later block
        self.total += n
        room = self.head_cap - self.head_len
        if room > 0 and s:
            piece, s = s[:room], s[room:]
            self.head_len += len(piece)
            self.sink(piece) if self.sink else self.head.append(piece)
        if s:
            self.tail = (self.tail + s[-self.tail_cap :])[-self.tail_cap :]
        return n

    def text(self) -> str:
        """Head + marker + tail (only used for the non-streamed stream)."""
        dropped = self.total - self.head_len - len(self.tail)
        mid = f"\n... [{dropped} characters truncated] ...\n" if dropped > 0 else ""
        return "".join(self.head) + mid + self.tail


class Interpreter:
    """A notebook-like namespace: blocks share globals; a final bare expression's repr is printed.

    Every thread is stamped with the block that started it (the main thread with the running block),
    so a thread an earlier block left running cannot write into a later block's output.
    """

    def __init__(self, sock: socket.socket, max_output_chars: int) -> None:
        self.sock, self.half = sock, max(1, max_output_chars // 2)
        self.ns: dict = {"__name__": "__main__", "__builtins__": __builtins__}
        self.pid = os.getpid()
        self.block = 0
        start = threading.Thread.start

        def stamped_start(thread: threading.Thread) -> None:
            thread._autocode_block = getattr(threading.current_thread(), "_autocode_block", self.block)
            start(thread)

        threading.Thread.start = stamped_start

    def run(self, msg: dict) -> dict:
        n = self.block = int(msg.get("n", 0))
        threading.main_thread()._autocode_block = n
        out = CappedStream(self.half, self.half, n, lambda piece: send(self.sock, {"t": "out", "n": n, "s": piece}))
        err = CappedStream(self.half, self.half, n)
        sys.stdout, sys.stderr = out, err
        if isinstance(msg.get("stdin"), str):
            sys.stdin = io.StringIO(msg["stdin"])
        status, error = "ok", ""
        try:
            _write_files(msg.get("files") or {})
            self._exec(str(msg.get("code", "")), f"<cell {n}>", echo=not msg.get("script"))
        except MemoryError:
            status, error = "memory", "MemoryError: the code exceeded the sandbox memory limit"
        except SystemExit as e:
            status, error = "exited", f"SystemExit: {e.code}"
        except BaseException as e:  # noqa: BLE001 - everything the code raises is reported, nothing escapes
            status, error = "error", _format_error(e)
        if os.getpid() != self.pid:  # a process the code forked got here: it must not answer or serve
            os._exit(0 if status == "ok" else 1)
        dropped = out.total - out.head_len - len(out.tail)
        return {"t": "done", "n": n, "status": status, "error": error, "tail": out.tail, "dropped": dropped,
                "stderr": err.text()}  # fmt: skip

    def _exec(self, code: str, name: str, echo: bool) -> None:
        tree = ast.parse(code, name)
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        last = None
        if echo and tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), self.ns)
        if last is not None:
            value = eval(compile(last, name, "eval"), self.ns)
            if value is not None:
                sys.stdout.write(repr(value) + "\n")


def _write_files(files: dict) -> None:
    """Write the request's files ({relative path: base64 content}) into the scratch directory."""
    for name, content in files.items():
        path = os.path.normpath(str(name))
        if os.path.isabs(path) or path.split(os.sep)[0] == "..":
            raise ValueError(f"file {name!r}: only paths inside the working directory can be written")
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(content or ""))


def _format_error(e: BaseException, limit: int = 2000) -> str:
    """The traceback restricted to the code's own frames, keeping its end when long."""
    te = traceback.TracebackException.from_exception(e)
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename.startswith("<cell")])
    text = "".join(te.format()).rstrip("\n")
    return text[-limit:]


# ---------------------------------------------------------------- session child B


def isolate(spec: dict, has_pidns: bool) -> tuple[list[str], str]:
    """Apply every isolation layer to this process (root until `drop_privileges`); the layers and scratch dir."""
    uid = spec.get("uid")
    done = ["setsid", "scrubbed-env"] + (["pidns"] if has_pidns else [])
    done += layers.join_cgroup(spec.get("cgroup", ""))
    ns = layers.private_namespaces(uid, spec["scratch_mb"], spec["scratch_files"], has_pidns) if spec["ns"] else []
    done += ns
    scratch = layers.PRIVATE_SCRATCH if "private-tmp" in ns else spec["scratch"]
    os.chdir(scratch)
    os.environ.clear()
    os.environ.update(spec["env"], HOME=scratch, TMPDIR=scratch, MPLCONFIGDIR=scratch)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing
    done += layers.apply_limits(spec["memory_mb"], spec["fsize_mb"], spec["max_processes"], spec["session_cpu_s"])
    done += layers.drop_privileges(uid, scratch, spec["template_cwd"])
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    done += layers.seccomp_filter(deny_times="ro-host" not in done)
    if spec.get("landlock", True):
        done += layers.landlock_restrict([scratch] + (["/dev/shm"] if "private-tmp" in ns else []), ["/dev/null"])
    done += layers.install_audit_guard(scratch, "netns" not in done, "landlock-fs" not in done)
    return done, scratch


def session_main(sock: socket.socket, spec: dict, has_pidns: bool) -> None:
    """Set up isolation, then serve code blocks until the pool closes the socket."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _close_fds_except(sorted({sock.fileno(), *spec.get("keep_fds", ())}))
    done, _scratch = isolate(spec, has_pidns)
    send(sock, {"t": "ready", "layers": done})
    interp = Interpreter(sock, int(spec["max_output_chars"]))
    while True:
        try:
            data = sock.recv(MAX_FRAME)
        except InterruptedError:
            continue
        if not data:
            os._exit(0)
        msg = json.loads(data)
        _set_cpu_soft_limit(float(msg.get("timeout_s", 10.0)))
        send(sock, interp.run(msg))


def _close_fds_except(keep: list[int]) -> None:
    """Close every fd from 3 up except those in `keep` (sorted)."""
    low = 3
    for fd in keep:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 65536)


def _set_cpu_soft_limit(timeout_s: float) -> None:
    """Backstop for the pool's wall-clock timeout: SIGXCPU once this block used timeout + 1 s of CPU."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(used.ru_utime + used.ru_stime + timeout_s) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))


# ---------------------------------------------------------------- the template


def _spawn_session(ctl: socket.socket, sessions: dict, state: dict) -> bool:
    """Receive one spawn request and fork the session B; False when the pool has gone away."""
    data, fds, _flags, _addr = socket.recv_fds(ctl, MAX_FRAME, 4)
    if not data:
        return False
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        return True
    spec = json.loads(data)
    sock, report = socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])
    spec["keep_fds"], spec["template_cwd"] = state["keep_fds"], state["cwd"]
    if spec.get("sweep") and spec.get("uid") is not None:
        _kill_uid(int(spec["uid"]), state["pidns_fd"])  # a killed pool may have left processes of this uid
    has_pidns = spec["ns"] and layers.new_pid_namespace_for_next_child(state["pidns_fd"])
    if state.get("pidns") and not has_pidns:  # never fork into the previous session's namespace
        send(report, {"t": "fatal", "error": "could not create a PID namespace for a new session"}, block=False)
        sock.close()
        report.close()
        return True
    state["pidns"] = state.get("pidns") or has_pidns
    pid = os.fork()
    if pid == 0:
        try:
            report.close()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            session_main(sock, spec, has_pidns)
        except BaseException as e:  # noqa: BLE001 - report any set-up failure, then die
            send(sock, {"t": "fatal", "error": f"{type(e).__name__}: {e}"})
        os._exit(70)
    sock.close()
    sessions[pid] = (report, spec.get("uid"), has_pidns)
    send(report, {"t": "hello", "pid": pid}, block=False)
    return True


def _reap_sessions(sessions: dict, pidns_fd: int) -> None:
    """Reap every ended child; for a session, clean up after it and report how it ended (never blocking)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid not in sessions:
            continue  # an orphan adopted from a session without a PID namespace, or a kill helper
        report, uid, had_pidns = sessions.pop(pid)
        if not had_pidns:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            if uid is not None:
                _kill_uid(uid, pidns_fd)
        send(report, {"t": "exit", "code": os.waitstatus_to_exitcode(status)}, block=False)
        report.close()


def _kill_uid(uid: int, own_pidns_fd: int) -> None:
    """Kill every process of `uid` (all belong to one session) from a helper that takes that uid.

    The helper is forked into the template's own PID namespace (not the last session's), so it sees them all.
    """
    layers.reset_pid_namespace(own_pidns_fd)
    killer = os.fork()
    if killer == 0:
        with contextlib.suppress(OSError):
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)  # as that uid: every process it owns, except the helper itself
        os._exit(0)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(killer, 0)


WARM_UP = """
import sympy as sp, numpy as np
from fractions import Fraction
x, y = sp.symbols('x y')
sp.solve(x**2 - 5*x + 6, x); sp.solve([x + y - 3, x - y - 1], [x, y]); sp.simplify((x**2 - 4) / (x - 2))
sp.factor(x**3 - 1); sp.expand((x + 1)**3); sp.integrate(x**2, (x, 0, 1)); sp.diff(sp.sin(x) * x, x)
sp.nsimplify(0.5); sp.N(sp.pi, 20); sp.sqrt(8); sp.Rational(3, 4) + 1; sp.Matrix([[1, 2], [3, 4]]).det()
sp.isprime(97); sp.divisors(60); sp.binomial(10, 3); sp.gcd(12, 18); sp.summation(1 / x**2, (x, 1, 10))
sp.latex(x**2); str(sp.Eq(x, 1)); sp.limit(sp.sin(x) / x, x, 0); sp.solveset(x**2 - 1, x, sp.S.Reals)
Fraction(1, 3) + Fraction(1, 6); np.linalg.solve(np.eye(2), np.ones(2)); np.array([1.5]).sum()
"""


def warm_up() -> None:
    """Import the PRELOAD modules and run typical math code once, so the imports and the lazy imports and
    caches it fills are inherited by every session (the template's first step; `bench.fork_floor` too)."""
    for name in PRELOAD:
        __import__(name)
    exec(compile(WARM_UP, "<warm-up>", "exec"), {"__name__": "__warmup__"})


def huge_pages() -> int:
    """Back the template's heap with transparent huge pages where the kernel allows; the MiB collapsed.

    A fork copies one page-table entry per 2 MiB huge page instead of 512, and an exit frees as few,
    which makes starting and ending a session cheaper; a session's first write to such a page splits
    it and copies only the 4 KiB it touched, as before. Only anonymous, private, writable mappings are
    touched (the heap and the allocator's arenas); a kernel without MADV_COLLAPSE (6.1) skips them.
    """
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f]
    for parts in regions:
        if parts[1] != "rw-p" or (len(parts) > 5 and parts[5] != "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        start, end = (lo + (1 << 21) - 1) & ~((1 << 21) - 1), hi & ~((1 << 21) - 1)
        hinted = end > start and _libc.madvise(start, end - start, MADV_HUGEPAGE) == 0
        if hinted and _libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += (end - start) >> 20
    return collapsed


def template_main(ctl_fd: int) -> None:
    """Preload and warm the heavy modules, then fork one session per request until the pool goes away."""
    warm_up()
    keep_fds = layers.reachable_paths()
    layers.prepare()
    gc.freeze()  # keep the collector off the template's objects: children then share those pages for good
    huge_pages()
    ctl = socket.socket(fileno=ctl_fd)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of sessions without a PID namespace come here
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up fd, not the handler, triggers reaping
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    sessions: dict[int, tuple[socket.socket, int | None, bool]] = {}
    state: dict = {"pidns_fd": os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC), "keep_fds": keep_fds,
                   "cwd": os.path.realpath(os.getcwd())}  # fmt: skip
    ctl.send(b'{"t": "template-ready"}')
    while True:
        for fd, _event in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap_sessions(sessions, state["pidns_fd"])
            elif not _spawn_session(ctl, sessions, state):
                return


if __name__ == "__main__":
    try:
        template_main(int(sys.argv[1]))
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
