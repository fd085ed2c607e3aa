"""`autocode bench ...`: throughput figures, one function per benchmark (others add theirs here).

Sandbox benchmark: realistic batches of model-like code (trivial prints, sympy solving and simplifying,
loops over fractions.Fraction), each run by two executors in turns, in the same process and run:
  (a) the `SandboxPool`, every execution in its own fresh isolated session (fork from the warm template,
      every isolation layer of docs/sandbox.md), `workers` executions in flight;
  (b) a reference executor in the style of common math-evaluation harnesses: one long-lived worker
      process that exec()s each snippet in a fresh dict with stdout redirected, no isolation.
Latency is submit-to-result of one execution (for the pool it includes forking the session); throughput
is executions per wall-clock second over the batch. Snippets vary their numbers so no cache serves them.
Also printed: CPU per execution and the speed-up CPU alone allows, and where an execution's overhead goes
(`sandbox_overheads`). Deliberately simplified: one pass per batch (run the command several times).

Rollout and M-step benchmarks (`bench_rollout`, `bench_train`) on random-weight models of real architectures:
what they measure, their assumptions and the formulas of their bounds are in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autocode4math.perf import arch_tokenizer, random_model
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


# The floor of any fresh-process-per-snippet design, isolation aside: a process with the template's imports,
# warm-up and frozen heap forks one bare child per sympy snippet (no namespaces, limits or IPC). Written for this
# benchmark; prints one JSON object of medians.
_FORK_FLOOR = r"""
import contextlib, gc, io, json, os, resource, statistics, sys
from autocode4math import sandbox_worker
from autocode4math.bench import sandbox_batches
sandbox_worker.warm_up()
gc.freeze()
sandbox_worker.huge_pages()
n = int(sys.argv[1])
codes = sandbox_batches(2 * n)["sympy"]

def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1000, r.ru_minflt

def timed(code):
    before = usage()
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, {"__name__": "__main__"})
    after = usage()
    return after[0] - before[0], after[1] - before[1]

rows, exits = [], []
for i in range(n):
    read, write = os.pipe()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:
        os.write(write, json.dumps([timed(codes[2 * i]), timed(codes[2 * i + 1])]).encode())
        os._exit(0)
    os.close(write)
    rows.append(json.loads(os.read(read, 4096)))
    os.close(read)
    os.waitpid(pid, 0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    exits.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000)
med = statistics.median
print(json.dumps({"fork_first_ms": med(r[0][0] for r in rows), "fork_first_faults": med(r[0][1] for r in rows),
                  "fork_again_ms": med(r[1][0] for r in rows), "fork_again_faults": med(r[1][1] for r in rows),
                  "fork_child_cpu_ms": med(exits)}))
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


