"""`autocode eval`: benchmarks x modes (auto, cot, code), resumable per-sample JSONL, metrics, report, plots.

Outputs in `out/`:
- `config.yaml`: the resolved EvalConfig.
- `samples.jsonl`: one rollout record per (benchmark, mode, id, sample), raw response kept so
  answers can be re-graded; appended as trajectories finish. A rerun with the same `out` skips
  every sample already in the file, so an interrupted evaluation resumes where it stopped. A rerun
  whose model or sampling settings differ from the saved config.yaml is refused rather than mixed.
- `metrics.json`: per benchmark and mode (accuracy with a 95% interval, code use, code calls,
  code error rate, tokens), the union bound and auto's selection accuracy (see analysis.py).
- `report.md`, `plots/<benchmark>.png` (auto vs cot vs code vs union) and `plots/<benchmark>_cost.png`
  (accuracy against generated tokens and against code calls, with the Pareto front).

Sampling defaults follow the paper: greedy Pass@1, except AIME24 and AMC23 with 64 samples at
temperature 0.6; `n` and `temperature` override both when given.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocode4math.analysis import (
    CI_METHOD,
    all_metrics,
    breakdown,
    cost_points,
    cost_table,
    plot_benchmark,
    plot_pareto,
)
from autocode4math.benchmarks import FieldNames
from autocode4math.config import save_config
from autocode4math.fingerprint import SANDBOX_PLACEMENT, ResumeError, Stage, guard, model_identity, settings_of
from autocode4math.fleet import FleetConfig, as_rollouts, open_engines
from autocode4math.health import HealthConfig, raise_alarms, report, reusable_records
from autocode4math.io import DataError, JsonlAppender, read_done, write_json, write_jsonl
from autocode4math.prompts import MODES, PromptConfig
from autocode4math.rollout import (
    BACKENDS,
    RolloutConfig,
    RolloutRequest,
    RolloutStats,
    ServerConfig,
    backend_kwargs,
    make_requests,
    resolve_model,
)
from autocode4math.sandbox import SandboxConfig

PAPER_SAMPLING = {"aime24": (64, 0.6), "amc23": (64, 0.6)}
"""(n, temperature) the paper uses per benchmark; every other benchmark is greedy with n=1."""


def _comma_list(value: str | list[str]) -> list[str]:
    """A list field given as "a,b" (e.g. from `--set modes=auto,cot`) becomes ["a", "b"]; lists pass through."""
    return [v for v in value.split(",") if v] if isinstance(value, str) else value


@dataclass
class EvalConfig:
    """What to evaluate and how."""

    model: str = ""
    """Model path or hub id (for the openai backend: the served model name)."""
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k", "math500"])
    """Shipped benchmark names or anything `load_problems` reads (toy, a file, a HF dataset id)."""
    benchmark_files: list[str] = field(default_factory=list)
    """Extra benchmark files (.jsonl/.json/.parquet); the loader names the benchmark."""
    fields: FieldNames = field(default_factory=FieldNames)
    """Names of the question/answer/id fields in benchmark files and Hub datasets (default: detected)."""
    modes: list[str] = field(default_factory=lambda: list(MODES))
    """Modes to run: auto, cot, code. Union and selection accuracy need all three."""
    n: int | None = None
    """Samples per question; None means the paper's default for each benchmark."""
    temperature: float | None = None
    """Sampling temperature; None means the paper's default for each benchmark."""
    top_p: float = 0.95
    """Nucleus mass when sampling."""
    limit: int | None = None
    """Evaluate only the first `limit` questions of each benchmark."""
    backend: str = "hf"
    """hf, openai or vllm."""
    out: str = "runs/eval"
    """Output directory (resumed when it already holds samples)."""
    seed: int = 0
    max_new_tokens: int = 2048
    """Token budget per trajectory, across code rounds."""
    max_code_rounds: int = 4
    batch_size: int = 16
    """hf backend: rows per generate call."""
    max_active: int = 64
    """Trajectories in flight at once."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """openai backend: server URLs, tokenizer, API key variable, concurrency, token ids, timeouts, retries."""
    group_by: list[str] = field(default_factory=lambda: ["family", "subject", "level"])
    """Problem meta keys to break the analysis down by, where a benchmark has them (toy family, MATH subject)."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    """Where the rollouts run: this process (workers=1) or a Ray fleet (`--workers N`, fleet.address)."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Where and under which limits model code runs (e.g. `--set sandbox.url=http://host:8100`, `sandbox.timeout_s`)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Tool-health alarms: stop (after writing the outputs) when the sandbox or grader broke."""

    def __post_init__(self) -> None:
        self.group_by, self.benchmarks, self.modes = map(_comma_list, (self.group_by, self.benchmarks, self.modes))
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if not self.benchmarks and not self.benchmark_files:
            raise ValueError("give at least one benchmark or benchmark file")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


