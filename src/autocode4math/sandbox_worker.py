"""The processes behind `sandbox.SandboxPool`: a warm template, and one isolated interpreter per session.

Why a separate module: this file runs in a fresh interpreter (`python -m autocode4math.sandbox_worker FD`)
spawned by the pool with a scrubbed environment. That interpreter is the *template*: it imports the
heavy modules (sympy, numpy, fractions, ...) once, then forks for every session, so a session costs a
fork instead of an interpreter start plus seconds of imports.

Process tree for one session (the pool talks to B over a SOCK_SEQPACKET socket it created):

    pool (caller)  ──control socket──>  template (root, warm)  ──fork──>  B (one session: the code)

* Before each fork the template unshares a network and a PID namespace (when the kernel lets it), so B
  gets a fresh network namespace and is PID 1 of a fresh PID namespace. The template tells the pool
  B's pid, reaps B when it dies (finished, killed on timeout, crashed) and sends its exit status over
  B's socket. Since B is PID 1 of its namespace, the kernel kills every process the code started when
  B dies: nothing survives a session.
* B drops to its own unprivileged uid, applies rlimits, Landlock, and then executes code blocks.

Messages are JSON (never pickle: B runs untrusted code, so whatever it sends is untrusted data).
Deliberately simplified: only Python-level `sys.stdout`/`sys.stderr` are captured; output written to
file descriptors 1/2 directly (os.write, C code, subprocesses) goes to /dev/null. See docs/sandbox.md.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import errno
import gc
import io
import json
import linecache
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable

PRELOAD = ("math", "itertools", "fractions", "numpy", "sympy")
MAX_MSG = 1 << 20
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
# Landlock (linux/landlock.h); the syscall numbers are shared by all architectures.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LL_WRITE_FILE, LL_TRUNCATE = 1 << 1, 1 << 14
LL_FS_WRITES_V1 = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make_*
LL_REFER = 1 << 13
LL_NET_ALL = (1 << 0) | (1 << 1)  # bind and connect TCP
LL_SCOPE_ALL = (1 << 0) | (1 << 1)  # abstract unix sockets and signals outside the domain

_libc = ctypes.CDLL(None, use_errno=True)


def send(sock: socket.socket, obj: dict) -> None:
    """Send one JSON message; errors (the peer is gone) are the receiver's problem, not ours."""
    with contextlib.suppress(OSError):
        sock.send(json.dumps(obj).encode()[:MAX_MSG])


# ---------------------------------------------------------------- isolation layers


