"""The `autocode` command line: one typer app, one thin command per entry point.

Each command's options are its function's signature and its help is the docstring. Heavy imports
(torch, transformers) happen inside the commands so that `autocode --help` and the sandbox stay fast.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from autocode4math import __version__

if TYPE_CHECKING:
    from autocode4math.demo import DemoConfig

app = typer.Typer(
    name="autocode",
    help="Teach math LMs when to write and run code, and measure how well any model makes that choice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks that print figures (throughput, latency, utilisation).", no_args_is_help=True)
toy_app = typer.Typer(help="The embedded synthetic math world and its tiny models.", no_args_is_help=True)
sandbox_app = typer.Typer(help="The code sandbox as a service.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(toy_app, name="toy")
app.add_typer(sandbox_app, name="sandbox")

QUESTION_FIELD = typer.Option(None, "--question-field", help="Question field of a benchmark file (default: detected).")
ANSWER_FIELD = typer.Option(None, "--answer-field", help="Gold answer field of a benchmark file (default: detected).")
ID_FIELD = typer.Option(None, "--id-field", help="Id field of a benchmark file (default: detected, else row number).")
OVERWRITE = typer.Option(
    False, "--overwrite", help="Discard results in --out made with other settings and redo them (matching ones stay)."
)
IGNORE_TOOL_HEALTH = typer.Option(
    False, "--ignore-tool-health", help="Record tool-health alarms (sandbox/grader failures) but go on."
)
OPTION_LABELS = {"fields.question": "--question-field", "fields.answer": "--answer-field", "fields.id": "--id-field",
                 "launch.preset": "--launch", "timeout_s": "--timeout"}  # fmt: skip
"""How errors name config fields set by an option whose name is not the field's own."""


@app.callback()
def _main() -> None:
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message: Warning | str, *args: Any, **kwargs: Any) -> str:
    """Warnings as users read them: `Warning: <message>`, without the source line that issued them."""
    return f"Warning: {message}\n"


def _fail(message: str) -> NoReturn:
    """A user error: one line on stderr, exit code 2 (as for any usage error), no traceback."""
    typer.echo("Error: " + " ".join(str(message).splitlines()), err=True)
    raise typer.Exit(2)


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Let `command` end with `_fail` on a user error wherever raised: ConfigError (a bad setting), DataError
    (a bad file), ResumeError (a directory holding results of other settings)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from autocode4math.config import ConfigError
        from autocode4math.fingerprint import ResumeError
        from autocode4math.io import DataError

        try:
            return command(*args, **kwargs)
        except (ConfigError, DataError, ResumeError) as e:
            _fail(str(e))

    return run


def _config(cls: type, path: str, overrides: list[str], values: dict[str, Any] | None = None, **kw: Any) -> Any:
    """load_config for a command; typed options in `values` are given as values (None or "" = not given)."""
    from autocode4math.config import load_config

    given = {k: v for k, v in (values or {}).items() if v is not None and v != ""}
    return load_config(cls, path or None, overrides, given, labels=OPTION_LABELS, **kw)


def _fields(question: str | None, answer: str | None, id_: str | None) -> dict[str, str | None]:
    return {"fields.question": question, "fields.answer": answer, "fields.id": id_}


