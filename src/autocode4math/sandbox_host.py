"""Machine-wide resources of sandbox sessions: uids leased across pools, memory cgroups, scratch trees.

Several pools may run on one machine at once (parallel `autocode exec`, rollout workers, a fleet), so
nothing here may be numbered per pool: a session's uid is *leased* machine-wide with a lock file held
under flock (the kernel drops the lock when the holding process dies, so a killed pool frees its uids
without any cleanup), and whatever a previous holder of a uid may have left behind (processes, a
scratch tree, a cgroup) is removed by the next holder before its first session runs.

Deliberately simplified: only cgroup v1's memory controller is used (the development and CI machines
mount the memory controller under v1 only); with cgroup v2 or no usable hierarchy, `MemoryCgroups` is
inactive and docs/sandbox.md states the remaining bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import stat
import tempfile
from collections.abc import Iterator

UID_BASE = 640_000
"""Leased uids are UID_BASE .. UID_BASE + UID_COUNT - 1; no file on the machine is owned by them."""
UID_COUNT = 60_000
LOCK_DIRS = ("/run/autocode-sandbox", os.path.join(tempfile.gettempdir(), "autocode-sandbox-locks"))
SCRATCH_ROOT = os.path.join(tempfile.gettempdir(), "autocode-sandbox-scratch")
V1_MEMORY = "/sys/fs/cgroup/memory"
CGROUP_DIR = "autocode-sandbox"


def remove_tree(path: str, max_entries: int = 10_000_000) -> bool:
    """Delete `path` and everything under it without recursion and without ever raising; True if it is gone.

    Walks down with directory file descriptors (O_NOFOLLOW: symlinks are removed, never followed), so
    the depth is bounded neither by the recursion limit, nor by the fd limit, nor by PATH_MAX. Meant
    for trees whose writers are dead (a closed session's scratch directory).
    """
    try:
        return _remove_tree(path, max_entries)
    except Exception:  # noqa: BLE001 - cleanup must not fail the caller; a leftover is reported by False
        return not os.path.lexists(path)


def _remove_tree(path: str, budget: int) -> bool:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        os.unlink(path)
        return True
    names: list[str] = []  # the directory names from `path` down to fd
    stuck: set[tuple[int, int]] = set()
    while budget > 0:
        budget -= 1
        sub = _clear_files(fd, stuck)
        if sub is not None:
            try:
                child = os.open(sub, flags, dir_fd=fd)
            except OSError:
                stuck.add(_ino(fd, sub))
                continue
            os.close(fd)
            fd = child
            names.append(sub)
            continue
        if not names:
            os.close(fd)
            os.rmdir(path)
            return True
        parent = os.open("..", flags, dir_fd=fd)
        os.close(fd)
        fd, name = parent, names.pop()
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:
            stuck.add(_ino(fd, name))
    os.close(fd)
    return not os.path.lexists(path)


def _clear_files(fd: int, stuck: set[tuple[int, int]]) -> str | None:
    """Unlink every non-directory in `fd`; return one subdirectory still to descend into (None: none left)."""
    dev = os.fstat(fd).st_dev
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if (entry.inode(), dev) not in stuck:
                    return entry.name
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.name, dir_fd=fd)
    return None


def _ino(fd: int, name: str) -> tuple[int, int]:
    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    return st.st_ino, st.st_dev


# ---------------------------------------------------------------- uid leases


class UidLeases:
    """Lease uids machine-wide: uid u is held by whoever holds an flock on `<lock dir>/uid-<u>.lock`."""

    def __init__(self) -> None:
        self.dir = _private_dir(LOCK_DIRS)
        self._held: dict[int, int] = {}  # uid -> fd of its lock file

    def lease(self) -> int:
        """A uid no live session on this machine has (raises RuntimeError when all are taken)."""
        start = random.randrange(UID_COUNT)
        for k in range(UID_COUNT):
            uid = UID_BASE + (start + k) % UID_COUNT
            if uid in self._held:
                continue
            fd = self._try_lock(uid)
            if fd is not None:
                self._held[uid] = fd
                return uid
        raise RuntimeError(f"all {UID_COUNT} sandbox uids are leased")

    def is_free(self, uid: int) -> bool:
        """Whether no process holds `uid` (probing takes the lock for a moment)."""
        if uid in self._held:
            return False
        fd = self._try_lock(uid)
        if fd is None:
            return False
        os.close(fd)
        return True

    @contextlib.contextmanager
    def holding(self, uid: int) -> Iterator[bool]:
        """Hold `uid`'s lock for the duration (True) if nobody holds it, else yield False; for cleaning up after it."""
        fd = None if uid in self._held else self._try_lock(uid)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def release(self, uid: int) -> None:
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)

    def _try_lock(self, uid: int) -> int | None:
        fd = os.open(os.path.join(self.dir, f"uid-{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


def _private_dir(candidates: tuple[str, ...]) -> str:
    """The first candidate that is (or can be made) a root-owned directory only root can use."""
    for path in candidates:
        with contextlib.suppress(OSError):
            os.makedirs(path, 0o700, exist_ok=True)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
                return path
    raise RuntimeError(f"no private directory for sandbox locks among {candidates}")


def scratch_root() -> str:
    """The root-owned parent (mode 0711) of per-uid scratch directories, used when a session has no tmpfs."""
    os.makedirs(SCRATCH_ROOT, 0o711, exist_ok=True)
    st = os.lstat(SCRATCH_ROOT)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise RuntimeError(f"{SCRATCH_ROOT} is not a root-owned directory that only root can write")
    return SCRATCH_ROOT


def sweep_stale_scratch(leases: UidLeases) -> None:
    """Remove scratch trees whose uid nobody holds (left by a killed pool), so nothing stays readable."""
    with contextlib.suppress(OSError), os.scandir(SCRATCH_ROOT) as entries:
        for entry in entries:
            if entry.name.isdigit():
                with leases.holding(int(entry.name)) as free:  # held, so nobody leases it meanwhile
                    if free:
                        remove_tree(entry.path)


# ---------------------------------------------------------------- memory cgroups


class MemoryCgroups:
    """One cgroup v1 memory group per leased uid, nested under the caller's own memory cgroup.

    The group bounds all memory a session holds, whatever the way: every process, anonymous memory,
    memfd and tmpfs files (its /tmp), page cache it fills. The kernel's OOM killer acts inside the
    group only; `oom_kills` tells the pool when that happened. `active` is False when no usable
    hierarchy exists (not root, cgroup v2 only, read-only cgroupfs).
    """

    def __init__(self) -> None:
        self.base = _v1_memory_base() if os.geteuid() == 0 else ""
        self.active = bool(self.base)

    def create(self, uid: int, limit_bytes: int) -> str:
        """The (new or reused) group of `uid`, limited to `limit_bytes` of memory and memory+swap."""
        if not self.active:
            return ""
        path = os.path.join(self.base, str(uid))
        os.makedirs(path, exist_ok=True)
        _write(path, "memory.limit_in_bytes", limit_bytes)
        with contextlib.suppress(OSError):  # absent without swap accounting
            _write(path, "memory.memsw.limit_in_bytes", limit_bytes)
        return path

    def oom_kills(self, path: str) -> int:
        """How often the kernel's OOM killer acted in the group so far."""
        with contextlib.suppress(OSError, ValueError), open(os.path.join(path, "memory.oom_control")) as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        return 0

    def remove(self, path: str) -> None:
        """Remove a group (and the shared parent once it is empty); errors leave it for a later sweep."""
        for directory in (path, self.base if path else ""):
            if directory:
                with contextlib.suppress(OSError):
                    os.rmdir(directory)

    def sweep(self, leases: UidLeases) -> None:
        """Remove empty groups of uids nobody holds (left by a killed pool)."""
        if not self.active:
            return
        with contextlib.suppress(OSError), os.scandir(self.base) as entries:
            for entry in entries:
                if entry.is_dir() and entry.name.isdigit():
                    with leases.holding(int(entry.name)) as free:
                        if free:
                            self.remove(entry.path)


def _v1_memory_base() -> str:
    """`<v1 memory mount>/<our own group>/autocode-sandbox`, created; "" when that is not possible."""
    try:
        with open("/proc/self/cgroup") as f:
            own = next(line.split(":", 2)[2].strip() for line in f if "memory" in line.split(":")[1].split(","))
        base = os.path.join(V1_MEMORY, own.lstrip("/"), CGROUP_DIR)
        os.makedirs(base, exist_ok=True)
        if not os.path.exists(os.path.join(base, "memory.limit_in_bytes")):
            return ""
        return base
    except (OSError, StopIteration, IndexError):
        return ""


def _write(path: str, name: str, value: int) -> None:
    with open(os.path.join(path, name), "w") as f:
        f.write(str(value))