def sampling_for(benchmark: str, config: EvalConfig) -> tuple[int, float]:
    """(n, temperature) for one benchmark: the config's values, else the paper's defaults."""
    n, temperature = PAPER_SAMPLING.get(benchmark, (1, 0.0))
    return (config.n or n, temperature if config.temperature is None else config.temperature)


def _load(config: EvalConfig) -> dict[str, list[Any]]:
    from autocode4math.benchmarks import load_problems

    groups: dict[str, list[Any]] = {}
    for source in [*config.benchmarks, *config.benchmark_files]:
        problems = load_problems(source, limit=config.limit, **config.fields.as_kwargs())
        if not problems:
            raise DataError(f"benchmark {source!r} has no problems")
        groups.setdefault(problems[0].benchmark, []).extend(problems)
    return groups


def backend_options(config: EvalConfig) -> dict[str, Any]:
    """Keyword arguments of `rollout.make_backend` for the evaluation's backend."""
    return backend_kwargs(config.backend, batch_size=config.batch_size, server=config.server)


@contextmanager
def _rollouts(config: EvalConfig, backend: Any, sandbox: Any, grader: Any, rollouts: Any) -> Iterator[Any]:
    """The rollouts given, a given backend (and sandbox, grader) run here, or the engines `config.fleet` describes."""
    if rollouts is not None or backend is not None or sandbox is not None or grader is not None:
        options = backend_options(config)
        yield rollouts or as_rollouts(backend or config.model, config.backend, options, sandbox, grader)
        return
    with open_engines(config.fleet, config.backend, backend_options(config), config.sandbox) as engines:
        yield engines.rollouts(config.model)


NOT_IN_FINGERPRINT = (
    "out",
    "batch_size",
    "max_active",
    "server",
    "group_by",
    "benchmarks",
    "benchmark_files",
    "modes",
    "limit",
    "health",
    "fleet",
    *SANDBOX_PLACEMENT,
)
"""EvalConfig fields left out of the fingerprint: they cannot change a sample (output place, batching,
serving, where the sandbox runs; its limits do count) or only choose which samples are wanted
(samples are kept per benchmark/mode/id/sample, and a reused sample must have the question and
answer the benchmark has now)."""
OUTPUTS = ("samples.jsonl", "metrics.json", "report.md", "plots", "config.yaml", "*.tmp")
"""What an evaluation writes in its directory."""


def fingerprint_settings(config: EvalConfig) -> dict[str, Any]:
    """What determines an evaluation's samples: its sampling and prompt settings and the model, by content."""
    return {**settings_of(config, leave_out=NOT_IN_FINGERPRINT), "model": model_identity(config.model)}


def _changed_questions(done: dict[tuple, dict[str, Any]], groups: dict[str, list[Any]]) -> list[tuple]:
    """Keys of finished samples whose question or gold answer differ from the benchmark's current ones."""
    current = {(b, str(p.id)): (p.question, json.loads(json.dumps(p.answer))) for b, ps in groups.items() for p in ps}
    return [
        k
        for k, r in done.items()
        if current.get((k[0], k[2]), (r["question"], r["answer"])) != (r["question"], r["answer"])
    ]


