"""Hostile code: each attack ends with the right status, and leaves no process, file or leak behind.

Process checks scan /proc for the session's processes: as root, those owned by the session's own uid;
otherwise (sessions share our uid) those of the session's process group, which without root and its PID
namespace the session names in host pids (an orphan that leaves the group is not covered without root).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from autocode4math.sandbox import UID_BASE, SandboxConfig, SandboxPool

ROOT = os.getuid() == 0


@pytest.fixture
def host_dir():
    """A world-writable directory that sessions can see (outside the private /tmp, /run and /dev/shm)."""
    if not os.path.isdir("/var/tmp"):
        pytest.skip("no /var/tmp")
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="autocode-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(SandboxConfig(timeout_s=2.0, memory_mb=256, max_processes=16), workers=2) as p:
        yield p


def _procs_with_uid(uid: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        except (OSError, StopIteration):
            continue
        if int(uids[0]) == uid:
            found.append(int(pid))
    return found


def _run_fresh(pool: SandboxPool, code: str, setup: str = ""):
    """Run `code` in a new session; return (result, who, session), `who` naming the session's processes for _procs."""
    s = pool.open_session()
    who = _identity(pool, s)
    if setup:
        assert pool.run(s, setup).status == "ok"
    return pool.run(s, code), who, s


def _identity(pool: SandboxPool, session: str) -> tuple[int, int]:
    """(uid, process group) of a session, as the session itself reports them."""
    uid, group = pool.run(session, "import os\nos.getuid(), os.getpgid(0)").stdout.strip("()\n").split(",")
    return int(uid), int(group)


def _fd_target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return ""  # the directory listing's own fd


def _procs(who: tuple[int, int]) -> list[int]:
    """The session's processes (see the module docstring)."""
    uid, group = who
    return [pid for pid in _procs_with_uid(uid) if ROOT or _group_of(pid) == group]


def _group_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])  # fields after the name: state, ppid, pgrp
    except (OSError, IndexError, ValueError):
        return None


def _assert_gone(who: tuple[int, int]) -> None:
    """No process of the session is left (SIGKILL is asynchronous: allow the kernel a moment)."""
    assert who[0] >= UID_BASE if ROOT else (who[0] == os.getuid() and who[1] > 1)
    deadline = time.monotonic() + 3
    while _procs(who) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _procs(who) == []


def test_infinite_loop_times_out_and_dies(pool):
    r, who, s = _run_fresh(pool, "while True:\n    pass")
    assert r.status == "timeout" and r.feedback() == "Timeout: execution exceeded 2 s"
    _assert_gone(who)
    later = pool.run(s, "1 + 1")
    assert later.status == "dead" and "timeout" in later.error
    pool.close_session(s)


def test_sigterm_ignoring_loop_and_its_children_die(pool):
    code = (
        "import os, signal, subprocess\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen(['sleep', '300'], start_new_session=True)\nwhile True:\n    pass"
    )
    r, who, s = _run_fresh(pool, code)
    assert r.status == "timeout"
    _assert_gone(who)
    pool.close_session(s)


def test_orphaned_child_is_killed_on_close(pool):
    # a double fork with setsid: the grandchild leaves the process group and is orphaned
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(300)\n    os._exit(0)\n'parent done'"  # noqa: E501
    r, who, s = _run_fresh(pool, code)
    assert (r.status, r.stdout) == ("ok", "'parent done'\n")
    assert len(_procs(who)) >= (2 if ROOT else 1)  # the session, and as root the orphan (same uid, other group)
    pool.close_session(s)
    _assert_gone(who)


@pytest.mark.parametrize(
    "code", ["x = bytearray(4 * 1024**3)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 1024**2))"]
)
def test_memory_bomb_is_a_memory_status_and_session_survives(pool, code):
    r, _uid, s = _run_fresh(pool, code)
    assert r.status == "memory" and "MemoryError" in r.feedback()
    assert pool.run(s, "'still alive'").stdout == "'still alive'\n"
    pool.close_session(s)


def test_fork_bomb_is_contained(pool):
    r, who, s = _run_fresh(pool, "import os\nwhile True:\n    os.fork()")
    assert r.status in ("error", "timeout")  # fork fails at the process limit (BlockingIOError) or time runs out
    pool.close_session(s)
    _assert_gone(who)
    s = pool.open_session()
    assert pool.run(s, "'machine fine'").stdout == "'machine fine'\n"
    pool.close_session(s)


def test_huge_output_is_truncated_head_and_tail(pool):
    r, _uid, s = _run_fresh(pool, "print('A' * 50_000_000 + 'B' * 50_000_000)")
    assert r.status == "ok"
    assert r.stdout.startswith("A" * 1000) and r.stdout.endswith("B" * 1000 + "\n")
    assert "characters truncated" in r.stdout and len(r.stdout) < 4200
    pool.close_session(s)


def test_endless_print_loop_times_out_with_bounded_output(pool):
    r, who, s = _run_fresh(pool, "i = 0\nwhile True:\n    print('spam', i)\n    i += 1")
    assert r.status == "timeout"
    assert r.stdout.startswith("spam 0\nspam 1\n") and "output cut" in r.stdout and len(r.stdout) < 2200
    _assert_gone(who)
    pool.close_session(s)


def test_segfault_is_a_crash_status(pool):
    r, who, s = _run_fresh(pool, "import ctypes\nctypes.string_at(0)")
    assert r.status == "crashed" and "SIGSEGV" in r.error
    assert pool.run(s, "1").status == "dead"
    pool.close_session(s)
    _assert_gone(who)


