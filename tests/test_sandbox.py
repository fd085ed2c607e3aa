"""Sandbox behaviour the rollout engine relies on: results, sessions, batches, and the `autocode exec` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from autocode4math.sandbox import ExecResult, SandboxConfig, SandboxPool, _classify_exit, execute


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(SandboxConfig(timeout_s=3.0), workers=2) as p:
        yield p


def test_feedback_is_stdout_plus_last_error_line():
    tb = "Traceback (most recent call last):\n  File \"<cell 1>\", line 1\nNameError: name 'x' is not defined"
    assert ExecResult("error", "3\n", tb, 0.1).feedback() == "3\nNameError: name 'x' is not defined"
    assert ExecResult("ok", "42\n", "", 0.1).feedback() == "42"
    assert ExecResult("timeout", "", "Timeout: execution exceeded 10 s", 10).feedback() == (
        "Timeout: execution exceeded 10 s"
    )
    assert ExecResult("ok", "", "", 0.0).to_dict()["status"] == "ok"


def test_exit_codes_are_classified():
    assert _classify_exit(-11)[0] == "crashed" and "SIGSEGV" in _classify_exit(-11)[1]
    assert _classify_exit(-9) == ("killed", "Killed: terminated by SIGKILL")
    assert _classify_exit(-24)[0] == "timeout"  # SIGXCPU: the CPU rlimit backstop
    assert _classify_exit(3)[0] == "crashed" and "code 3" in _classify_exit(3)[1]


@pytest.mark.parametrize("field,value", [("timeout_s", 0), ("memory_mb", -1), ("max_output_chars", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SandboxConfig(**{field: value})


def test_session_keeps_state_and_shows_final_expression(pool):
    s = pool.open_session()
    first = pool.run(s, "x = 6\nprint('set')\nx * 7")
    assert (first.status, first.stdout) == ("ok", "set\n42\n")
    second = pool.run(s, "y = x + 1\ny")
    assert (second.status, second.stdout) == ("ok", "7\n")  # only this block's output, no replay
    assert pool.run(s, "None").stdout == ""  # like a notebook, None is not shown
    pool.close_session(s)


def test_errors_do_not_lose_state(pool):
    s = pool.open_session()
    pool.run(s, "from fractions import Fraction\nf = Fraction(1, 3)")
    err = pool.run(s, "print('before')\nundefined_name")
    assert err.status == "error"
    assert err.feedback() == "before\nNameError: name 'undefined_name' is not defined"
    assert "<cell 2>" in err.error and "sandbox_worker" not in err.error  # only the code's own frames
    assert pool.run(s, "print(f * 3)").stdout == "1\n"
    syntax = pool.run(s, "def broken(:\n  pass")
    assert syntax.status == "error" and "SyntaxError" in syntax.feedback()
    assert pool.run(s, "f + 1").stdout == "Fraction(4, 3)\n"
    pool.close_session(s)


def test_preloaded_modules_work(pool):
    s = pool.open_session()
    r = pool.run(s, "import sympy as sp, numpy as np\nx = sp.Symbol('x')\nprint(sp.solve(x**2 - 5*x + 6, x))\n"
                 "int(np.arange(5).sum())")  # fmt: skip
    assert (r.status, r.stdout) == ("ok", "[2, 3]\n10\n")
    pool.close_session(s)


def test_run_many_is_ordered_and_isolates_sessions(pool):
    a, b = pool.open_session(), pool.open_session()
    requests = [(a, "v = 'a'"), (b, "v = 'b'"), (a, "v + '1'"), (b, "v + '2'"), (a, "v + '3'")]
    results = pool.run_many(requests)
    assert [r.stdout for r in results] == ["", "", "'a1'\n", "'b2'\n", "'a3'\n"]
    assert pool.run_many([]) == []
    pool.close_session(a)
    pool.close_session(b)


def test_unknown_or_closed_session_is_a_clear_error(pool):
    s = pool.open_session()
    pool.close_session(s)
    with pytest.raises(KeyError, match="unknown sandbox session"):
        pool.run(s, "1")
    with pytest.raises(KeyError, match="nope"):
        pool.run_many([("nope", "1")])


def test_oversized_code_is_refused_without_running():
    with SandboxPool(SandboxConfig(max_code_chars=10), workers=1) as p:
        r = p.run(p.open_session(), "print('this is too long')")
    assert r.status == "error" and "CodeTooLong" in r.error


def test_execute_one_shot():
    r = execute("import math\nmath.factorial(10)", SandboxConfig(timeout_s=5))
    assert (r.status, r.stdout) == ("ok", "3628800\n")
    assert r.duration_s >= 0


def test_exec_command_prints_json_last_line():
    code = "print('hello')\n1/0"
    cmd = [sys.executable, "-c", "from autocode4math.cli import app; app()", "exec", "--timeout", "5"]
    proc = subprocess.run(cmd, input=code, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "error" and out["stdout"] == "hello\n"
    assert out["error"].endswith("ZeroDivisionError: division by zero")
    assert set(out) >= {"status", "stdout", "error", "duration_s"}


@pytest.mark.slow
def test_bench_sandbox_reports_throughput_cpu_and_overheads(capsys):
    from autocode4math.bench import bench_sandbox, fork_floor, print_sandbox_table, sandbox_overheads

    figures, layers = bench_sandbox(n=3, workers=2)
    assert set(figures) == {
        f"{b}{kind}" for b in ("print", "sympy", "fractions") for kind in ("", "_reference", "_parallel")
    }
    for name in ("print", "sympy", "fractions"):
        pool, ref, par = figures[name], figures[f"{name}_reference"], figures[f"{name}_parallel"]
        assert pool["exec_per_s"] > 0 and ref["exec_per_s"] > 0 and pool["cpu_ms"] > 0
        assert pool["speedup"] == pytest.approx(pool["exec_per_s"] / ref["exec_per_s"])
        assert pool["of_parallel"] == pytest.approx(pool["exec_per_s"] / par["exec_per_s"])
        assert par["speedup"] == pytest.approx(par["exec_per_s"] / ref["exec_per_s"]) and par["workers"] == 2
        assert pool["cpu_speedup"] == pytest.approx(min(2, os.cpu_count()) * ref["cpu_ms"] / pool["cpu_ms"])
    assert figures["sympy_parallel"]["cpu_ms"] > 0 and figures["sympy_reference"]["cpu_ms"] > 0
    assert "rlimits" in layers
    parts = sandbox_overheads(n=2)
    assert set(parts) == {"start_ms", "block_ms", "close_ms", "session_cpu_ms", "sympy_first_ms", "sympy_again_ms"}
    assert parts["session_cpu_ms"] > 0 and parts["sympy_first_ms"] > parts["block_ms"]
    print_sandbox_table(figures, layers, parts)
    printed = capsys.readouterr().out
    assert "2 unisolated" in printed and "of the unisolated workers' exec/s" in printed
    floor = fork_floor(n=2)
    # the first snippet in a fresh child writes pages shared with its parent; the second finds them copied
    assert floor["fork_first_faults"] > 2 * floor["fork_again_faults"] and floor["fork_first_ms"] > 0
    assert floor["fork_child_cpu_ms"] >= floor["fork_first_ms"] + floor["fork_again_ms"] - 2


def test_exec_command_takes_any_sandbox_setting():
    cmd = [sys.executable, "-c", "from autocode4math.cli import app; app()", "exec", "--set", "max_output_chars=20"]
    proc = subprocess.run(cmd, input="print('y' * 1000)", capture_output=True, text=True, timeout=60)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "ok" and "characters truncated" in out["stdout"] and len(out["stdout"]) < 100
    bad = subprocess.run(cmd[:4] + ["--set", "scratch_mb=0"], input="1", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "scratch_mb" in bad.stderr and "Traceback" not in bad.stderr