def unshare_namespaces(own_pidns_fd: int) -> list[str]:
    """A new network namespace for the caller and a new PID namespace for its next child (needs CAP_SYS_ADMIN).

    The kernel refuses a second CLONE_NEWPID while the children's namespace differs from the caller's, so
    it is first reset with setns on the caller's own PID namespace (`own_pidns_fd`, /proc/self/ns/pid).
    Unprivileged user namespaces are not used: the template would nest one more per session (max depth 32).
    """
    _libc.setns(own_pidns_fd, CLONE_NEWPID)
    return ["netns", "pidns"] if _libc.unshare(CLONE_NEWNET | CLONE_NEWPID) == 0 else []


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_restrict(write_dirs: list[str], write_files: list[str]) -> list[str]:
    """Allow file writes/removals only beneath `write_dirs` (and to `write_files`); deny TCP and signals out.

    Reads stay allowed everywhere (the interpreter needs its stdlib and site-packages). Returns the
    Landlock features enforced, [] when the kernel has no Landlock.
    """
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return []
    fs = LL_FS_WRITES_V1 | (LL_REFER if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(fs, LL_NET_ALL if abi >= 4 else 0, LL_SCOPE_ALL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    rfd = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        return []
    try:
        for path, allowed in [(d, fs) for d in write_dirs] + [
            (f, LL_WRITE_FILE | (fs & LL_TRUNCATE)) for f in write_files
        ]:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = _PathBeneath(allowed, pfd)
            ok = _libc.syscall(SYS_LANDLOCK_ADD_RULE, rfd, 1, ctypes.byref(rule), ctypes.c_uint32(0))
            os.close(pfd)
            if ok != 0:
                return []
        if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, rfd, ctypes.c_uint32(0)) != 0:
            return []
    finally:
        os.close(rfd)
    return ["landlock-fs"] + (["landlock-net"] if abi >= 4 else []) + (["landlock-scope"] if abi >= 6 else [])


def install_audit_guard(scratch: str, block_net: bool, block_writes: bool) -> None:
    """Fallback when a kernel layer is missing: refuse sockets / writes outside scratch via sys.addaudithook.

    Audit hooks run inside the untrusted interpreter, so code using ctypes can bypass them; they stop
    ordinary code, not a determined attacker (docs/sandbox.md says so).
    """
    root = os.path.realpath(scratch) + os.sep
    write_events = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.truncate", "os.symlink", "os.link",
                    "os.chmod", "os.chown", "shutil.rmtree", "shutil.move"}  # fmt: skip

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True
        path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        return path in ("/dev/null",) or os.path.realpath(path).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if block_net and event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            if args and getattr(args[0], "family", None) in (socket.AF_INET, socket.AF_INET6):
                raise PermissionError("network access is disabled in the sandbox")
        elif block_writes and event == "open":
            path, mode, flags = args
            writing = any(c in str(mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR)
            if path is not None and writing and not inside(path):
                raise PermissionError(f"writes outside the scratch directory are disabled: {path}")
        elif block_writes and event in write_events and args and not all(inside(a) for a in args[:2] if a):
            raise PermissionError(f"{event} outside the scratch directory is disabled")

    sys.addaudithook(hook)


def apply_limits(spec: dict) -> None:
    """rlimits: address space on top of the template, file size, process count, no core files, CPU."""
    import resource

    base = _vm_size_bytes()
    mem = base + int(spec["memory_mb"]) * 2**20
    limits = {
        resource.RLIMIT_AS: mem,
        resource.RLIMIT_FSIZE: int(spec["fsize_mb"]) * 2**20,
        resource.RLIMIT_NPROC: int(spec["max_processes"]),
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NOFILE: 256,
        resource.RLIMIT_CPU: int(spec["session_cpu_s"]),
    }
    for res, value in limits.items():
        resource.setrlimit(res, (value, value))


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def reachable_paths() -> list[int]:
    """Make the import path usable by any uid, once, in the template (only when root); the fds to keep open.

    The interpreter's own files may sit under a directory a session's uid cannot enter (e.g. a pyenv under
    /root, mode 700), so each such sys.path directory is opened (O_PATH) and replaced by /proc/self/fd/N:
    a lookup through that magic link starts at the directory itself, and only its own modes apply. Done
    here rather than in each session because rewriting every package's `__path__` costs 8-16 ms; a forked
    session inherits both the rewritten paths and the fds (at the same numbers).
    """
    if os.geteuid() != 0:
        return []
    remap: dict[str, str] = {}
    cwd = os.path.realpath(os.getcwd())  # replaced by each session's scratch directory instead
    for i, entry in enumerate(sys.path):
        if entry and os.path.realpath(entry) != cwd and os.path.isdir(entry) and not _world_reachable(entry):
            remap.setdefault(entry, f"/proc/self/fd/{os.open(entry, os.O_PATH | os.O_DIRECTORY)}")
            sys.path[i] = remap[entry]
    for module in list(sys.modules.values()):  # packages import submodules from their own __path__
        path = getattr(module, "__path__", None)
        if isinstance(path, list):
            path[:] = [_remapped(p, remap) for p in path]
    sys.path_importer_cache.clear()
    return [int(fd.rsplit("/", 1)[1]) for fd in remap.values()]


def drop_privileges(uid: int | None, scratch: str) -> None:
    """Become the session's own unprivileged uid/gid (only when started as root).

    The template already made the import path reachable (`reachable_paths`); here the template's working
    directory on sys.path (the uid may not enter it) is replaced by the session's scratch directory.
    """
    if uid is None:
        return
    template_cwd = os.path.realpath(os.path.dirname(scratch))
    for i, entry in enumerate(sys.path):
        if not entry.startswith("/proc/self/fd/") and os.path.realpath(entry or ".") == template_cwd:
            sys.path[i] = scratch
    sys.path_importer_cache.clear()
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change clears it; /proc/self/fd needs it (no cores: RLIMIT_CORE)


def _world_reachable(path: str) -> bool:
    """Whether any uid may traverse every directory from / down to `path` (o+x on each)."""
    parts = os.path.realpath(path).split(os.sep)
    return all(os.stat(os.sep.join(parts[:k]) or os.sep).st_mode & 0o001 for k in range(1, len(parts) + 1))


def _remapped(path: str, remap: dict[str, str]) -> str:
    for old, new in remap.items():
        if path == old or path.startswith(old.rstrip(os.sep) + os.sep):
            return new + path[len(old.rstrip(os.sep)) :]
    return path


# ---------------------------------------------------------------- executing blocks (in B)


class CappedStream(io.TextIOBase):
    """A text stream keeping the first `head` and last `tail` characters; the rest is only counted.

    With a `sink`, the head is forwarded as it is written (so output survives a timeout kill).
    """

    def __init__(self, head: int, tail: int, sink: Callable[[str], None] | None = None) -> None:
        self.head_cap, self.tail_cap, self.sink = head, tail, sink
        self.head: list[str] = []
        self.head_len, self.total, self.tail = 0, 0, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        n = len(s)
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
    """A notebook-like namespace: blocks share globals; a final bare expression's repr is printed."""

    def __init__(self, sock: socket.socket, max_output_chars: int) -> None:
        self.sock, self.half = sock, max(1, max_output_chars // 2)
        self.ns: dict = {"__name__": "__main__", "__builtins__": __builtins__}
        self.pid = os.getpid()

    def run(self, code: str, n: int) -> dict:
        out = CappedStream(self.half, self.half, lambda piece: send(self.sock, {"t": "out", "n": n, "s": piece}))
        err = CappedStream(self.half, self.half)
        sys.stdout, sys.stderr = out, err
        start = time.perf_counter()
        status, error = "ok", ""
        try:
            self._exec(code, f"<cell {n}>")
        except MemoryError:
            status, error = "memory", "MemoryError: the code exceeded the sandbox memory limit"
        except SystemExit as e:
            status, error = "exited", f"SystemExit: {e.code}"
        except BaseException as e:  # noqa: BLE001 - everything the code raises is reported, nothing escapes
            status, error = "error", _format_error(e)
        if os.getpid() != self.pid:  # a process the code forked got here: it must not answer or serve
            os._exit(0 if status == "ok" else 1)
        duration = time.perf_counter() - start
        dropped = out.total - out.head_len - len(out.tail)
        return {"t": "done", "n": n, "status": status, "error": error, "tail": out.tail, "dropped": dropped,
                "stderr": err.text(), "duration_s": duration}  # fmt: skip

    def _exec(self, code: str, name: str) -> None:
        tree = ast.parse(code, name)
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), self.ns)
        if last is not None:
            value = eval(compile(last, name, "eval"), self.ns)
            if value is not None:
                sys.stdout.write(repr(value) + "\n")