@contextlib.contextmanager
def _run_errors() -> Iterator[None]:
    """Failures of a run's machinery (fleet, server, launched M-step) and tool-health alarms (a stage's sandbox
    or grader broke) as one message and exit code 1."""
    from autocode4math.fleet import FleetError
    from autocode4math.health import ToolHealthError
    from autocode4math.launch import LaunchError
    from autocode4math.rollout.server import ServerError

    try:
        yield
    except (FleetError, LaunchError, ServerError, ToolHealthError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(__version__)


# --- sandbox (exec, bench sandbox) ---


@app.command("exec")
@_user_errors
def exec_code(
    timeout: float | None = typer.Option(None, "--timeout", help="Wall-clock limit in seconds (default 10)."),
    memory_mb: int | None = typer.Option(None, "--memory-mb", help="Memory the code may use, in MB (default 1024)."),
    overrides: list[str] = typer.Option([], "--set", help="SandboxConfig fields, e.g. --set url=http://host:8100."),
) -> None:
    """Run Python read from stdin in the isolated sandbox; the last stdout line is a JSON result."""
    import dataclasses
    import json
    import sys

    from autocode4math.sandbox import SandboxConfig, SandboxError, open_sandbox

    config = _config(SandboxConfig, "", overrides, {"timeout_s": timeout, "memory_mb": memory_mb})
    try:
        with open_sandbox(dataclasses.replace(config, prefork=0, workers=1)) as sandbox:
            result = sandbox.run(sandbox.open_session(), sys.stdin.read())
    except SandboxError as e:
        _fail(f"sandbox failure: {e}")
    typer.echo(json.dumps(result.to_dict()))


@bench_app.command("sandbox")
def bench_sandbox(
    n: int = typer.Option(200, help="Executions per batch."),
    workers: int = typer.Option(0, help="Pool workers; 0 = one per CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON object as the last line."),
) -> None:
    """Throughput of the isolated pool vs. a single in-process worker on realistic math batches."""
    import json
    import os
    import subprocess

    from autocode4math.bench import bench_sandbox as run_bench
    from autocode4math.bench import fork_floor, print_sandbox_table, sandbox_overheads

    if n < 1 or workers < 0:
        _fail(f"--n must be >= 1 and --workers >= 0, got --n {n} --workers {workers}")
    load = os.getloadavg()[0]
    figures, layers = run_bench(n=n, workers=workers or None)
    overheads = sandbox_overheads(n=min(n, 20))
    try:
        overheads |= fork_floor(n=min(n, 20))
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        tail = " ".join(str(getattr(e, "stderr", "") or "").strip().splitlines()[-3:])
        typer.echo(f"Warning: the bare-fork floor was not measured ({type(e).__name__}: {e} {tail})", err=True)
    print_sandbox_table(figures, layers, overheads)
    after = os.getloadavg()[0]
    typer.echo(f"machine: {os.cpu_count()} CPUs; 1-minute load average {load:.2f} before, {after:.2f} after")
    figures["overheads"] = overheads
    if as_json:
        typer.echo(json.dumps(figures))


@sandbox_app.command("serve")
@_user_errors
def sandbox_serve(
    host: str = typer.Option("", help="Address to bind (default 127.0.0.1; the server has no authentication)."),
    port: int | None = typer.Option(None, help="TCP port (default 8100; 0: any free port, printed at start)."),
    workers: int | None = typer.Option(None, help="Pool workers (default: one per CPU)."),
    config: str = typer.Option("", help="YAML file with ServeConfig fields (sandbox limits under `sandbox:`)."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted overrides, e.g. --set sandbox.timeout_s=5."),
) -> None:
    """Serve the sandbox over HTTP: SandboxFusion's /run_code plus stateful sessions (docs/sandbox.md)."""
    import signal
    import threading

    from autocode4math.sandbox import SandboxError
    from autocode4math.sandbox_service import ServeConfig, start_server, stop_server

    cfg = _config(ServeConfig, config, overrides, {"host": host, "port": port, "sandbox.workers": workers})
    try:
        server, _thread = start_server(cfg)
    except (OSError, SandboxError) as e:
        _fail(f"cannot serve on {cfg.host}:{cfg.port}: {e}")
    bound_host, bound_port = server.server_address[:2]
    typer.echo(f"sandbox server listening on http://{bound_host}:{bound_port}")
    typer.echo("isolation layers: " + ", ".join(server.service.pool.layers))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    stop_server(server)


# --- benchmarks and grading (grade) ---


@app.command()
def grade(
    in_path: str = typer.Argument(..., help="JSONL rows: `response`, `answer` (string, number or list), `benchmark`?"),
    out: str = typer.Option(..., "--out", help="Output JSONL: the input rows plus `pred` and `correct`, same order."),
    benchmark: str = typer.Option("", help="Grading convention for rows without a `benchmark` field (e.g. aime24)."),
    workers: int | None = typer.Option(None, help="Grading processes (default: CPU count - 1)."),
    timeout: float = typer.Option(
        10.0, help="Hard per-item timeout in seconds; a timeout is recorded (grade_status) and counts as wrong."
    ),
) -> None:
    """Grade model responses against gold answers; print a summary line."""
    from autocode4math.grading import grade_file
    from autocode4math.io import DataError

    try:
        s = grade_file(in_path, out, benchmark or None, workers, timeout)
    except (DataError, OSError, ValueError) as e:
        _fail(str(e))
    typer.echo(
        f"graded {s['graded']}: {s['correct']} correct ({100 * s['accuracy']:.1f}%), "
        f"{s['no_answer']} without an answer, {s['timed_out']} timed out, {s['errors']} grader errors -> {out}"
    )


@bench_app.command("grading")
def bench_grading(
    workers: int | None = typer.Option(None, help="Grading processes (default: CPU count - 1)."),
    timeout: float = typer.Option(10.0, help="Hard per-item timeout in seconds."),
) -> None:
    """Pairs per second of grade_many on MATH500: gold vs gold, worked solution vs gold, shifted pairs."""
    from autocode4math.grading import bench_grading as run

    for name, value in run(workers, timeout).items():
        typer.echo(f"{name}: {value:.1f}" if isinstance(value, float) else f"{name}: {value}")


@bench_app.command("view")
def bench_view_cmd(
    trajectories: int = typer.Option(20_000, help="Synthetic trajectories in the run."),
    chars: int = typer.Option(1500, help="Characters of reasoning per trajectory before its answer."),
    out: str = typer.Option("runs/bench-view", help="Where the synthetic run and its page go."),
    browser: bool = typer.Option(True, help="Also time load, filter, search in headless Chromium."),
) -> None:
    """Size of the `autocode view` page for a large run and how long it takes to load and filter."""
    from autocode4math.view import bench_view

    for name, value in bench_view(trajectories, chars, out, browser).items():
        typer.echo(f"{name}: {value}")


# --- rollouts and evaluation (eval) ---


@app.command("eval")
@_user_errors
def eval_(
    model: str = typer.Option("", help="Model path or hub id (openai backend: the served model name)."),
    benchmarks: str = typer.Option("", help="Comma-separated benchmark names (gsm8k,math500,aime24,...) or toy."),
    modes: str = typer.Option("", help="Comma-separated subset of auto,cot,code (default: all three)."),
    n: int | None = typer.Option(None, help="Samples per question (default: 1; 64 for aime24/amc23)."),
    temperature: float | None = typer.Option(None, help="Default: 0 (greedy); 0.6 for aime24/amc23."),
    out: str = typer.Option("", help="Output directory; rerunning with the same one resumes."),
    benchmark_file: list[str] = typer.Option([], help="Extra benchmark file (.jsonl/.json/.parquet); repeatable."),
    limit: int | None = typer.Option(None, help="Only the first N questions of each benchmark."),
    backend: str = typer.Option("", help="hf (default), openai or vllm."),
    question_field: str | None = QUESTION_FIELD,
    answer_field: str | None = ANSWER_FIELD,
    id_field: str | None = ID_FIELD,
    workers: int | None = typer.Option(None, help="Rollout engines; more than 1 runs them as Ray actors (fleet.*)."),
    config: str = typer.Option("", help="YAML file with EvalConfig fields."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted overrides, e.g. --set max_new_tokens=1024."),
    overwrite: bool = OVERWRITE,
    ignore_tool_health: bool = IGNORE_TOOL_HEALTH,
) -> None:
    """Evaluate a model in auto/cot/code modes: per-sample JSONL, metrics.json, report.md, plots."""
    from autocode4math.evaluate import EvalConfig, run_eval

    given = {"model": model, "benchmarks": benchmarks, "modes": modes, "out": out, "backend": backend, "n": n}
    given |= {"temperature": temperature, "limit": limit, "benchmark_files": benchmark_file or None}
    given |= _fields(question_field, answer_field, id_field) | {"fleet.workers": workers}
    given |= {"health.check": False if ignore_tool_health else None}
    if benchmark_file and not benchmarks:
        given["benchmarks"] = []  # only the given files, not the default benchmarks
    cfg = _config(EvalConfig, config, overrides, given)
    with _run_errors():
        run_eval(cfg, overwrite=overwrite)


@app.command("view")
def view_cmd(
    run_dir: str = typer.Argument(..., help="A run directory: an eval, an E-step, a training run or the demo."),
    run_dir_b: str = typer.Argument("", help="A second run directory, shown beside the first (sources A and B)."),
    out: str = typer.Option("", help="The HTML file to write (default: RUN_DIR/view.html)."),
    no_compress: bool = typer.Option(False, "--no-compress", help="Embed plain JSON even when the data is large."),
) -> None:
    """One self-contained HTML page (opens from disk, no server) to read, filter and compare a run's trajectories."""
    from autocode4math.io import DataError
    from autocode4math.view import write_view

    runs = [run_dir, *([run_dir_b] if run_dir_b else [])]
    try:
        path = write_view(runs, out or None, compress=False if no_compress else None)
    except (DataError, OSError) as e:
        _fail(str(e))
    typer.echo(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


# --- toy world (toy ...) ---


@toy_app.command("data")
def toy_data(
    out_dir: str = typer.Option("", help="Where to write the splits; default: the package's data/<source>."),
    source: str = typer.Option("toy", help="toy (arith, mul, story) or toy-mid (the mid-reasoning family)."),
) -> None:
    """Write the toy train/dev/test splits (fixed sizes and seeds) as JSONL."""
    from autocode4math import toyworld

    if source not in toyworld.SOURCES:
        raise typer.BadParameter(f"unknown source {source!r}; expected one of {sorted(toyworld.SOURCES)}")
    for split, path in toyworld.write_splits(out_dir or None, source).items():
        typer.echo(f"{split}: {path}")


@toy_app.command("sample")
def toy_sample(
    family: str = typer.Option("mul", help="arith, mul, story or mid."),
    difficulty: int = typer.Option(2, help="1 to 3."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Print one toy problem with its CoT and code solutions."""
    import random

    from autocode4math import toyworld

    try:
        item = toyworld.generate(family, difficulty, random.Random(seed))
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{item.question}\nanswer: {item.answer}\n\n--- cot ---\n{toyworld.write_cot(item)}")
    typer.echo(f"\n--- code ---\n{toyworld.write_code(item)}")


@toy_app.command("pretrain")
@_user_errors
def toy_pretrain(
    stage: str = typer.Option(
        "base", help="base (from scratch, CoT-heavy) or sft (tool-integrated, code choice not tied to the family)."
    ),
    seed: int = typer.Option(0, help="Seeds corpus, initialisation and batch order."),
    out_dir: str = typer.Option("", help="Output directory; default: runs/toy-<stage>."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a checkpoint already in the output directory (a shipped one included)."
    ),
    config: str = typer.Option("", help="YAML file with PretrainConfig fields (steps, lr, sft_code_digits, ...)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Dotted overrides, e.g. --set steps=500 --set model.num_layers=2."
    ),
) -> None:
    """Train a toy checkpoint (tiny Qwen2 + BPE tokenizer) on CPU, printing progress."""
    from autocode4math.toymodel import PretrainConfig, pretrain

    cfg = _config(PretrainConfig, config, overrides, {"stage": stage, "seed": seed, "out_dir": out_dir})
    pretrain(cfg, log=lambda line: typer.echo(line), overwrite=overwrite)


# --- training (estep, mstep, train, demo) ---


@app.command()
@_user_errors
def estep(
    model: str = typer.Option(..., help="Checkpoint directory that generates the rollouts (pi_theta)."),
    queries: str = typer.Option(..., help="Training queries: 'toy', a benchmark name, or a .jsonl/.json/.parquet."),
    out: str = typer.Option(..., help="Output directory: rollouts.jsonl, train.jsonl, audit.jsonl, summary.json."),
    split: str = typer.Option("train", help="Split of a named source (toy: train/dev/test)."),
    limit: int = typer.Option(0, help="Use only the first N queries (0: all)."),
    question_field: str | None = QUESTION_FIELD,
    answer_field: str | None = ANSWER_FIELD,
    id_field: str | None = ID_FIELD,
    config: str = typer.Option("", help="YAML preset with EStepConfig fields."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted overrides, e.g. --set k=8 --set alpha=2."),
    overwrite: bool = OVERWRITE,
) -> None:
    """E-step: K rollouts per code decision, Q, pi, s*, and the subsampled training set (resumable)."""
    import json

    from autocode4math.benchmarks import FieldNames, load_problems
    from autocode4math.estep import EStepConfig, run_estep
    from autocode4math.rollout import resolve_model

    if limit < 0:
        _fail(f"--limit must be >= 0 (0: all queries), got {limit}")
    cfg = _config(EStepConfig, config, overrides)
    model = resolve_model(model, cfg.backend)
    fields = FieldNames(question_field, answer_field, id_field)
    problems = load_problems(queries, split=split, limit=limit or None, **fields.as_kwargs())
    summary = run_estep(model, problems, cfg, out, overwrite=overwrite)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
@_user_errors
def mstep(
    model: str = typer.Option(..., help="Checkpoint directory to train; also pi_ref (it generated the data)."),
    data: str = typer.Option(..., help="E-step train.jsonl."),
    out: str = typer.Option(..., help="Output directory: model/, metrics.jsonl, tb/, state/ (resumable)."),
    config: str = typer.Option("", help="YAML preset with MStepConfig fields."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted overrides, e.g. --set lr=1e-5 --set lora_r=16."),
    overwrite: bool = OVERWRITE,
    fingerprint: str = typer.Option(
        "", hidden=True, help="JSON file of the stage fingerprint to check (autocode train --launch passes it)."
    ),
) -> None:
    """M-step: clipped off-policy RL + decision cross-entropy; `accelerate launch -m autocode4math.cli mstep ...`."""
    from autocode4math.io import read_json
    from autocode4math.mstep import MStepConfig, run_mstep
    from autocode4math.rollout import resolve_model

    cfg = _config(MStepConfig, config, overrides)
    expected = read_json(fingerprint) if fingerprint else None
    typer.echo(str(run_mstep(resolve_model(model), data, cfg, out, overwrite=overwrite, fingerprint=expected)))


@app.command("train")
@_user_errors
def train_cmd(
    config: str = typer.Option(
        "", help="YAML preset with TrainConfig fields (e.g. src/autocode4math/presets/train/toy-em.yaml)."
    ),
    method: str = typer.Option("", help="em (default), rl (on-policy RL, no E-step) or sft (fixed dataset)."),
    model: str = typer.Option(
        "", help="Starting checkpoint: a directory, hub id, or a shipped toy-base / toy-sft / toy-mid-base."
    ),
    queries: str = typer.Option("", help="Training queries (train split): toy, a file, or a HF dataset id."),
    out: str = typer.Option("", help="Run directory; running the same command again resumes it."),
    iterations: int | None = typer.Option(None, help="EM iterations (E-step, M-step, dev evaluation each)."),
    question_field: str | None = QUESTION_FIELD,
    answer_field: str | None = ANSWER_FIELD,
    id_field: str | None = ID_FIELD,
    workers: int | None = typer.Option(
        None, help="Rollout engines (E-step, RL collection, dev evaluation); more than 1 runs them as Ray actors."
    ),
    launch: str = typer.Option(
        "",
        help="Run each M-step under accelerate launch with this preset: single_gpu, ddp, fsdp, deepspeed_zero2, "
        "cpu_ddp, or a YAML file (default: in this process).",
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Dotted overrides, e.g. --set estep.k=8 --set mstep.lr=1e-5 --set fleet.address=auto."
    ),
    overwrite: bool = OVERWRITE,
    ignore_tool_health: bool = IGNORE_TOOL_HEALTH,
) -> None:
    """The EM loop (or a baseline): collect data, update the policy, evaluate on dev; resumable by stage."""
    from autocode4math.em import TrainConfig, train

    given = {"method": method, "model": model, "queries": queries, "out": out, "iterations": iterations}
    given |= _fields(question_field, answer_field, id_field) | {"fleet.workers": workers, "launch.preset": launch}
    given |= {"health.check": False if ignore_tool_health else None}
    cfg = _config(TrainConfig, config, overrides, given)
    with _run_errors():
        rows = train(cfg, overwrite=overwrite)
    last = rows[-1] if rows else {}
    typer.echo(f"done: {cfg.out} (final dev auto accuracy {last.get('auto_accuracy')})")


@app.command("demo")
@_user_errors
def demo_cmd(
    full: bool = typer.Option(False, "--full", help="The longer study (more queries, iterations and rollouts)."),
    out: str = typer.Option("", help="Run directory (default runs/demo, or runs/demo-full); reruns resume."),
    seeds: int = typer.Option(
        1, "--seeds", help="Training seeds; more than one also tests on all 600 questions and reports intervals."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Dotted DemoConfig overrides, e.g. --set iterations=3."),
    overwrite: bool = OVERWRITE,
) -> None:
    """The toy study: EM vs Base+RL, SFT, SFT+RL from the shipped checkpoints; report.md, metrics.json, plots."""
    from autocode4math.demo import run_demo

    cfg = demo_config(full, out, seeds, overrides)
    with _run_errors():
        metrics = run_demo(cfg, overwrite=overwrite)
    typer.echo(f"report: {cfg.out}/report.md ({metrics['seconds']:.0f} s)")
    for name, t in metrics["targets"].items():
        typer.echo(f"  {name}: {'met' if t['met'] else 'NOT met'}")


def demo_config(full: bool, out: str, seeds: int, overrides: list[str]) -> DemoConfig:
    """The DemoConfig of `autocode demo`: the default or --full sizes, the seeds (several also test on the whole
    600-question split), then --set overrides and --out, which win."""
    from autocode4math.config import to_dict
    from autocode4math.demo import DemoConfig

    base = to_dict(DemoConfig.full() if full else DemoConfig()) | ({"test": 600} if seeds > 1 else {})
    return _config(DemoConfig, "", overrides, {"out": out, "seeds": seeds}, base=base)


# --- performance (bench rollout, bench train) ---


@bench_app.command("rollout")
def bench_rollout_cmd(
    arch: str = typer.Option("qwen2.5-0.5b", help="qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b or tiny (random weights)."),
    batch: int = typer.Option(64, help="Trajectories generated together."),
    prompt_tokens: int = typer.Option(128, help="Prompt length in tokens."),
    max_new_tokens: int = typer.Option(512, help="Token budget of each trajectory."),
    static_cache: bool = typer.Option(False, "--static-cache", help="Also measure the static KV cache (+ compile)."),
    code_rounds: int = typer.Option(0, help="Also measure N scripted code rounds per trajectory (0: skip)."),
    repeats: int = typer.Option(1, help="Timed runs per engine variant (the last is reported)."),
    device: str = typer.Option("", help="cuda or cpu (default: cuda when available)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON object as the last line."),
) -> None:
    """Tool-integrated rollout tokens/s (engine + HF backend + sandbox) vs plain model.generate, with the bound."""
    import json

    from autocode4math.bench import RolloutBenchConfig, bench_rollout, print_rollout_table

    try:
        cfg = RolloutBenchConfig(arch, batch, prompt_tokens, max_new_tokens, static_cache, code_rounds, repeats, device)
    except ValueError as e:
        _fail(str(e))
    result = bench_rollout(cfg)
    print_rollout_table(result)
    if as_json:
        typer.echo(json.dumps(result))


@bench_app.command("train")
def bench_train_cmd(
    arch: str = typer.Option("qwen2.5-0.5b", help="qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b or tiny (random weights)."),
    seq_len: int = typer.Option(2048, help="Longest trajectory in tokens (rollout-like lengths below it)."),
    micro_batch_size: int = typer.Option(4, help="Trajectories per forward pass."),
    steps: int = typer.Option(8, help="Timed optimizer steps."),
    warmup: int = typer.Option(2, help="Untimed steps first."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations."),
    lora_r: int = typer.Option(0, help="LoRA rank (0: full fine-tuning)."),
    device: str = typer.Option("", help="cuda or cpu (default: cuda when available)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON object as the last line."),
) -> None:
    """M-step tokens/s, MFU and peak GPU memory (mstep.py's loss and batching, bf16 on GPU, AdamW)."""
    import json

    from autocode4math.bench import TrainBenchConfig, bench_train, print_train_table

    try:
        cfg = TrainBenchConfig(arch, seq_len, micro_batch_size, steps, warmup, gradient_checkpointing, lora_r,
                               device=device)  # fmt: skip
    except ValueError as e:
        _fail(str(e))
    result = bench_train(cfg)
    print_train_table(result)
    if as_json:
        typer.echo(json.dumps(result))


@bench_app.command("fleet")
def bench_fleet_cmd(
    workers: str = typer.Option("1,2", help="Comma-separated worker counts, measured in order in one run."),
    queries: int = typer.Option(32, help="Toy train questions (each: K rollouts per code decision)."),
    k: int = typer.Option(4, help="Rollouts per question and decision."),
    max_new_tokens: int = typer.Option(256, help="Token budget per trajectory."),
    shard_size: int = typer.Option(32, help="Requests per shard (one engine run each)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (the E-step's 1.0; 0 for greedy)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON object as the last line."),
) -> None:
    """E-step throughput (trajectories/s, tokens/s) on the toy world with 1..N CPU workers, and the speedup."""
    import json

    from autocode4math.scaling import FleetBenchConfig, bench_fleet, print_fleet_table

    try:
        counts = [int(w) for w in workers.split(",") if w.strip()]
        cfg = FleetBenchConfig(counts, queries, k, max_new_tokens, shard_size, temperature=temperature)
    except ValueError as e:
        _fail(f"--workers {workers!r}: {e}")
    with _run_errors():
        result = bench_fleet(cfg, progress=not as_json)
    print_fleet_table(result)
    if as_json:
        keys = ("workers", "tokens_per_s", "trajectories_per_s", "speedup", "same_records")
        typer.echo(json.dumps({**{key: result[key] for key in keys}, "runs": result["runs"]}))


if __name__ == "__main__":  # `accelerate launch -m autocode4math.cli mstep ...`
    app()


@bench_app.command("async")
def bench_async_cmd(
    n: int = typer.Option(48, help="Trajectories (toy dev questions, auto mode)."),
    max_active: int = typer.Option(16, help="Trajectories in flight (and the client's concurrency)."),
    slots: int = typer.Option(16, help="Load-model server: requests served at once."),
    decode_s: float = typer.Option(0.004, help="Load-model server: seconds per generated token."),
    code_s: float = typer.Option(0.2, help="Seconds each scripted code block sleeps in the sandbox."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON object as the last line."),
) -> None:
    """Async trajectories vs rounds on the same requests through a server backend (a load-model server, not a GPU)."""
    import json

    from autocode4math.bench_async import AsyncBenchConfig, bench_async, print_async_table

    try:
        cfg = AsyncBenchConfig(n=n, max_active=max_active, slots=slots, decode_s=decode_s, code_s=code_s)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    result = bench_async(cfg)
    print_async_table(result)
    if as_json:
        typer.echo(json.dumps(result))
