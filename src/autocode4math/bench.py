"""`autocode bench ...`: throughput figures, one function per benchmark (others add theirs here).

Sandbox benchmark: realistic batches of model-like code (trivial prints, sympy solving and simplifying,
loops over fractions.Fraction), each run twice in the same process and run:
  (a) the `SandboxPool`, every execution in its own fresh isolated session (fork from the warm template,
      namespaces, uid, rlimits, Landlock), `workers` executions in flight;
  (b) a reference executor in the style of common math-evaluation harnesses: one long-lived worker
      process that exec()s each snippet in a fresh dict with stdout redirected, no isolation.
Latency is submit-to-result of one execution (for the pool it includes forking the session); throughput
is executions per wall-clock second over the batch. Snippets vary their numbers so no cache serves them.
Deliberately simplified: one pass per batch (run the command several times; the CPU may be shared).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from autocode4math.sandbox import SandboxConfig, SandboxPool

# The reference worker: read one JSON line (code), exec it, answer one JSON line. Written for this benchmark.
_REFERENCE_WORKER = r"""
import contextlib, io, json, sys, traceback
import math, itertools, fractions, numpy, sympy
for line in sys.stdin:
    code, buf = json.loads(line), io.StringIO()
    status = "ok"
    try:
        with contextlib.redirect_stdout(buf):
            exec(code, {"__name__": "__main__"})
    except BaseException:
        status = "error: " + traceback.format_exc().splitlines()[-1]
    sys.stdout.write(json.dumps({"status": status, "stdout": buf.getvalue()[-4000:]}) + "\n")
    sys.stdout.flush()
"""


def sandbox_batches(n: int) -> dict[str, list[str]]:
    """n snippets per batch, each with its own numbers (so results differ and caches do not help)."""
    prints = [f"a = {i}\nprint('value', a * 2)" for i in range(n)]
    sympy_code = (
        "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - {s}*x + {p}, x))\n"
        "print(sp.simplify((x**2 - {q}) / (x - {r}) - x))"
    )
    sympy_batch = [sympy_code.format(s=i + (i + 3), p=i * (i + 3), q=(i + 2) ** 2, r=i + 2) for i in range(n)]
    fraction_code = (
        "from fractions import Fraction\ntotal = Fraction(0)\nfor k in range(1, {m}):\n"
        "    total += Fraction(1, k * (k + 1))\nprint(total)"
    )
    fractions_batch = [fraction_code.format(m=200 + i) for i in range(n)]
    return {"print": prints, "sympy": sympy_batch, "fractions": fractions_batch}


def _measure(run_one: Callable[[str], str], codes: list[str], workers: int) -> tuple[dict, list[str]]:
    """Throughput and latency percentiles of running `codes` with `workers` in flight."""

    def timed(code: str) -> tuple[float, str]:
        start = time.perf_counter()
        status = run_one(code)
        return time.perf_counter() - start, status

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        out = list(ex.map(timed, codes))
    wall = time.perf_counter() - start
    lat = sorted(t for t, _ in out)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    figures = {"exec_per_s": len(codes) / wall, "p50_ms": statistics.median(lat) * 1000, "p99_ms": p99 * 1000}
    return figures, [s for _, s in out]


class _Reference:
    """One long-lived, unisolated worker process that exec()s snippets one after another."""

    def __init__(self) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", _REFERENCE_WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        self.run("pass")  # wait until its imports are done, like the pool's template

    def run(self, code: str) -> str:
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def bench_sandbox(
    n: int = 200, workers: int | None = None, timeout_s: float = 30.0
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Figures per batch (`<batch>`: isolated pool with its speed-up, `<batch>_reference`) and the active layers."""
    workers = workers or os.cpu_count() or 1
    figures: dict[str, dict[str, float]] = {}
    layers: list[str] = []
    reference = _Reference()
    try:
        with SandboxPool(SandboxConfig(timeout_s=timeout_s), workers=workers) as pool:

            def isolated(code: str) -> str:
                session = pool.open_session()
                try:
                    return pool.run(session, code).status
                finally:
                    pool.close_session(session)

            isolated("pass")  # the pool's first session
            for name, codes in sandbox_batches(n).items():
                ref, ref_status = _measure(reference.run, codes, 1)
                iso, iso_status = _measure(isolated, codes, workers)
                bad = [s for s in iso_status + ref_status if s != "ok"]
                if bad:
                    raise RuntimeError(f"batch {name!r}: {len(bad)} executions failed, e.g. {bad[0]}")
                figures[name] = {**iso, "workers": workers, "speedup": iso["exec_per_s"] / ref["exec_per_s"]}
                figures[f"{name}_reference"] = {**ref, "workers": 1}
            layers = pool.layers
    finally:
        reference.close()
    return figures, layers


def print_sandbox_table(figures: dict[str, dict[str, float]], layers: list[str]) -> None:
    """A rich table: one row per batch and executor."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Sandbox throughput (isolated pool vs. single in-process worker)")
    for col in ("batch", "executor", "exec/s", "p50 ms", "p99 ms", "speed-up"):
        table.add_column(col, justify="left" if col in ("batch", "executor") else "right")
    for name, row in figures.items():
        if name.endswith("_reference"):
            continue
        ref = figures[f"{name}_reference"]
        table.add_row(name, f"isolated pool ({int(row['workers'])} workers)", f"{row['exec_per_s']:.1f}",
                      f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}", f"{row['speedup']:.2f}x")  # fmt: skip
        table.add_row("", "reference (1 worker, no isolation)", f"{ref['exec_per_s']:.1f}", f"{ref['p50_ms']:.1f}",
                      f"{ref['p99_ms']:.1f}", "1.00x")  # fmt: skip
    console = Console()
    console.print(table)
    console.print("isolation layers active: " + ", ".join(layers))