def _format_error(e: BaseException, limit: int = 2000) -> str:
    """The traceback restricted to the code's own frames, keeping its end when long."""
    te = traceback.TracebackException.from_exception(e)
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename.startswith("<cell")])
    text = "".join(te.format()).rstrip("\n")
    return text[-limit:]


# ---------------------------------------------------------------- session child B


def session_main(sock: socket.socket, spec: dict, ns_layers: list[str]) -> None:
    """Set up isolation, then serve code blocks until the pool closes the socket."""
    os.setsid()
    scratch = spec["scratch"]
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _close_fds_except(sorted({sock.fileno(), *spec.get("keep_fds", ())}))
    os.chdir(scratch)
    os.environ.clear()
    os.environ.update(spec["env"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing
    apply_limits(spec)
    drop_privileges(spec.get("uid"), scratch)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    layers = ["setsid", "rlimits", "scrubbed-env", "scratch-cwd"] + ns_layers
    layers += ["uid"] if spec.get("uid") is not None else []
    if spec.get("landlock", True):
        layers += landlock_restrict([scratch], ["/dev/null"])
    need_net, need_fs = "netns" not in layers, "landlock-fs" not in layers
    if need_net or need_fs:
        install_audit_guard(scratch, need_net, need_fs)
        layers.append("audit-hook")
    send(sock, {"t": "ready", "layers": layers})
    interp = Interpreter(sock, int(spec["max_output_chars"]))
    while True:
        try:
            data = sock.recv(MAX_MSG)
        except InterruptedError:
            continue
        if not data:
            os._exit(0)
        msg = json.loads(data)
        _set_cpu_soft_limit(float(msg.get("timeout_s", 10.0)))
        send(sock, interp.run(msg["code"], int(msg.get("n", 0))))


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
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(used.ru_utime + used.ru_stime + timeout_s) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))


