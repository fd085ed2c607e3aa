"""The isolation layers a sandbox session applies to itself, one function per layer (Linux, via ctypes).

A session process (sandbox_worker.session_main) starts as root (when the pool runs as root), applies
these in order, and only then runs model code: its memory cgroup, private namespaces (network, IPC,
mounts, with a read-only view of the host and a size-capped private /tmp), rlimits, its own uid,
no_new_privs, a seccomp filter, and Landlock. Each function returns the names of the layers it
enforced (reported in `SandboxPool.layers`); a layer the kernel refuses is left out, and the caller
adds a weaker fallback where one exists. docs/sandbox.md lists each layer and the threat it stops.

Deliberately simplified: the seccomp filter is a short deny-list for the channels the other layers
leave open (pathname unix sockets, the keyring, new namespaces, io_uring, xattrs), not an allow-list.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
import socket
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x08000000, 0x40000000, 0x20000000
CLONE_NEW_ANY = 0x7E020080  # every CLONE_NEW* flag (cgroup, uts, ipc, user, pid, net, ns, time)
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 4, 38, 22
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 0x4000, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = -100, 0x8000, 1, 2
SYS_MOUNT_SETATTR = 442  # the same number on every architecture
# Landlock (linux/landlock.h); the syscall numbers are shared by all architectures.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LL_WRITE_FILE, LL_TRUNCATE = 1 << 1, 1 << 14
LL_FS_WRITES_V1 = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make_*
LL_REFER = 1 << 13
LL_NET_ALL = (1 << 0) | (1 << 1)  # bind and connect TCP
LL_SCOPE_ALL = (1 << 0) | (1 << 1)  # abstract unix sockets and signals outside the domain
PRIVATE_ROOT = "/run"
"""Where a session mounts its own tmpfs; its `work` directory is bind-mounted on /tmp (the scratch directory)."""
PRIVATE_SCRATCH = "/tmp"


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [s.encode() if s is not None else None for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


# ---------------------------------------------------------------- namespaces and mounts


def new_pid_namespace_for_next_child(own_pidns_fd: int) -> bool:
    """Make the caller's next child PID 1 of a fresh PID namespace (needs CAP_SYS_ADMIN).

    The kernel refuses a second CLONE_NEWPID while the children's namespace differs from the caller's, so
    it is first reset with setns on the caller's own PID namespace (`own_pidns_fd`, /proc/self/ns/pid).
    Unprivileged user namespaces are not used: the template would nest one more per session (max depth 32).
    """
    reset_pid_namespace(own_pidns_fd)
    return _libc.unshare(CLONE_NEWPID) == 0


def reset_pid_namespace(own_pidns_fd: int) -> None:
    """Fork the caller's next children into its own PID namespace again (undoing `new_pid_namespace_...`)."""
    _libc.setns(own_pidns_fd, CLONE_NEWPID)


def join_cgroup(path: str) -> list[str]:
    """Move the caller into the memory cgroup `path` (prepared by the pool); [] when there is none."""
    if not path:
        return []
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0")
    return ["memory-cgroup"]


