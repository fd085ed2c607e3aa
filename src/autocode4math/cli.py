"""The `autocode` command line: one typer app, one thin command per entry point.

Each command's options are its function's signature and its help is the docstring. Heavy imports
(torch, transformers) happen inside the commands so that `autocode --help` and the sandbox stay fast.
"""

from __future__ import annotations

import typer

from autocode4math import __version__

app = typer.Typer(
    name="autocode",
    help="Teach math LMs when to write and run code, and measure how well any model makes that choice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks that print figures (throughput, latency, utilisation).", no_args_is_help=True)
toy_app = typer.Typer(help="The embedded synthetic math world and its tiny models.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(toy_app, name="toy")


def _config(cls: type, path: str, overrides: list[str]):
    """load_config for a command: a bad preset or override is a usage error naming the problem."""
    from autocode4math.config import ConfigError, load_config

    try:
        return load_config(cls, path or None, overrides)
    except (ConfigError, OSError) as e:
        raise typer.BadParameter(str(e)) from None


def _resuming(entry, *args, **kwargs):
    """Call a resumable entry point. A refused resume (results made with other settings) is a usage error
    (exit 2); a tool-health alarm stops the run with its message (exit 1). One line, no traceback."""
    from autocode4math.fingerprint import ResumeError
    from autocode4math.health import ToolHealthError

    try:
        return entry(*args, **kwargs)
    except (ResumeError, ToolHealthError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2 if isinstance(e, ResumeError) else 1) from None


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(__version__)


# --- sandbox (exec, bench sandbox) ---


@app.command("exec")
def exec_code(
    timeout: float = typer.Option(10.0, "--timeout", help="Wall-clock limit in seconds."),
    memory_mb: int = typer.Option(1024, "--memory-mb", help="Memory the code may use, in MB."),
) -> None:
    """Run Python read from stdin in the isolated sandbox; the last stdout line is a JSON result."""
    import json
    import sys

    from autocode4math.sandbox import SandboxConfig, SandboxError, execute

    try:
        config = SandboxConfig(timeout_s=timeout, memory_mb=memory_mb)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        result = execute(sys.stdin.read(), config)
    except SandboxError as e:
        typer.echo(f"sandbox failure: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result.to_dict()))


@bench_app.command("sandbox")
def bench_sandbox(
    n: int = typer.Option(200, help="Executions per batch."),
    workers: int = typer.Option(0, help="Pool workers; 0 = one per CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON object as the last line."),
) -> None:
    """Throughput of the isolated pool vs. a single in-process worker on realistic math batches."""
    import json

    from autocode4math.bench import bench_sandbox as run_bench
    from autocode4math.bench import print_sandbox_table

    if n < 1 or workers < 0:
        raise typer.BadParameter("--n must be >= 1 and --workers >= 0")
    figures, layers = run_bench(n=n, workers=workers or None)
    print_sandbox_table(figures, layers)
    if as_json:
        typer.echo(json.dumps(figures))


# --- benchmarks and grading (grade) ---


@app.command()
def grade(
    in_path: str = typer.Argument(..., help="JSONL rows: `response`, `answer` (string, number or list), `benchmark`?"),
    out: str = typer.Option(..., "--out", help="Output JSONL: the input rows plus `pred` and `correct`, same order."),
    benchmark: str = typer.Option("", help="Grading convention for rows without a `benchmark` field (e.g. aime24)."),
    workers: int | None = typer.Option(None, help="Grading processes (default: CPU count - 1)."),
    timeout: float = typer.Option(10.0, help="Hard per-item timeout in seconds; a timeout is recorded (grade_status) and counts as wrong."),
) -> None:
    """Grade model responses against gold answers; print a summary line."""
    from autocode4math.grading import grade_file
    from autocode4math.io import DataError

    try:
        s = grade_file(in_path, out, benchmark or None, workers, timeout)
    except (DataError, OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
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


# --- rollouts and evaluation (eval) ---


@app.command("eval")
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
    config: str = typer.Option("", help="YAML file with EvalConfig fields."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted overrides, e.g. --set max_new_tokens=1024."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Discard results in --out made with other settings and redo them (matching ones stay).",
    ),
    ignore_tool_health: bool = typer.Option(
        False, "--ignore-tool-health", help="Record tool-health alarms (sandbox/grader failures) but go on."
    ),
) -> None:
    """Evaluate a model in auto/cot/code modes: per-sample JSONL, metrics.json, report.md, plots."""
    from autocode4math.config import ConfigError, load_config
    from autocode4math.evaluate import EvalConfig, replace, run_eval

    given = {"model": model, "modes": modes, "out": out, "backend": backend}
    overrides = [*overrides, *(["health.check=false"] if ignore_tool_health else [])]
    bench_list = benchmarks.split(",") if benchmarks else ([] if benchmark_file else None)
    try:
        cfg = load_config(EvalConfig, config or None, overrides)
        cfg = replace(
            cfg,
            **{k: v for k, v in given.items() if v},
            n=n,
            temperature=temperature,
            limit=limit,
            benchmarks=bench_list,
            benchmark_files=benchmark_file or None,
        )
    except (ConfigError, OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    _resuming(run_eval, cfg, overwrite=overwrite)


# --- toy world (toy ...) ---


@toy_app.command("data")
def toy_data(
    out_dir: str = typer.Option("", help="Where to write the splits; default: the package's data/toy."),
) -> None:
    """Write the toy train/dev/test splits (fixed sizes and seeds) as JSONL."""
    from autocode4math import toyworld

    for split, path in toyworld.write_splits(out_dir or toyworld.DATA_DIR).items():
        typer.echo(f"{split}: {path}")


@toy_app.command("sample")
def toy_sample(
    family: str = typer.Option("mul", help="arith, mul or story."),
    difficulty: int = typer.Option(2, help="1 to 3."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Print one toy problem with its CoT and code solutions."""
    import random

    from autocode4math import toyworld

    try:
        item = toyworld.generate(family, difficulty, random.Random(seed))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(f"{item.question}\nanswer: {item.answer}\n\n--- cot ---\n{toyworld.write_cot(item)}")
    typer.echo(f"\n--- code ---\n{toyworld.write_code(item)}")


@toy_app.command("pretrain")
def toy_pretrain(
    stage: str = typer.Option(
        "base", help="base (from scratch, CoT-heavy) or sft (tool-integrated, code choice not tied to the family)."
    ),
    seed: int = typer.Option(0, help="Seeds corpus, initialisation and batch order."),
    out_dir: str = typer.Option("", help="Output directory; default: the package's checkpoints/toy-<stage>."),
    config: str = typer.Option("", help="YAML file with PretrainConfig fields (steps, lr, sft_code_digits, ...)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Dotted overrides, e.g. --set steps=500 --set model.num_layers=2."
    ),
) -> None:
    """Train a toy checkpoint (tiny Qwen2 + BPE tokenizer) on CPU, printing progress."""
    from autocode4math.toymodel import PretrainConfig, pretrain

    extra = [f"stage={stage}", f"seed={seed}"] + ([f"out_dir={out_dir}"] if out_dir else [])
    cfg = _config(PretrainConfig, config, [*overrides, *extra])
    pretrain(cfg, log=lambda line: typer.echo(line))


# --- training (estep, mstep, train, demo) ---


@app.command()
def estep(
    model: str = typer.Option(..., help="Checkpoint directory that generates the rollouts (pi_theta)."),
    queries: str = typer.Option(..., help="Training queries: 'toy', a benchmark name, or a .jsonl/.json/.parquet."),
    out: str = typer.Option(..., help="Output directory: rollouts.jsonl, train.jsonl, audit.jsonl, summary.json."),
    split: str = typer.Option("train", help="Split of a named source (toy: train/dev/test)."),
    limit: int = typer.Option(0, help="Use only the first N queries (0: all)."),
    config: str = typer.Option("", help="YAML preset with EStepConfig fields."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted overrides, e.g. --set k=8 --set alpha=2."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Discard results in --out made with other settings and redo them (matching ones stay).",
    ),
) -> None:
    """E-step: K rollouts per code decision, Q, pi, s*, and the subsampled training set (resumable)."""
    import json

    from autocode4math.benchmarks import load_problems
    from autocode4math.config import ConfigError, load_config
    from autocode4math.estep import EStepConfig, run_estep

    try:
        cfg = load_config(EStepConfig, config or None, overrides)
        problems = load_problems(queries, split=split, limit=limit or None)
    except (ConfigError, OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    summary = _resuming(run_estep, model, problems, cfg, out, overwrite=overwrite)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def mstep(
    model: str = typer.Option(..., help="Checkpoint directory to train; also pi_ref (it generated the data)."),
    data: str = typer.Option(..., help="E-step train.jsonl."),
    out: str = typer.Option(..., help="Output directory: model/, metrics.jsonl, tb/, state/ (resumable)."),
    config: str = typer.Option("", help="YAML preset with MStepConfig fields."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted overrides, e.g. --set lr=1e-5 --set lora_r=16."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Discard results in --out made with other settings and redo them (matching ones stay).",
    ),
) -> None:
    """M-step: clipped off-policy RL + decision cross-entropy; `accelerate launch -m autocode4math.cli mstep ...`."""
    from autocode4math.mstep import MStepConfig, run_mstep

    cfg = _config(MStepConfig, config, overrides)
    typer.echo(str(_resuming(run_mstep, model, data, cfg, out, overwrite=overwrite)))


@app.command("train")
def train_cmd(
    config: str = typer.Option("", help="YAML preset with TrainConfig fields (e.g. presets/toy-em.yaml)."),
    method: str = typer.Option("", help="em (default), rl (on-policy RL, no E-step) or sft (fixed dataset)."),
    model: str = typer.Option("", help="Starting checkpoint: a directory, hub id, or toy-base / toy-sft."),
    queries: str = typer.Option("", help="Training queries (train split): toy, a file, or a HF dataset id."),
    out: str = typer.Option("", help="Run directory; running the same command again resumes it."),
    iterations: int | None = typer.Option(None, help="EM iterations (E-step, M-step, dev evaluation each)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Dotted overrides, e.g. --set estep.k=8 --set mstep.lr=1e-5."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Discard results in --out made with other settings and redo them (matching ones stay).",
    ),
    ignore_tool_health: bool = typer.Option(
        False, "--ignore-tool-health", help="Record tool-health alarms (sandbox/grader failures) but go on."
    ),
) -> None:
    """The EM loop (or a baseline): collect data, update the policy, evaluate on dev; resumable by stage."""
    from autocode4math.em import TrainConfig, train

    given = {"method": method, "model": model, "queries": queries, "out": out, "iterations": iterations}
    overrides = [*overrides, *(["health.check=false"] if ignore_tool_health else [])]
    extra = [f"{k}={v}" for k, v in given.items() if v not in ("", None)]
    cfg = _config(TrainConfig, config, [*overrides, *extra])
    rows = _resuming(train, cfg, overwrite=overwrite)
    last = rows[-1] if rows else {}
    typer.echo(f"done: {cfg.out} (final dev auto accuracy {last.get('auto_accuracy')})")


@app.command("demo")
def demo_cmd(
    full: bool = typer.Option(False, "--full", help="The longer study (more queries, iterations and rollouts)."),
    out: str = typer.Option("", help="Run directory (default runs/demo, or runs/demo-full); reruns resume."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted DemoConfig overrides, e.g. --set iterations=3."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Discard results in --out made with other settings and redo them (matching ones stay).",
    ),
) -> None:
    """The toy study: EM vs Base+RL, SFT, SFT+RL from the shipped checkpoints; report.md, metrics.json, plots."""
    from autocode4math.config import ConfigError, from_dict, parse_overrides, to_dict
    from autocode4math.demo import DemoConfig, run_demo

    base = DemoConfig.full() if full else DemoConfig()
    try:
        cfg = from_dict(DemoConfig, {**to_dict(base), **parse_overrides(overrides), **({"out": out} if out else {})})
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    metrics = _resuming(run_demo, cfg, overwrite=overwrite)
    typer.echo(f"report: {cfg.out}/report.md ({metrics['seconds']:.0f} s)")
    for name, t in metrics["targets"].items():
        typer.echo(f"  {name}: {'met' if t['met'] else 'NOT met'}")


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
        raise typer.BadParameter(str(e)) from None
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
        raise typer.BadParameter(str(e)) from None
    result = bench_train(cfg)
    print_train_table(result)
    if as_json:
        typer.echo(json.dumps(result))


if __name__ == "__main__":  # `accelerate launch -m autocode4math.cli mstep ...`
    app()
