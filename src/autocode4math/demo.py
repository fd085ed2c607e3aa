"""`autocode demo`: the paper's study on the toy world, on a laptop CPU, from the shipped checkpoints.

Four methods under the same rollout budget (the paper's Fig. 4):
- EM (ours): E-step + off-policy M-step, from the base checkpoint;
- Base+RL: on-policy RL from the base checkpoint;
- SFT+RL: on-policy RL from the SFT checkpoint;
- SFT: the shipped SFT checkpoint itself (trained on a fixed tool-integrated set; it generates no
  rollouts, so it is a horizontal line in the token plot).
Each RL run evaluates on the dev split after every iteration; the final models are evaluated on the
test split in auto, cot and code modes. The run directory gets `metrics.json`, `report.md` and
`fig4_accuracy_vs_tokens.png`, `fig5_code_rate_distribution.png`, `fig6_modes.png` and
`fig_cost_pareto.png` (accuracy against tokens and code calls per model and mode).

Everything is resumable: each method is an `em.train` run in its own subdirectory and each
evaluation an `evaluate.run_eval` output, so rerunning the same command only does what is missing.
The default is sized for about ten minutes on two cores; `--full` runs the longer study.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocode4math.analysis import cost_table, eval_cost_points, plot_pareto
from autocode4math.config import save_config
from autocode4math.em import DevEval, TrainConfig, flatten_metrics, resolve_model, train
from autocode4math.estep import EStepConfig
from autocode4math.fingerprint import SANDBOX_PLACEMENT, Stage, guard, settings_of
from autocode4math.io import read_jsonl, write_json
from autocode4math.mstep import MStepConfig
from autocode4math.rollout import RolloutConfig
from autocode4math.sandbox import SandboxConfig

NOT_IN_FINGERPRINT = ("out", "methods", "batch_size", *SANDBOX_PLACEMENT)
"""DemoConfig fields that cannot change any part's results (each method is a part of its own)."""
OUTPUTS = ("demo_config.yaml", "metrics.json", "report.md", "fig*.png", "em", "base_rl", "sft_rl", "sft", "test")
"""What the demo writes in its directory."""
RUNS = {"em": ("em", "toy-base"), "base_rl": ("rl", "toy-base"), "sft_rl": ("rl", "toy-sft")}
LABELS = {"em": "EM (ours)", "base_rl": "Base+RL", "sft_rl": "SFT+RL", "sft": "SFT"}