def private_namespaces(uid: int | None, scratch_mb: int, scratch_files: int, has_pidns: bool) -> list[str]:
    """New network, IPC and mount namespaces; in the latter a read-only host and private, capped /tmp and /run.

    The mount namespace gets: every host mount read-only (files outside the scratch directory keep their
    contents, times and extended attributes), a fresh tmpfs on /run (hiding host services' unix sockets
    there) of `scratch_mb` MiB and `scratch_files` inodes, whose `work` directory becomes /tmp (the scratch
    directory: cwd, HOME, TMPDIR) and whose `shm` directory becomes /dev/shm, and a /proc that shows only
    the session's own processes. Everything lives in memory and vanishes with the session's last process.
    Returns [] when the kernel refuses the namespaces (no CAP_SYS_ADMIN); raises if it refuses half-way.
    """
    if _libc.unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWNS) != 0:
        return []
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    attr = _read_only_attr()
    rc = _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, attr, ctypes.c_size_t(len(attr)))
    _check(rc, "mount_setattr / read-only")
    options = f"size={scratch_mb}m,nr_inodes={scratch_files},mode=0755"
    _mount("tmpfs", PRIVATE_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for name, target in (("work", PRIVATE_SCRATCH), ("shm", "/dev/shm")):
        path = os.path.join(PRIVATE_ROOT, name)
        os.mkdir(path, 0o700)
        if uid is not None:
            os.chown(path, uid, uid)
        if os.path.isdir(target):
            _mount(path, target, None, MS_BIND)
    layers = ["netns", "ipcns", "mountns", "ro-host", "private-tmp"]
    if has_pidns:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        layers.append("private-proc")
    return layers


@functools.cache
def _read_only_attr() -> ctypes.Array:
    """struct mount_attr setting read-only and nosuid (built once in the template: a new ctypes type costs ~1 ms)."""
    raw = struct.pack("QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    return ctypes.create_string_buffer(raw, len(raw))


# ---------------------------------------------------------------- rlimits and privileges


def apply_limits(memory_mb: int, fsize_mb: int, max_processes: int, cpu_s: int) -> list[str]:
    """rlimits: address space on top of the template, file size, process count, no core files, CPU."""
    limits = {
        resource.RLIMIT_AS: _vm_size_bytes() + memory_mb * 2**20,
        resource.RLIMIT_FSIZE: fsize_mb * 2**20,
        resource.RLIMIT_NPROC: max_processes,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NOFILE: 256,
        resource.RLIMIT_CPU: cpu_s,
    }
    for res, value in limits.items():
        resource.setrlimit(res, (value, value))
    return ["rlimits"]


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


def drop_privileges(uid: int | None, scratch: str, template_cwd: str) -> list[str]:
    """Become the session's own unprivileged uid/gid (only when started as root).

    The template already made the import path reachable (`reachable_paths`); here the template's working
    directory on sys.path (the uid may not enter it) is replaced by the session's scratch directory.
    """
    for i, entry in enumerate(sys.path):
        if not entry.startswith("/proc/self/fd/") and os.path.realpath(entry or ".") == template_cwd:
            sys.path[i] = scratch
    sys.path_importer_cache.clear()
    if uid is None:
        return []
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change clears it; /proc/self/fd needs it (no cores: RLIMIT_CORE)
    return ["uid"]


def _world_reachable(path: str) -> bool:
    """Whether any uid may traverse every directory from / down to `path` (o+x on each)."""
    parts = os.path.realpath(path).split(os.sep)
    return all(os.stat(os.sep.join(parts[:k]) or os.sep).st_mode & 0o001 for k in range(1, len(parts) + 1))


def _remapped(path: str, remap: dict[str, str]) -> str:
    for old, new in remap.items():
        if path == old or path.startswith(old.rstrip(os.sep) + os.sep):
            return new + path[len(old.rstrip(os.sep)) :]
    return path


# ---------------------------------------------------------------- seccomp

# (audit arch, syscall numbers) per architecture; `None` where the architecture has no such call.
_ARCHES = {
    "x86_64": (0xC000003E, {
        "socket": 41, "socketpair": 53, "clone": 56, "clone3": 435, "unshare": 272, "setns": 308, "mount": 165,
        "umount2": 166, "pivot_root": 155, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
        "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "setxattrat": 463, "removexattrat": 466,
        "file_setattr": 469, "utime": 132, "utimes": 235, "futimesat": 261, "utimensat": 280}),
    "aarch64": (0xC00000B7, {
        "socket": 198, "socketpair": 199, "clone": 220, "clone3": 435, "unshare": 97, "setns": 268, "mount": 40,
        "umount2": 39, "pivot_root": 41, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7,
        "removexattr": 14, "lremovexattr": 15, "fremovexattr": 16, "setxattrat": 463, "removexattrat": 466,
        "file_setattr": 469, "utime": None, "utimes": None, "futimesat": None, "utimensat": 88}),
}  # fmt: skip
DENIED_CALLS = (
    "keyctl", "add_key", "request_key",  # the kernel keyring outlives the session (user keyrings per uid)
    "unshare", "setns", "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",  # no new namespaces or mounts (the session's view stays as set up)
    "io_uring_setup", "io_uring_enter", "io_uring_register",  # io_uring operations bypass this filter
    "bpf", "perf_event_open", "userfaultfd",  # kernel attack surface math code never needs
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "setxattrat",
    "removexattrat", "file_setattr",  # extended attributes
)  # fmt: skip
TIME_CALLS = ("utime", "utimes", "futimesat", "utimensat")
"""Denied only when the host is not mounted read-only for the session (then file times are its only guard)."""
AF_UNIX, SOCK_TYPE_MASK, SOCK_DGRAM = 1, 0xF, 2
_EPERM, _EACCES, _ENOSYS = 1, 13, 38
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _AND_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06


def seccomp_program(arch: str, deny_times: bool) -> list[tuple[int, int, int, int]] | None:
    """The BPF program (code, jt, jf, k) of the session's filter for `arch`; None for an unknown arch.

    Denied with EPERM: DENIED_CALLS, clone with any CLONE_NEW* flag, and (with `deny_times`) TIME_CALLS.
    socket(AF_UNIX, ...) fails with EACCES, so no pathname unix socket of a host service can be reached
    (socketpair stays for stream and seqpacket pairs, which cannot connect anywhere); clone3 fails with
    ENOSYS (its flags sit behind a pointer), which makes the C library fall back to clone. Other
    architectures' calling conventions (i386, x32) are refused outright.
    """
    if arch not in _ARCHES:
        return None
    audit_arch, nrs = _ARCHES[arch]

    def ret(value: int) -> tuple[int, int, int, int]:
        return (_RET_K, 0, 0, value)

    def deny(err: int) -> tuple[int, int, int, int]:
        return ret(_RET_ERRNO | err)

    def arg(i: int) -> tuple[int, int, int, int]:
        return (_LD_W_ABS, 0, 0, 16 + 8 * i)  # the low 32 bits of argument i (little-endian)

    prog = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 1, 0, audit_arch), deny(_EPERM), (_LD_W_ABS, 0, 0, 0)]
    if arch == "x86_64":
        prog += [(_JGE_K, 0, 1, 0x40000000), deny(_EPERM)]
    denied = [nrs[name] for name in DENIED_CALLS + (TIME_CALLS if deny_times else ()) if nrs[name] is not None]
    for nr in denied:
        prog += [(_JEQ_K, 0, 1, nr), deny(_EPERM)]
    prog += [(_JEQ_K, 0, 1, nrs["clone3"]), deny(_ENOSYS)]
    prog += [(_JEQ_K, 0, 4, nrs["clone"]), arg(0), (_JSET_K, 0, 1, CLONE_NEW_ANY), deny(_EPERM), ret(_RET_ALLOW)]
    prog += [(_JEQ_K, 0, 4, nrs["socket"]), arg(0), (_JEQ_K, 0, 1, AF_UNIX), deny(_EACCES), ret(_RET_ALLOW)]
    prog += [(_JEQ_K, 0, 6, nrs["socketpair"]), arg(0), (_JEQ_K, 0, 4, AF_UNIX), arg(1)]
    prog += [(_AND_K, 0, 0, SOCK_TYPE_MASK), (_JEQ_K, 0, 1, SOCK_DGRAM), deny(_EACCES)]
    prog.append(ret(_RET_ALLOW))
    return prog