class _Meter:
    """Wall time, latencies and statuses of one executor, summed over the chunks of a batch it ran."""

    def __init__(self, run_one: Callable[[str], str], workers: int) -> None:
        self.run_one, self.workers = run_one, workers
        self.wall, self.latencies, self.statuses = 0.0, [], []

    def run(self, codes: list[str]) -> None:
        def timed(code: str) -> tuple[float, str]:
            start = time.perf_counter()
            status = self.run_one(code)
            return time.perf_counter() - start, status

        start = time.perf_counter()
        with ThreadPoolExecutor(self.workers) as ex:
            out = list(ex.map(timed, codes))
        self.wall += time.perf_counter() - start
        self.latencies += [t for t, _ in out]
        self.statuses += [s for _, s in out]

    def figures(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        return {"exec_per_s": len(lat) / self.wall, "p50_ms": statistics.median(lat) * 1000, "p99_ms": p99 * 1000}


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

    def cpu_seconds(self) -> float:
        return _proc_cpu_seconds(self.proc.pid, children=False)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _ReferenceFleet:
    """`workers` reference workers side by side: what unisolated parallel execution reaches on this machine."""

    def __init__(self, members: list[_Reference]) -> None:
        self.members = members
        self.free: queue.Queue[_Reference] = queue.Queue()
        for member in self.members:
            self.free.put(member)

    def run(self, code: str) -> str:
        member = self.free.get()
        try:
            return member.run(code)
        finally:
            self.free.put(member)

    def cpu_seconds(self) -> float:
        return sum(m.cpu_seconds() for m in self.members)


def _proc_cpu_seconds(pid: int, children: bool) -> float:
    """User + system CPU of process `pid` (and of its reaped children), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11 : 15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def _pool_cpu_seconds(pool: SandboxPool) -> float:
    """CPU used so far by this process (the pool's threads) and by the template and the sessions it reaped."""
    return time.process_time() + pool.cpu_seconds()


def bench_sandbox(
    n: int = 200, workers: int | None = None, timeout_s: float = 30.0
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Figures per batch and the active layers.

    Rows per batch: `<batch>` (the isolated pool), `<batch>_reference` (one unisolated worker) and
    `<batch>_parallel` (`workers` unisolated workers side by side: the speed-up this machine gives
    parallel work at all, which on a shared or SMT host is less than `workers`). The three executors take
    turns on chunks of `10 x workers` snippets, so all see the same load when the machine is shared.
    Besides exec/s and latency, each row has `cpu_ms`: CPU per execution over every process involved (for
    the pool: its threads, the template and the sessions; kernel threads are not counted); the pool row
    has `speedup` (over the reference), `of_parallel` (its exec/s as a share of the parallel row's) and
    `cpu_speedup`: the speed-up where CPU is the only limit, min(workers, CPUs) x reference / pool cpu_ms.
    """
    workers = workers or os.cpu_count() or 1
    cores = min(workers, os.cpu_count() or 1)
    chunk = 10 * workers
    figures: dict[str, dict[str, float]] = {}
    layers: list[str] = []
    with contextlib.ExitStack() as stack:  # every worker started is stopped, whatever fails
        reference = _started(stack)
        parallel = _ReferenceFleet([_started(stack) for _ in range(workers)])
        pool = stack.enter_context(SandboxPool(SandboxConfig(timeout_s=timeout_s), workers=workers))

        def isolated(code: str) -> str:
            session = pool.open_session()
            try:
                return pool.run(session, code).status
            finally:
                pool.close_session(session)

        isolated("pass")  # the pool's first session
        for name, codes in sandbox_batches(n).items():
            meters = {"ref": _Meter(reference.run, 1), "par": _Meter(parallel.run, workers),
                      "iso": _Meter(isolated, workers)}  # fmt: skip
            time.sleep(0.3)  # the sessions of the last batch are reaped: their CPU is not counted here
            start = {"ref": reference.cpu_seconds(), "par": parallel.cpu_seconds(), "iso": pool.cpu_seconds()}
            driver = 0.0  # CPU of this process's threads while they drive the pool (they run its logic)
            for i in range(0, n, chunk):  # alternate, so all executors see the same load on a shared machine
                meters["ref"].run(codes[i : i + chunk])
                meters["par"].run(codes[i : i + chunk])
                before = time.process_time()
                meters["iso"].run(codes[i : i + chunk])
                driver += time.process_time() - before
            time.sleep(0.3)  # and the last sessions of this one are
            used = {"ref": reference.cpu_seconds() - start["ref"], "par": parallel.cpu_seconds() - start["par"],
                    "iso": pool.cpu_seconds() - start["iso"] + driver}  # fmt: skip
            rows = {k: {**m.figures(), "cpu_ms": used[k] / n * 1000} for k, m in meters.items()}
            bad = [s for m in meters.values() for s in m.statuses if s != "ok"]
            if bad:
                raise RuntimeError(f"batch {name!r}: {len(bad)} executions failed, e.g. {bad[0]}")
            ref, par, iso = rows["ref"], rows["par"], rows["iso"]
            figures[name] = {**iso, "workers": workers, "speedup": iso["exec_per_s"] / ref["exec_per_s"],
                             "of_parallel": iso["exec_per_s"] / par["exec_per_s"],
                             "cpu_speedup": cores * ref["cpu_ms"] / iso["cpu_ms"]}  # fmt: skip
            figures[f"{name}_reference"] = {**ref, "workers": 1}
            par_speedup = par["exec_per_s"] / ref["exec_per_s"]
            figures[f"{name}_parallel"] = {**par, "workers": workers, "speedup": par_speedup}
        layers = pool.layers
    return figures, layers


def _started(stack: contextlib.ExitStack) -> _Reference:
    """A reference worker whose stop is registered on `stack`."""
    worker = _Reference()
    stack.callback(worker.close)
    return worker


def fork_floor(n: int = 20) -> dict[str, float]:
    """What a fresh process per snippet costs before any isolation (medians over n sympy snippets, in ms).

    A process with the template's imports, warm-up and frozen heap forks n bare children; each runs two
    sympy snippets of the same form (other numbers). fork_first_ms / fork_first_faults: CPU and minor page
    faults of the first (the pages it writes are still shared with the parent: each write copies a 4 KiB
    page, mostly reference counts of the objects sympy touches); fork_again_ms / _faults: the second, the
    pages already copied; fork_child_cpu_ms: the child's whole CPU, exit included.
    """
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _FORK_FLOOR, str(n)], capture_output=True, text=True, env=env,
                         timeout=600, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def sandbox_overheads(n: int = 20, timeout_s: float = 30.0) -> dict[str, float]:
    """Where an isolated execution's time goes: one worker, no pre-forking, sequential; medians in ms.

    start_ms: the first block's extra latency in a new session (fork from the template, isolation
    layers); block_ms: one `pass` block's round trip; close_ms: the close_session call (the kernel
    tears the session down afterwards); session_cpu_ms: CPU of a whole empty session (open, one block,
    close) over all processes; sympy_first_ms / sympy_again_ms: a sympy snippet as the first block of a
    session (its pages still shared with the template) and as a later one (already copied).
    """
    codes = sandbox_batches(n + 1)["sympy"]
    starts, blocks, closes, firsts, agains = [], [], [], [], []
    with SandboxPool(SandboxConfig(timeout_s=timeout_s, prefork=0), workers=1) as pool:
        warm = pool.open_session()
        pool.run(warm, "pass")
        pool.close_session(warm)
        time.sleep(0.3)
        cpu = _pool_cpu_seconds(pool)
        for _ in range(n):
            t0 = time.perf_counter()
            session = pool.open_session()
            pool.run(session, "pass")
            t1 = time.perf_counter()
            pool.run(session, "pass")
            t2 = time.perf_counter()
            pool.close_session(session)
            closes.append(time.perf_counter() - t2)
            starts.append((t1 - t0) - (t2 - t1))
            blocks.append(t2 - t1)
            time.sleep(0.01)  # let the kernel tear it down, so its CPU is in the count below
        time.sleep(0.3)
        session_cpu = (_pool_cpu_seconds(pool) - cpu) / n
        for i in range(n):
            session = pool.open_session()
            pool.run(session, "pass")
            t0 = time.perf_counter()
            pool.run(session, codes[i])
            t1 = time.perf_counter()
            pool.run(session, codes[i + 1])
            firsts.append(t1 - t0)
            agains.append(time.perf_counter() - t1)
            pool.close_session(session)
    ms = {"start_ms": starts, "block_ms": blocks, "close_ms": closes, "sympy_first_ms": firsts,
          "sympy_again_ms": agains}  # fmt: skip
    return {k: statistics.median(v) * 1000 for k, v in ms.items()} | {"session_cpu_ms": session_cpu * 1000}


def _cells(row: dict[str, float]) -> list[str]:
    """exec/s, p50, p99, speed-up and CPU ms of one executor's row, as the sandbox table prints them."""
    return [f"{row['exec_per_s']:.1f}", f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}", f"{row['speedup']:.2f}x",
            f"{row['cpu_ms']:.1f}"]  # fmt: skip


def print_sandbox_table(
    figures: dict[str, dict[str, float]], layers: list[str], overheads: dict[str, float] | None = None
) -> None:
    """Rich tables: one row per batch and executor, then the per-execution overhead breakdown."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Sandbox throughput (isolated pool vs. single in-process worker)")
    for col in ("batch", "executor", "exec/s", "p50 ms", "p99 ms", "speed-up", "CPU ms", "CPU-bound"):
        table.add_column(col, justify="left" if col in ("batch", "executor") else "right")
    for name, row in figures.items():
        if name.endswith(("_reference", "_parallel")):
            continue
        ref, par = figures[f"{name}_reference"], figures.get(f"{name}_parallel")
        table.add_row(name, f"pool, {int(row['workers'])} workers", *_cells(row), f"{row['cpu_speedup']:.2f}x")
        if par:
            table.add_row("", f"{int(par['workers'])} unisolated", *_cells(par), "")
        table.add_row("", "reference", *_cells({**ref, "speedup": 1.0}), "")
    console = Console(width=max(Console().width, 112))  # the 8 columns and their labels need more than 80
    console.print(table)
    console.print("reference: one worker exec()ing in-process, no isolation; N unisolated: N such workers side by")
    console.print("side (the parallel speed-up this machine gives at all). CPU ms: per execution, all processes;")
    console.print("CPU-bound: the speed-up where CPU is the only limit (min(workers, CPUs) x reference / pool CPU ms)")
    for name, row in figures.items():
        if "of_parallel" in row:
            console.print(f"{name}: the pool reaches {row['of_parallel']:.0%} of the unisolated workers' exec/s")
    console.print("isolation layers active: " + ", ".join(layers))
    if overheads:
        parts = Table(title="Per-execution overhead (1 worker, sequential, no pre-forking; medians)")
        parts.add_column("part")
        parts.add_column("ms", justify="right")
        rows = [("session start: fork + isolation layers (hidden by pre-forking in the pool)", "start_ms"),
                ("one block round trip (`pass`)", "block_ms"), ("close_session call (teardown continues)", "close_ms"),
                ("CPU of an empty session, all processes", "session_cpu_ms"),
                ("sympy snippet as a session's first block", "sympy_first_ms"),
                ("sympy snippet as a later block (pages already copied)", "sympy_again_ms"),
                ("no isolation, bare fork of a warm template: sympy as first block", "fork_first_ms"),
                ("  its minor page faults (copy-on-write and new pages)", "fork_first_faults"),
                ("  a second snippet of the same form in that child", "fork_again_ms"),
                ("  its minor page faults", "fork_again_faults"),
                ("  the bare child's whole CPU (two snippets, exit)", "fork_child_cpu_ms")]  # fmt: skip
        for label, key in rows:
            if key in overheads:
                parts.add_row(label, f"{overheads[key]:.2f}")
        console.print(parts)


# --- rollout and M-step throughput on random-weight models of real architectures (see docs/performance.md) ---


def bench_problems(tokenizer: Any, n: int, prompt_tokens: int) -> list[Any]:
    """n distinct problems whose `auto`-mode prompts are about `prompt_tokens` tokens long.

    Each question is a window of MATH500 question text, cut so that the chat template and the
    instruction bring the prompt to the requested length (answers are "0": nothing is graded right).
    """
    from autocode4math.benchmarks import Problem, load_problems
    from autocode4math.prompts import build_prompt
    from autocode4math.rollout.engine import encode, encode_prompt

    overhead = len(encode_prompt(tokenizer, build_prompt("", "auto", tokenizer).text))
    words = prompt_tokens - overhead
    if words < 1:
        raise ValueError(f"prompt_tokens {prompt_tokens} leaves no room for a question (template: {overhead} tokens)")
    text = encode(tokenizer, "\n".join(p.question for p in load_problems("math500")))
    problems = []
    for i in range(n):
        start = (i * 97) % max(1, len(text) - words)
        question = tokenizer.decode(text[start : start + words]).strip() or "x"
        problems.append(Problem(id=f"bench-{i}", question=question, answer="0", benchmark="bench", meta={}))
    return problems


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _count_new(rows: list[list[int]], eos_ids: set[int]) -> int:
    """Generated tokens per row up to and including its first EOS, summed."""
    return sum(next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row)) for row in rows)


def reference_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> dict[str, float]:
    """Plain `model.generate` (greedy, default cache) on the whole left-padded batch: tokens, seconds, tokens/s."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], attention[row, width - len(p) :] = torch.tensor(p), 1
    ids, attention = ids.to(model.device), attention.to(model.device)
    with torch.no_grad():
        model.generate(input_ids=ids[:, -8:], attention_mask=attention[:, -8:], max_new_tokens=2, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        _sync()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        _sync()
    seconds = time.perf_counter() - start
    tokens = _count_new(out[:, width:].tolist(), {tokenizer.eos_token_id})
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


class CodeEveryBackend:
    """Wraps a backend so every trajectory writes a code block after each `every` model tokens, `rounds` times.

    A random-weight model never writes code, so this forces the code rounds the engine exists for: the
    model generates `every` tokens, the wrapper appends a small ```python block and the stop string, the
    engine runs it in the sandbox, inserts the output and asks for the next round (re-encoding the context).
    `model_tokens` counts the tokens the model generated (the appended code is not counted).
    """

    def __init__(self, inner: Any, every: int, rounds: int) -> None:
        if every < 1 or rounds < 0:
            raise ValueError(f"every must be >= 1 and rounds >= 0, got {every}, {rounds}")
        self.inner, self.every, self.rounds = inner, every, rounds
        self.tokenizer = inner.tokenizer
        self.model_tokens = 0

    def generate(self, requests: Sequence[Any], sampling: Any) -> list[Any]:
        from dataclasses import replace

        from autocode4math.rollout.engine import Generation, encode

        coding = [r.text.count(sampling.stop) < self.rounds for r in requests]
        asks = [
            replace(r, max_tokens=min(r.max_tokens, self.every)) if c else r
            for r, c in zip(requests, coding, strict=True)
        ]
        gens = self.inner.generate(asks, sampling)
        out = []
        for r, c, g in zip(requests, coding, gens, strict=True):
            self.model_tokens += len(g.ids)
            code = f"\n```python\nprint({len(r.ids)} * {len(g.ids) + 1})\n```\n{sampling.stop}"
            ids = encode(self.tokenizer, code)
            if c and g.finish == "length" and len(g.ids) + len(ids) <= r.max_tokens:
                g = Generation(ids=g.ids + ids, text=g.text + code, finish="stop")
            out.append(g)
        return out


@dataclass
class RolloutBenchConfig:
    """What `autocode bench rollout` measures."""

    arch: str = "qwen2.5-0.5b"
    """A shipped architecture (perf.ARCHS); random weights."""
    batch: int = 64
    """Trajectories generated together (the engine's max_active and the HF backend's batch size)."""
    prompt_tokens: int = 128
    """Prompt length of every trajectory."""
    max_new_tokens: int = 512
    """Token budget of every trajectory."""
    static_cache: bool = False
    """Also measure the engine with the HF backend's static KV cache (torch.compile on CUDA)."""
    code_rounds: int = 0
    """Also measure a scripted-code variant with this many code blocks per trajectory (0: skip)."""
    repeats: int = 1
    """Timed runs of each engine variant; the figure is the last, `first_s` the first (compile included)."""
    device: str = ""
    """cuda or cpu; default: cuda when available."""

    def __post_init__(self) -> None:
        from autocode4math.perf import ARCHS

        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if min(self.batch, self.prompt_tokens, self.max_new_tokens, self.repeats) < 1 or self.code_rounds < 0:
            raise ValueError("batch, prompt_tokens, max_new_tokens and repeats must be >= 1, code_rounds >= 0")


def _timed_rollouts(backend: Any, problems: list[Any], cfg: RolloutBenchConfig, pool: Any) -> dict[str, float]:
    """Run the engine `repeats` times on all problems; figures of the last run, `first_s` of the first."""
    from autocode4math.rollout import RolloutConfig, make_requests, run_rollouts

    config = RolloutConfig(max_new_tokens=cfg.max_new_tokens, max_active=cfg.batch, max_code_rounds=cfg.code_rounds)
    requests = make_requests(problems, ["auto"], 1)
    times, records = [], []
    for _ in range(cfg.repeats):
        if isinstance(backend, CodeEveryBackend):
            backend.model_tokens = 0
        _sync()
        start = time.perf_counter()
        records = run_rollouts(backend, requests, config, progress=False, sandbox=pool)
        _sync()
        times.append(time.perf_counter() - start)
    if isinstance(backend, CodeEveryBackend):
        tokens = backend.model_tokens
    else:
        tokens = sum(r["n_generated_tokens"] for r in records)
    return {
        "tokens": tokens,
        "seconds": times[-1],
        "tokens_per_s": tokens / times[-1],
        "first_s": times[0],
        "code_calls": sum(r["n_code_calls"] for r in records),
        "mean_prompt_tokens": sum(r["n_prompt_tokens"] for r in records) / len(records),
    }


def bench_rollout(cfg: RolloutBenchConfig) -> dict[str, Any]:
    """Generated tokens/s of tool-integrated rollouts (the real engine, HF backend, sandbox) vs plain generate.

    Variants, in one run on one random-weight model: `reference` (model.generate, default cache, the
    whole batch at once), `engine` (run_rollouts with HFBackend), `engine_static` (static KV cache) and
    `engine_code` (CodeEveryBackend forcing `code_rounds` sandbox rounds) when asked for. `bound` is the
    physical best case for the run (perf.decode_bound) when the GPU is in perf.DEVICES.
    """
    import torch

    from autocode4math.perf import load_arch, param_counts
    from autocode4math.prompts import build_prompt
    from autocode4math.rollout.engine import encode_prompt
    from autocode4math.rollout.hf import HFBackend
    from autocode4math.sandbox import SandboxPool

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = arch_tokenizer(cfg.arch)
    model = random_model(cfg.arch, device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    problems = bench_problems(tokenizer, cfg.batch, cfg.prompt_tokens)
    prompts = [encode_prompt(tokenizer, build_prompt(p.question, "auto", tokenizer).text) for p in problems]
    out: dict[str, Any] = {
        "config": asdict(cfg),
        "device": device,
        "params": param_counts(load_arch(cfg.arch))["total"],
    }
    out["device_name"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    out["reference"] = reference_generate(model, tokenizer, prompts, cfg.max_new_tokens)
    with SandboxPool() as pool:
        backend = HFBackend(model, tokenizer, device=device, batch_size=cfg.batch)
        out["engine"] = _timed_rollouts(backend, problems, cfg, pool)
        if cfg.static_cache:
            static = HFBackend(model, tokenizer, device=device, batch_size=cfg.batch, cache_implementation="static")
            out["engine_static"] = _timed_rollouts(static, problems, cfg, pool)
        if cfg.code_rounds:
            every = max(1, cfg.max_new_tokens // (cfg.code_rounds + 1))
            out["engine_code"] = _timed_rollouts(CodeEveryBackend(backend, every, cfg.code_rounds), problems, cfg, pool)
    ref = out["reference"]["tokens_per_s"]
    for name in ("engine", "engine_static", "engine_code"):
        if name in out:
            out[name]["speedup_vs_reference"] = out[name]["tokens_per_s"] / ref
    out["bound"] = rollout_bound(cfg, out["device_name"])
    return out


def rollout_bound(cfg: RolloutBenchConfig, device_name: str) -> dict[str, Any] | None:
    """perf.decode_bound for the run on the GPU named `device_name` (None when it is not in perf.DEVICES)."""
    from autocode4math.perf import decode_bound, detect_device, load_arch

    gpu = detect_device(device_name)
    if gpu is None:
        return None
    bound = decode_bound(load_arch(cfg.arch), gpu, cfg.batch, cfg.prompt_tokens, cfg.max_new_tokens)
    return {**bound, "device": gpu.name, "source": gpu.source}


@dataclass
class TrainBenchConfig:
    """What `autocode bench train` measures."""

    arch: str = "qwen2.5-0.5b"
    """A shipped architecture (perf.ARCHS); random weights."""
    seq_len: int = 2048
    """Longest trajectory (prompt + response) in tokens; lengths below it follow `synthetic_samples`."""
    micro_batch_size: int = 4
    """Trajectories per forward pass."""
    steps: int = 8
    """Timed optimizer steps (after `warmup` untimed ones)."""
    warmup: int = 2
    """Untimed steps first (allocator, cuBLAS autotuning)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass."""
    lora_r: int = 0
    """LoRA rank (0: full fine-tuning)."""
    bucket_window: int = 16
    """mstep's length-bucketing window (1: no bucketing)."""
    device: str = ""
    """cuda or cpu; default: cuda when available."""
    seed: int = 0

    def __post_init__(self) -> None:
        from autocode4math.perf import ARCHS

        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if min(self.micro_batch_size, self.steps, self.bucket_window) < 1 or self.warmup < 0 or self.lora_r < 0:
            raise ValueError("micro_batch_size, steps, bucket_window must be >= 1; warmup, lora_r >= 0")
        if self.seq_len < 64:
            raise ValueError(f"seq_len must be >= 64, got {self.seq_len}")


def synthetic_samples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[Any]:
    """n M-step samples with rollout-like lengths: what an E-step train.jsonl holds, with random tokens.

    Assumed distribution (stated, not measured): prompts uniform in [64, 256) tokens (less below seq_len 512); responses
    log-normal around 500 tokens (sigma 0.7), and 10% of trajectories hit the budget (length finish),
    all capped at seq_len; 40% used code, with two 24-token tool outputs (mask 0); a 12-token decision
    prefix after the prompt for 80% of them.
    """
    from autocode4math.mstep import Sample

    rng = random.Random(seed)
    out = []
    for k in range(n):
        prompt = rng.randrange(min(64, seq_len // 4), max(min(64, seq_len // 4) + 1, min(256, seq_len // 2)))
        room = seq_len - prompt
        response = room if rng.random() < 0.1 else max(16, min(room, int(rng.lognormvariate(6.2, 0.7))))
        ids = [rng.randrange(3, vocab) for _ in range(prompt + response)]
        mask = [1] * response
        used_code = rng.random() < 0.4 and response > 120
        if used_code:
            for start in (response // 3, 2 * response // 3):
                mask[start : start + 24] = [0] * 24
        n_dec = 12 if rng.random() < 0.8 else 0
        decision = ids[:prompt] + [rng.randrange(3, vocab) for _ in range(n_dec)] if n_dec else []
        adv = rng.choice((-1.0, 1.0))
        out.append(Sample(ids=ids, start=prompt, mask=mask, advantage=adv, c=int(used_code), decision=decision,
                          n_decision=n_dec, correct=False, used_code=used_code, key=str(k)))  # fmt: skip
    return out


def _sequence_flops(a: Any, length: int) -> float:
    """Model FLOPs (forward + backward) of one causal sequence of `length` tokens."""
    from autocode4math.perf import attention_flops_per_token, matmul_flops_per_token

    return 3.0 * (matmul_flops_per_token(a) * length + attention_flops_per_token(a, 1.0) * length * (length + 1) / 2)


def bench_train(cfg: TrainBenchConfig) -> dict[str, Any]:
    """M-step tokens/s, MFU and peak memory: mstep's collate + batch_loss + AdamW under accelerate (bf16 on GPU).

    Tokens are the real (unpadded) tokens of the trajectory and decision rows; `padding_share` is the
    share of computed positions that were padding. MFU counts model FLOPs of the real tokens only.
    """
    import torch
    from accelerate import Accelerator

    from autocode4math.mstep import MStepConfig, _adapt, batch_loss, collate, micro_batches
    from autocode4math.perf import detect_device, load_arch, train_memory_estimate

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(mixed_precision="bf16" if device == "cuda" else "no", cpu=device == "cpu")
    mcfg = MStepConfig(micro_batch_size=cfg.micro_batch_size, gradient_checkpointing=cfg.gradient_checkpointing,
                       lora_r=cfg.lora_r, bucket_window=cfg.bucket_window, seed=cfg.seed)  # fmt: skip
    arch = load_arch(cfg.arch)
    model = _adapt(random_model(cfg.arch, device=device, seed=cfg.seed), mcfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    n_batches = cfg.warmup + cfg.steps
    samples = synthetic_samples(n_batches * cfg.micro_batch_size, cfg.seq_len, min(arch.vocab_size, 150_000), cfg.seed)
    plan = micro_batches(samples, cfg.micro_batch_size, cfg.bucket_window, cfg.seed, 0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = padded = 0
    flops, seconds = 0.0, 0.0
    for k, idx in enumerate(plan):
        batch = collate([samples[i] for i in idx], 0, [[0.0] * len(samples[i].mask) for i in idx])
        batch = {name: v.to(accelerator.device) for name, v in batch.items()}
        _sync()
        start = time.perf_counter()
        loss, _ = batch_loss(model, batch, mcfg)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        if k >= cfg.warmup:
            seconds += time.perf_counter() - start
            rows = [len(samples[i].ids) for i in idx] + [len(samples[i].decision) for i in idx if samples[i].decision]
            tokens += sum(rows)
            flops += sum(_sequence_flops(arch, n) for n in rows)
            padded += batch["input_ids"].numel() + batch["dec_input_ids"].numel()
    out: dict[str, Any] = {"config": asdict(cfg), "device": device, "tokens": tokens, "seconds": seconds}
    out.update(
        tokens_per_s=tokens / seconds, padding_share=1 - tokens / padded, model_tflops_per_s=flops / seconds / 1e12
    )
    out["device_name"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    gpu = detect_device(out["device_name"]) if device == "cuda" else None
    out["mfu"] = flops / seconds / gpu.bf16_flops if gpu else None
    out["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
    estimate = train_memory_estimate(arch, cfg.seq_len, cfg.micro_batch_size, lora_r=cfg.lora_r,
                                     gradient_checkpointing=cfg.gradient_checkpointing)  # fmt: skip
    out["memory_estimate_bytes"] = estimate
    return out


def _fmt_bound(bound: dict | None) -> str:
    return f"{bound['tokens_per_s']:,.0f}" if bound else "n/a (CPU or GPU not in perf.DEVICES)"


def print_rollout_table(result: dict[str, Any]) -> None:
    """A rich table: generated tokens/s per variant, speed-up over plain generate, and the physical bound."""
    from rich.console import Console
    from rich.table import Table

    c = result["config"]
    title = f"Rollout throughput: {c['arch']} (random weights), batch {c['batch']}, {c['prompt_tokens']} prompt + "
    table = Table(title=title + f"{c['max_new_tokens']} new tokens on {result['device_name']}")
    for col in ("variant", "tokens", "seconds", "tokens/s", "vs reference", "first run s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    names = {
        "reference": "model.generate (default cache)",
        "engine": "engine + HF backend",
        "engine_static": "engine + HF backend, static cache",
        "engine_code": f"engine, {c['code_rounds']} scripted code rounds",
    }
    for key, label in names.items():
        if key in result:
            r = result[key]
            speed = f"{r.get('speedup_vs_reference', 1.0):.2f}x"
            first = f"{r['first_s']:.1f}" if "first_s" in r else ""
            table.add_row(label, str(r["tokens"]), f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}", speed, first)
    console = Console()
    console.print(table)
    bound = result["bound"]
    console.print(f"physical bound (weights + KV bytes / bandwidth, FLOPs / peak): {_fmt_bound(bound)} tokens/s")
    if bound:
        console.print(f"  {bound['device']}: {100 * bound['memory_bound_share']:.0f}% of steps memory-bound; "
                      f"peaks from {bound['source']}")  # fmt: skip


def print_train_table(result: dict[str, Any]) -> None:
    """One line per figure: tokens/s, MFU, padding, peak memory measured and estimated."""
    c, gib = result["config"], 2**30
    est = result["memory_estimate_bytes"]
    lines = [
        f"M-step on {c['arch']} (random weights), seq_len {c['seq_len']}, micro-batch {c['micro_batch_size']}, "
        f"checkpointing {c['gradient_checkpointing']}, lora_r {c['lora_r']}, on {result['device_name']}",
        f"  tokens/s (real tokens): {result['tokens_per_s']:,.0f} over {result['tokens']} tokens in "
        f"{result['seconds']:.2f} s; padding share {100 * result['padding_share']:.1f}%",
        f"  model TFLOP/s: {result['model_tflops_per_s']:.2f}; MFU: "
        + (f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (CPU or GPU not in perf.DEVICES)"),
        "  peak memory measured: "
        + (f"{result['peak_memory_bytes'] / gib:.1f} GiB" if result["peak_memory_bytes"] is not None else "n/a (CPU)")
        + f"; ESTIMATE {est['total'] / gib:.1f} GiB (states {est['states'] / gib:.1f}, activations "
        f"{est['activations'] / gib:.1f}, logits {est['logits'] / gib:.1f})",
    ]
    for line in lines:
        print(line)


def train_stage_seconds(run_dir: str | Path, started: float) -> dict[str, float]:
    """Wall-clock seconds of each finished stage of an `autocode train` run, in the order they finished.

    em.py records which stages finished (state.json) but not when, so a stage's end is the newest
    modification time of the files in its directory; its duration is the gap to the previous stage's
    end (the first stage's to `started`, a time.time() taken just before the run).
    """
    run = Path(run_dir)
    ends = []
    for stage_dir in sorted(p for p in run.glob("iter-*/*") if p.is_dir()):
        files = [f.stat().st_mtime for f in stage_dir.rglob("*") if f.is_file()]
        if files:
            ends.append((max(files), f"{stage_dir.parent.name}/{stage_dir.name}"))
    out, last = {}, started
    for end, name in sorted(ends):
        out[name] = end - last
        last = end
    return out