@dataclass
class DemoConfig:
    """Sizes of the toy study; the defaults fit about ten minutes on a 2-core CPU."""

    out: str = "runs/demo"
    iterations: int = 2
    queries: int = 64
    """Training queries (from the toy train split)."""
    k: int = 4
    """E-step rollouts per query and decision; RL methods get 2k auto rollouts per query."""
    per_query: int = 4
    """E-step training trajectories per query."""
    alpha: float = 4.0
    """E-step inverse temperature of s*."""
    lr: float = 1e-4
    """M-step learning rate (chosen on the dev split: 5e-4 collapsed the model, 3e-5 barely moved it)."""
    epochs: int = 2
    micro_batch_size: int = 16
    dev: int = 36
    test: int = 200
    """First questions of the toy test split evaluated at the end (600 with --full)."""
    max_new_tokens: int = 256
    batch_size: int = 64
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["em", "base_rl", "sft_rl", "sft"])
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Where and under which limits model code runs (e.g. `--set sandbox.url=http://host:8100`)."""

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(LABELS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; known: {sorted(LABELS)}")
        for name in ("iterations", "queries", "k", "per_query", "dev", "test", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @classmethod
    def full(cls, **changes: Any) -> DemoConfig:
        """The longer study of `autocode demo --full`."""
        base = {"out": "runs/demo-full", "iterations": 4, "queries": 400, "k": 8, "dev": 300, "test": 600}
        return cls(**{**base, **changes})


def train_config(config: DemoConfig, method: str) -> TrainConfig:
    """The em.train configuration of one RL method of the study."""
    algo, start = RUNS[method]
    rollout = RolloutConfig(
        max_new_tokens=config.max_new_tokens, temperature=1.0, top_p=0.9, seed=config.seed, max_active=256
    )
    return TrainConfig(
        method=algo,
        model=start,
        queries="toy",
        queries_limit=config.queries,
        iterations=config.iterations,
        out=str(Path(config.out) / method),
        rl_samples=2 * config.k,
        sandbox=config.sandbox,
        estep=EStepConfig(
            k=config.k,
            per_query=config.per_query,
            alpha=config.alpha,
            seed=config.seed,
            batch_size=config.batch_size,
            rollout=rollout,
        ),
        mstep=MStepConfig(
            lr=config.lr,
            epochs=rl_epochs(config) if algo == "rl" else config.epochs,
            micro_batch_size=config.micro_batch_size,
            schedule="constant",
            save_every=1000,
            seed=config.seed,
        ),
        eval=DevEval(
            source="toy:dev", limit=config.dev, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size
        ),
    )


def rl_epochs(config: DemoConfig) -> float:
    """Epochs of the RL baselines' M-step: exactly EM's trajectory passes, at every size.

    EM trains `epochs` times over `per_query` subsampled trajectories per query, RL over all its 2k
    rollouts per query, so RL runs epochs * per_query / 2k epochs (a fraction trains a last pass over
    that share of its rollouts). Rounding this to whole epochs gave RL twice EM's passes at --full.
    """
    return config.epochs * min(config.per_query, 2 * config.k) / (2 * config.k)


def evaluate(
    config: DemoConfig, model: str, source: str, out: Path, progress: bool, overwrite: bool = False
) -> dict[str, Any]:
    """auto/cot/code on a toy split (greedy, one sample per question), resumable in `out`."""
    from autocode4math.evaluate import EvalConfig, run_eval

    ev = EvalConfig(
        model=model,
        benchmarks=[source],
        n=1,
        temperature=0.0,
        limit=config.test if source == "toy:test" else config.dev,
        out=str(out),
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        max_active=256,
        sandbox=config.sandbox,
    )
    return flatten_metrics(run_eval(ev, progress=progress, overwrite=overwrite))


def run_demo(config: DemoConfig, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the study; write metrics.json, report.md and the three figures; return the metrics.

    The study's settings are checked against the fingerprint recorded in `out` before anything runs,
    and every part (training run, evaluation) checks its own too; `overwrite` discards results made
    with other settings instead of refusing."""
    out = Path(config.out)
    guard(Stage(out, "demo", settings_of(config, leave_out=NOT_IN_FINGERPRINT), OUTPUTS), overwrite)
    save_config(config, out / "demo_config.yaml")
    started = time.monotonic()
    curves: dict[str, list[dict[str, Any]]] = {}
    finals: dict[str, str] = {}
    for method in config.methods:
        if method == "sft":
            finals["sft"] = resolve_model("toy-sft")
            continue
        curves[method] = train(train_config(config, method), progress=progress, overwrite=overwrite)
        finals[method] = curves[method][-1]["model"]
    finals["base"] = resolve_model("toy-base")
    test = {
        name: evaluate(config, model, "toy:test", out / "test" / name, progress, overwrite)
        for name, model in finals.items()
    }
    cost = eval_cost_points({LABELS.get(name, name): out / "test" / name for name in test})
    plot_pareto(cost, out / "fig_cost_pareto.png", "toy test split: accuracy versus cost")
    sft_dev = None
    if "sft_rl" in curves:  # SFT+RL's iteration 0 is the SFT checkpoint on the same dev questions
        sft_dev = curves["sft_rl"][0]
    elif "sft" in config.methods:
        sft_dev = evaluate(config, finals["sft"], "toy:dev", out / "sft" / "dev", progress, overwrite)
    phases = code_rate_phases(out / "em", out / "test" / "em" / "samples.jsonl") if "em" in config.methods else {}
    metrics = {
        "config": dataclasses.asdict(config),
        "seconds": round(time.monotonic() - started, 1),
        "curves": curves,
        "sft_dev": sft_dev,
        "test": test,
        "code_rate_phases": phases,
        "targets": targets(test),
        "cost": cost,
    }
    write_json(out / "metrics.json", metrics)
    plot_all(metrics, out)
    (out / "report.md").write_text(render_report(metrics), encoding="utf-8")
    return metrics