@functools.cache
def seccomp_fprog(deny_times: bool) -> tuple[ctypes.Array, ctypes.Array] | None:
    """The packed filter of `seccomp_program` for this machine and its struct sock_fprog (None if unsupported).

    Built once in the template and inherited by every session (a new ctypes type costs about 1 ms).
    """
    prog = seccomp_program(platform.machine(), deny_times)
    if prog is None:
        return None
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    filters = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(filters))
    return filters, ctypes.create_string_buffer(fprog, len(fprog))


def seccomp_filter(deny_times: bool) -> list[str]:
    """Install the filter of `seccomp_program` (needs no_new_privs, set by the caller); [] if unsupported."""
    built = seccomp_fprog(deny_times)
    if built is None or _libc.prctl(PR_SET_SECCOMP, 2, built[1], 0, 0) != 0:
        return []
    return ["seccomp"]


def prepare() -> None:
    """Build, in the template, what every session's layers need, so that sessions inherit it ready."""
    for deny_times in (False, True):
        seccomp_fprog(deny_times)
    _read_only_attr()


# ---------------------------------------------------------------- Landlock and the audit-hook fallback


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
        rules = [(d, fs) for d in write_dirs] + [(f, LL_WRITE_FILE | (fs & LL_TRUNCATE)) for f in write_files]
        for path, allowed in rules:
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


def install_audit_guard(scratch: str, block_net: bool, block_writes: bool) -> list[str]:
    """Fallback when a kernel layer is missing: refuse sockets / writes outside scratch via sys.addaudithook.

    Audit hooks run inside the untrusted interpreter, so code using ctypes can bypass them; they stop
    ordinary code, not a determined attacker (docs/sandbox.md says so).
    """
    if not (block_net or block_writes):
        return []
    root = os.path.realpath(scratch) + os.sep
    write_events = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.truncate", "os.symlink", "os.link",
                    "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "shutil.move"}  # fmt: skip
    net_families = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True
        path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        return path in ("/dev/null",) or os.path.realpath(path).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if block_net and event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            if args and getattr(args[0], "family", None) in net_families:
                raise PermissionError("network access is disabled in the sandbox")
        elif block_writes and event == "open":
            path, mode, flags = args
            writing = any(c in str(mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR)
            if path is not None and writing and not inside(path):
                raise PermissionError(f"writes outside the scratch directory are disabled: {path}")
        elif block_writes and event in write_events and args and not all(inside(a) for a in args[:2] if a):
            raise PermissionError(f"{event} outside the scratch directory is disabled")

    sys.addaudithook(hook)
    return ["audit-hook"]