# ---------------------------------------------------------------- the template


def _spawn_session(ctl: socket.socket, sessions: dict, state: dict) -> bool:
    """Receive one spawn request and fork the session B; False when the pool has gone away."""
    data, fds, _flags, _addr = socket.recv_fds(ctl, MAX_MSG, 4)
    if not data:
        return False
    for extra in fds[1:]:
        os.close(extra)
    if not fds:
        return True
    sock, spec = socket.socket(fileno=fds[0]), json.loads(data)
    spec["keep_fds"] = state["keep_fds"]
    # unshare moves the template itself to a fresh network namespace and makes its *next* child PID 1 of a
    # fresh PID namespace: one fork per session, and every session gets its own namespaces.
    ns_layers = unshare_namespaces(state["pidns_fd"]) if spec.get("namespaces", True) else []
    if state.get("pidns") and "pidns" not in ns_layers:  # never fork into the previous session's namespace
        send(sock, {"t": "fatal", "error": "could not create namespaces for a new session"})
        sock.close()
        return True
    state["pidns"] = int(state.get("pidns") or "pidns" in ns_layers)
    pid = os.fork()
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            session_main(sock, spec, ns_layers)
        except BaseException as e:  # noqa: BLE001 - report any set-up failure, then die
            send(sock, {"t": "fatal", "error": f"{type(e).__name__}: {e}"})
        os._exit(70)
    sessions[pid] = (sock, spec.get("uid"), "pidns" in ns_layers)
    send(sock, {"t": "hello", "pid": pid})
    return True


def _reap_sessions(sessions: dict) -> None:
    """Reap every ended child; for a session, clean up after it and tell the pool how it ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid not in sessions:
            continue  # an orphan adopted from a session without a PID namespace, or a kill helper
        sock, uid, had_pidns = sessions.pop(pid)
        if not had_pidns:
            _kill_leftovers(pid, uid)
        send(sock, {"t": "exit", "code": os.waitstatus_to_exitcode(status)})
        sock.close()


def _kill_leftovers(pid: int, uid: int | None) -> None:
    """Without a PID namespace: kill B's process group, and every process of the session uid."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    if uid is not None:
        killer = os.fork()
        if killer == 0:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)  # as that uid: every process it owns (all are this session's)
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


def _warm_up() -> None:
    """Run typical math code once, so the lazy imports and caches it fills are inherited by every session."""
    exec(compile(WARM_UP, "<warm-up>", "exec"), {"__name__": "__warmup__"})


def template_main(ctl_fd: int) -> None:
    """Preload and warm the heavy modules, then fork one session per request until the pool goes away."""
    for name in PRELOAD:
        __import__(name)
    _warm_up()
    keep_fds = reachable_paths()
    gc.freeze()  # keep the collector off the template's objects: children then share those pages for good
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
    state: dict = {"pidns_fd": os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC), "keep_fds": keep_fds}
    ctl.send(b'{"t": "template-ready"}')
    while True:
        for fd, _event in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap_sessions(sessions)
            elif not _spawn_session(ctl, sessions, state):
                return


if __name__ == "__main__":
    try:
        template_main(int(sys.argv[1]))
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