def code_rate_phases(em_run: Path, trained_samples: Path | None = None) -> dict[str, list[float]]:
    """Per-query unprompted code-use rate at the first, middle and last E-step (its auto rollouts), and of
    the trained model on the test split (`trained_samples`: its eval samples; greedy, so 0 or 1 per query)."""
    files = sorted(em_run.glob("iter-*/collect/rollouts.jsonl"))
    picks = sorted({0, len(files) // 2, len(files) - 1}) if files else []
    phases = {f"E-step {int(files[i].parts[-3][5:])}": _raw_pi(files[i]) for i in picks}
    if trained_samples is not None and trained_samples.exists():
        phases["trained (test)"] = _raw_pi(trained_samples)
    return phases


def _raw_pi(path: Path) -> list[float]:
    """Unsmoothed share of auto-mode rollouts (no forced prefix) that used code, per query."""
    counts: dict[str, list[int]] = {}
    for r in read_jsonl(path):
        if r["mode"] == "auto" and not r["prefix"]:
            c = counts.setdefault(str(r["id"]), [0, 0])
            c[0] += int(bool(r["used_code"]))
            c[1] += 1
    return [k / n for k, n in counts.values() if n]


def targets(test: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets on the test split, each with its measured numbers and whether it holds."""
    if "em" not in test:
        return {}
    em = test["em"]
    best_mode = max(em["cot_accuracy"], em["code_accuracy"])
    out = {
        "em_auto_vs_best_mode": {
            "auto": em["auto_accuracy"],
            "best_of_cot_code": best_mode,
            "met": em["auto_accuracy"] >= best_mode + 0.05,
        },
        "selection_accuracy": {
            "value": em["selection_accuracy"],
            "met": (em["selection_accuracy"] or 0) >= 0.85,
        },
        "code_rate_reduction": {
            "auto_code_rate": em["auto_code_use_rate"],
            "code_mode_code_rate": em["code_code_use_rate"],
            "met": em["auto_code_use_rate"] <= 0.7 * em["code_code_use_rate"]
            and em["auto_accuracy"] >= em["code_accuracy"],
        },
    }
    if "sft_rl" in test:
        out["em_vs_sft_rl_auto"] = {
            "em": em["auto_accuracy"],
            "sft_rl": test["sft_rl"]["auto_accuracy"],
            "met": em["auto_accuracy"] > test["sft_rl"]["auto_accuracy"],
        }
    return out


def plot_all(metrics: dict[str, Any], out: Path) -> None:
    """Fig. 4 (dev accuracy vs generated tokens), Fig. 5 (code-rate distribution), Fig. 6 (modes on test)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in metrics["curves"].items():
        ax.plot([r["tokens"] for r in rows], [100 * r["auto_accuracy"] for r in rows], "o-", label=LABELS[method])
    if metrics["sft_dev"]:
        ax.axhline(100 * metrics["sft_dev"]["auto_accuracy"], ls="--", color="gray", label=LABELS["sft"])
    ax.set(xlabel="generated rollout tokens", ylabel="dev accuracy, auto mode (%)", title="Training efficiency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig4_accuracy_vs_tokens.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    phases = metrics["code_rate_phases"]
    if phases:
        rates = list(phases.values())
        weights = [[1 / len(r)] * len(r) for r in rates]  # phases have different query counts: show shares
        ax.hist(rates, bins=[i / 10 for i in range(11)], weights=weights, label=list(phases), alpha=0.8)
        ax.legend()
    ax.set(xlabel="code-use rate of a query (auto mode)", ylabel="share of queries", title="EM: code use")
    fig.tight_layout()
    fig.savefig(out / "fig5_code_rate_distribution.png", dpi=120)
    plt.close(fig)

    names = list(metrics["test"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for j, key in enumerate(["auto_accuracy", "cot_accuracy", "code_accuracy", "union"]):
        xs = [i + (j - 1.5) * width for i in range(len(names))]
        ax.bar(xs, [100 * (metrics["test"][n][key] or 0) for n in names], width, label=key.replace("_accuracy", ""))
    ax.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names])
    ax.set(ylabel="test accuracy (%)", title="Modes on the toy test split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig6_modes.png", dpi=120)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_report(metrics: dict[str, Any]) -> str:
    """report.md: the test table, the targets with their numbers, the dev curves and the figures."""
    lines = [
        "# AutoCode4Math on the toy world",
        "",
        f"Wall-clock: {metrics['seconds']:.0f} s. Config: `demo_config.yaml`. "
        "Test split, greedy decoding, one sample per question.",
        "",
        "| model | auto | cot | code | union | selection acc. | code use (auto) | code use (code mode) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics["test"].items():
        lines.append(
            f"| {LABELS.get(name, name)} | {_pct(m['auto_accuracy'])} | {_pct(m['cot_accuracy'])} | "
            f"{_pct(m['code_accuracy'])} | {_pct(m['union'])} | {_pct(m['selection_accuracy'])} | "
            f"{_pct(m['auto_code_use_rate'])} | {_pct(m['code_code_use_rate'])} |"
        )
    lines += ["", "## Targets", ""]
    for name, t in metrics["targets"].items():
        figures = ", ".join(f"{k} {_pct(v) if isinstance(v, float) else v}" for k, v in t.items() if k != "met")
        lines.append(f"- {name}: {'met' if t['met'] else 'NOT met'} ({figures})")
    if metrics.get("cost"):
        lines += ["", "## Accuracy versus cost (test split)", "", *cost_table(metrics["cost"], "fig_cost_pareto.png")]
    lines += ["", "## Dev accuracy (auto) by iteration", "", "| method | iteration | generated tokens | auto |"]
    lines.append("|---|---|---|---|")
    for method, rows in metrics["curves"].items():
        for r in rows:
            lines.append(f"| {LABELS[method]} | {r['iteration']} | {r['tokens']:,} | {_pct(r['auto_accuracy'])} |")
    lines += [
        "",
        "![Fig. 4](fig4_accuracy_vs_tokens.png) ![Fig. 5](fig5_code_rate_distribution.png) ![Fig. 6](fig6_modes.png)",
        "",
    ]
    return "\n".join(lines)