def _key(record: dict[str, Any]) -> tuple[str, str, str, int]:
    return (str(record["benchmark"]), record["mode"], str(record["id"]), int(record["sample"]))


def run_eval(
    config: EvalConfig,
    *,
    backend: Any = None,
    sandbox: Any = None,
    rollouts: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    fingerprint: dict[str, Any] | None = None,
    grader: Callable | None = None,
) -> dict[str, Any]:
    """Run (or resume) the evaluation; write samples, metrics, report and plots; return the metrics.

    Trajectories run on `rollouts` when given (e.g. a training run's fleet), else on `backend` (and
    `sandbox`, `grader`) in this process, else on the engines `config.fleet` describes. The model (when
    this function loads it) and the benchmarks are checked before anything is written.
    Samples made under another fingerprint (`fingerprint_settings`, or `fingerprint` when the caller
    knows the model's identity) or for a question that has changed raise ResumeError, or are
    discarded with `overwrite`. A tool-health alarm (`config.health`) raises ToolHealthError after
    the outputs are written.
    """
    if backend is None and rollouts is None:
        config = dataclasses.replace(config, model=resolve_model(config.model, config.backend))
    groups = _load(config)
    out = Path(config.out)
    guard(Stage(out, "evaluation", fingerprint or fingerprint_settings(config), OUTPUTS), overwrite)
    samples = out / "samples.jsonl"
    done = _reusable(samples, groups, overwrite)
    save_config(config, out / "config.yaml")
    plan: list[tuple[str, RolloutConfig, list[RolloutRequest]]] = []
    wanted: set[tuple[str, str, str, int]] = set()
    for bench, problems in groups.items():
        n, temperature = sampling_for(bench, config)
        requests = make_requests(problems, config.modes, n, config.prompt)
        wanted |= {r.key() for r in requests}
        rollout = RolloutConfig(
            max_new_tokens=config.max_new_tokens,
            max_code_rounds=config.max_code_rounds,
            temperature=temperature,
            top_p=config.top_p,
            seed=config.seed,
            max_active=config.max_active,
        )
        plan.append((bench, rollout, [r for r in requests if r.key() not in done]))
    stats = RolloutStats()
    if any(todo for _, _, todo in plan):
        with _rollouts(config, backend, sandbox, grader, rollouts) as runner, JsonlAppender(samples) as appender:
            for _, rollout, todo in plan:
                if todo:
                    runner.run(todo, rollout, on_record=appender.write, prompt_config=config.prompt, progress=progress,
                               stats=stats)  # fmt: skip
    records = [r for r in read_done(samples) if _key(r) in wanted]
    labels = group_labels(groups, config.group_by)
    sampling = {b: sampling_for(b, config) for b in groups}
    metrics = write_outputs(records, config, out, sampling, labels, stats if stats.trajectories else None)
    raise_alarms(metrics["tools"], config.health, f"the evaluation in {out}")  # after the outputs, which show them
    return metrics


def _reusable(samples: Path, groups: dict[str, list[Any]], overwrite: bool) -> set[tuple]:
    """Keys of the finished samples in `samples` (those whose tools failed are redone); samples of changed
    questions refuse (or, with overwrite, go)."""
    done = reusable_records(samples, _key)
    changed = _changed_questions(done, groups)
    if changed and not overwrite:
        bench, _, qid, _ = changed[0]
        raise ResumeError(
            f"{samples} holds {len(changed)} samples whose question or answer differ from {bench}'s now (e.g. id "
            f"{qid}): the benchmark changed. Start fresh: another --out, or --overwrite (discards those samples)"
        )
    for key in changed:
        del done[key]
    if changed:
        write_jsonl(samples, done.values())
    return set(done)