def test_sys_exit_is_reported_and_session_survives(pool):
    r, _uid, s = _run_fresh(pool, "import sys\nsys.exit(3)")
    assert r.status == "exited" and r.feedback() == "SystemExit: 3"
    assert pool.run(s, "2 * 21").stdout == "42\n"
    pool.close_session(s)


def test_os_exit_is_a_crash_status(pool):
    r, _uid, s = _run_fresh(pool, "import os\nos._exit(7)")
    assert r.status == "crashed" and "code 7" in r.error
    pool.close_session(s)


def test_writes_and_deletes_outside_scratch_are_refused(pool, host_dir):
    victim = host_dir / "keep.txt"
    victim.write_text("precious")
    victim.chmod(0o666)  # world-writable, in a world-writable directory: file modes alone would not protect it
    attacks = {
        "write shared": f"open({str(host_dir / 'new.txt')!r}, 'w').write('x')",
        "overwrite": f"open({str(victim)!r}, 'w').write('gone')",
        "truncate": f"import os\nos.truncate({str(victim)!r}, 0)",
        "delete": f"import os\nos.remove({str(victim)!r})",
        "rename": f"import os\nos.rename({str(victim)!r}, {str(host_dir / 'moved')!r})",
    }
    for name, code in attacks.items():
        r, _uid, s = _run_fresh(pool, code)
        assert r.status == "error" and ("PermissionError" in r.error or "Read-only" in r.error), (name, r)
        pool.close_session(s)
    assert victim.read_text() == "precious" and sorted(p.name for p in host_dir.iterdir()) == ["keep.txt"]
    r, _uid, s = _run_fresh(pool, "open('notes.txt', 'w').write('ok')\nopen('/tmp/notes.txt').read()")
    assert (r.status, r.stdout) == ("ok", "'ok'\n")  # the scratch directory (the session's /tmp) is writable
    pool.close_session(s)
    r, _uid, s = _run_fresh(pool, "open('/tmp/autocode_sandbox_escape.txt', 'w').write('x')")
    assert r.status == "ok" and not os.path.exists("/tmp/autocode_sandbox_escape.txt")  # a private /tmp
    pool.close_session(s)


def test_no_network_to_a_local_listener(pool):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    r, _uid, s = _run_fresh(pool, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    assert r.status == "error" and ("Error" in r.feedback())
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()
    pool.close_session(s)


def test_environment_secret_does_not_leak(monkeypatch):
    monkeypatch.setenv("AUTOCODE_TEST_SECRET", "hunter2-secret")
    code = (
        "import os\nprint(dict(os.environ))\nprint(open('/proc/self/environ', 'rb').read())\n"
        f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\nexcept OSError as e:\n    print(e)"
    )
    with SandboxPool(SandboxConfig(timeout_s=5), workers=1) as p:
        r = p.run(p.open_session(), code)
    assert r.status == "ok" and "HOME" in r.stdout
    assert "hunter2" not in r.stdout


def test_fallback_layers_still_block_writes_network_and_orphans(tmp_path):
    """With namespaces and Landlock switched off, the audit hook and uid sweep take over."""
    with SandboxPool(SandboxConfig(timeout_s=3, namespaces=False, landlock=False), workers=1) as p:
        s = p.open_session()
        who = _identity(p, s)
        assert "audit-hook" in p.layers and "landlock-fs" not in p.layers
        write = p.run(s, f"open({str(tmp_path / 'x')!r}, 'w')")
        assert write.status == "error" and "PermissionError" in write.feedback()
        net = p.run(s, "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
        assert net.status == "error" and "network access is disabled" in net.feedback()
        orphan = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(300)\n'spawned'"
        assert p.run(s, orphan).status == "ok"
        p.close_session(s)
        _assert_gone(who)


@pytest.mark.slow
def test_soak_2000_executions_leak_nothing(pool):
    def census() -> tuple[int, int]:
        """Open fds (but uid lease locks) and threads, once the kernel has finished closing sessions."""
        time.sleep(0.3)
        s = pool.open_session()  # taking a slot collects every reported exit
        pool.run(s, "pass")
        pool.close_session(s)
        fds = [_fd_target(fd) for fd in os.listdir("/proc/self/fd")]
        leases = [path for path in fds if path.endswith(".lock") and "/uid-" in path]
        assert len(leases) <= 2 * (20 + pool.config.prefork)  # uids are reused, not leased per session
        return len(fds) - len(leases), threading.active_count()

    def run_round(k: int) -> None:
        sessions = [pool.open_session() for _ in range(20)]
        codes = ["x = 1", "x += 1\nprint(x)", "1/0", "from fractions import Fraction\nFraction(x, 3)", "x"]
        requests = [(s, code) for code in codes * 2 for s in sessions]
        results = pool.run_many(requests)
        assert [r.status for r in results[20:40]] == ["ok"] * 20 and results[40].status == "error"
        for s in sessions:
            pool.close_session(s)

    run_round(0)  # warm: the pool's threads exist from here on
    before = census()
    for k in range(1, 10):
        run_round(k)  # 9 rounds x 200 blocks + the warm-up round = 2,000 executions
    assert census() == before
    template = pool._template.pid
    deadline = time.monotonic() + 5  # a monitor exits just after its last message: allow it a moment
    while time.monotonic() < deadline:
        with open(f"/proc/{template}/task/{template}/children") as f:
            children = f.read().split()
        if len(children) <= pool.config.prefork:
            break
        time.sleep(0.05)
    assert len(children) <= pool.config.prefork  # every session was reaped; only pre-forked ones wait