def group_labels(groups: dict[str, list[Any]], keys: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{benchmark: {meta key: {question id: value}}} for each key that every problem of the benchmark has."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for bench, problems in groups.items():
        for key in keys:
            if problems and all(key in p.meta for p in problems):
                out.setdefault(bench, {})[key] = {str(p.id): p.meta[key] for p in problems}
    return out


def write_outputs(
    records: list[dict[str, Any]],
    config: EvalConfig,
    out: Path,
    sampling: dict[str, tuple[int, float]],
    labels: dict[str, dict[str, dict[str, Any]]] | None = None,
    rollout: RolloutStats | None = None,
) -> dict[str, Any]:
    """metrics.json, report.md, two PNGs per benchmark, and the table on the terminal.

    `rollout`: what this run's generation measured (schedule, backend occupancy); None when nothing was generated.
    """
    benchmarks = all_metrics(records, config.prompt.code_prefix)
    cost = {bench: cost_points({config.model: m}) for bench, m in benchmarks.items()}
    metrics = {
        "model": config.model,
        "ci_method": CI_METHOD,
        "tools": report(records, config.health),
        "sampling": {b: {"n": n, "temperature": t} for b, (n, t) in sampling.items()},
        "benchmarks": benchmarks,
        "breakdown": {
            bench: {
                key: breakdown([r for r in records if r["benchmark"] == bench], ids, config.prompt.code_prefix)
                for key, ids in by_key.items()
            }
            for bench, by_key in (labels or {}).items()
        },
        "cost": cost,
        "rollout": rollout.to_dict() if rollout is not None else None,
    }
    write_json(out / "metrics.json", metrics)
    for bench, m in benchmarks.items():
        plot_benchmark(bench, m, out / "plots" / f"{bench}.png")
        plot_pareto(cost[bench], out / "plots" / f"{bench}_cost.png", f"{bench}: accuracy versus cost")
    (out / "report.md").write_text(render_report(metrics), encoding="utf-8")
    print_table(metrics)
    return metrics


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _rows(m: dict[str, Any]) -> list[list[str]]:
    return [
        [
            mode,
            str(v["n_samples"]),
            _pct(v["accuracy"]),
            f"{_pct(v['ci_low'])}-{_pct(v['ci_high'])}",
            _pct(v["code_use_rate"]),
            f"{v['mean_code_calls']:.2f}",
            "-" if v.get("mean_sandbox_s") is None else f"{v['mean_sandbox_s']:.3f}",
            _pct(v["code_error_rate"]),
            f"{v['mean_tokens']:.0f}",
        ]
        for mode, v in m["modes"].items()
    ]


HEADER = ["mode", "n", "acc %", "95% CI", "code %", "calls", "sandbox s", "err %", "tokens"]


def tool_lines(m: dict[str, Any]) -> list[str]:
    """One line per mode: code calls and gradings by status (zero counts left out, failures always shown)."""

    def shown(counts: dict[str, int], always: tuple[str, ...]) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items() if v or k in always) or "none"

    return [
        f"- tools, {mode}: code calls {shown(v['code_calls'], ('sandbox_error',))}; "
        f"grading {shown(v['grading'], ('timeout', 'error'))}"
        for mode, v in m["modes"].items()
    ]


def _summary(m: dict[str, Any]) -> str:
    parts = []
    if m.get("union") is not None:
        parts.append(f"union bound (cot or code) {_pct(m['union'])}%")
    sel = m.get("selection")
    if sel is not None:
        parts.append(
            f"auto selection accuracy {_pct(sel['selection_accuracy'])}% over {sel['n_decisive']} decisive questions"
            f" ({sel['n_both']} solved by both, {sel['n_neither']} by neither, excluded)"
        )
    return "; ".join(parts)


def render_report(metrics: dict[str, Any]) -> str:
    """The Markdown report: one table per benchmark, the analysis line, the plot, the definitions."""
    lines = [f"# Evaluation of `{metrics['model']}`", ""]
    for alarm in metrics.get("tools", {}).get("alarms", []):
        lines += [f"**Tool health alarm**: {alarm}", ""]
    for bench, m in metrics["benchmarks"].items():
        s = metrics["sampling"].get(bench, {})
        lines += [f"## {bench}", "", f"n = {s.get('n')}, temperature = {s.get('temperature')}", ""]
        lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in _rows(m)]
        lines += ["", *tool_lines(m)]
        summary = _summary(m)
        lines += ["", summary, ""] if summary else [""]
        lines += [f"![{bench}](plots/{bench}.png)", ""]
        if metrics.get("cost", {}).get(bench):
            lines += [f"### {bench}: accuracy versus cost", ""]
            lines += [*cost_table(metrics["cost"][bench], f"plots/{bench}_cost.png"), ""]
        for key, table in metrics.get("breakdown", {}).get(bench, {}).items():
            lines += [f"### {bench} by {key}", "", *breakdown_table(table), ""]
    if metrics.get("rollout"):
        lines += ["## Generation (this run)", "", RolloutStats(**metrics["rollout"]).summary() + ".", ""]
    lines += [
        "## Definitions",
        "",
        f"- Accuracy: mean correctness over all samples; 95% interval: {metrics['ci_method']}.",
        "- n: samples; code %: share of samples that executed at least one code block; calls: mean executed code"
        " blocks per sample; sandbox s: mean seconds the sandbox ran a sample's code; err %: share of executed"
        " blocks whose status is not ok; tokens: mean model-generated tokens (tool output excluded).",
        "- Per question (/ q): the mean over samples, i.e. the cost of answering a question once. Pareto front:"
        " no other mode or model is at least as accurate for at most the same tokens (or code calls).",
        "- Backend occupancy: time-weighted mean of generation requests in flight, over the trajectories allowed in"
        " flight (max_active).",
        "- tools: executed code blocks by sandbox status (sandbox_error: the sandbox itself failed, not the code) and"
        " samples by grading status (timeout or error: the grader failed; such a sample counts as wrong).",
        "- Union bound: mean over questions of max(cot solve rate, code solve rate).",
        "- Selection accuracy: over auto samples of questions where cot and code solve rates differ, the share"
        " whose use of code matches the better mode; tied questions are excluded.",
        "",
    ]
    return "\n".join(lines)


BREAKDOWN_HEADER = ["group", "questions", "auto %", "cot %", "code %", "union %", "auto code %", "selection %"]


def _breakdown_rows(table: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Cells of one breakdown (group -> compact analysis), one row per group."""
    rows = []
    for group, v in table.items():
        cells = [group, str(v["n_questions"])]
        cells += [_pct(v.get(k)) for k in ("auto_accuracy", "cot_accuracy", "code_accuracy", "union")]
        rows.append(cells + [_pct(v.get("auto_code_use_rate")), _pct(v.get("selection_accuracy"))])
    return rows


def breakdown_table(table: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of one breakdown (group -> compact analysis)."""
    rows = ["| " + " | ".join(BREAKDOWN_HEADER) + " |", "|" + "---|" * len(BREAKDOWN_HEADER)]
    return rows + ["| " + " | ".join(cells) + " |" for cells in _breakdown_rows(table)]


def print_table(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for bench, m in metrics["benchmarks"].items():
        table = Table(title=bench)
        for h in HEADER:
            table.add_column(h, justify="left" if h == "mode" else "right")
        for row in _rows(m):
            table.add_row(*row)
        console.print(table)
        summary = _summary(m)
        if summary:
            console.print(summary)
        for key, groups in metrics.get("breakdown", {}).get(bench, {}).items():
            sub = Table(title=f"{bench} by {key}")
            for h in BREAKDOWN_HEADER:
                sub.add_column(h, justify="left" if h == "group" else "right")
            for cells in _breakdown_rows(groups):
                sub.add_row(*cells)
            console.print(sub)
    if metrics.get("rollout"):
        console.print("generation: " + RolloutStats(**metrics["rollout"]).summary())


def replace(config: EvalConfig, **changes: Any) -> EvalConfig:
    """A copy of `config` with the given (non-None) fields changed, checked again."""
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
