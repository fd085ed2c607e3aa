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

from autocode4math.analysis import cost_table, eval_cost_points, plot_pareto, seed_interval
from autocode4math.benchmarks import TOY_SOURCES
from autocode4math.config import save_config, with_overrides
from autocode4math.em import DevEval, TrainConfig, flatten_metrics, resolve_model, train
from autocode4math.estep import EStepConfig
from autocode4math.fingerprint import SANDBOX_PLACEMENT, Stage, guard, settings_of
from autocode4math.io import read_jsonl, write_json
from autocode4math.mstep import MStepConfig
from autocode4math.rollout import RolloutConfig
from autocode4math.sandbox import SandboxConfig
from autocode4math.seeds import (
    INTERVAL_METHOD,
    QUESTION_FIGURES,
    auto_vs_best_mode,
    paired_differences,
    summarise,
)

NOT_IN_FINGERPRINT = ("out", "methods", "batch_size", "seed", "seeds", *SANDBOX_PLACEMENT)
"""DemoConfig fields that cannot change any part's results: each method and each seed is a part of its own (its
training run under seed-<s>/ records its own fingerprint, seed included), so seeds can run as separate processes."""
OUTPUTS = ("demo_config.yaml", "metrics.json", "report.md", "fig*.png", "seed-*", "sft", "test")
"""What the demo writes in its directory."""
RUNS = {"em": ("em", "base"), "em_mid": ("em", "base"), "base_rl": ("rl", "base"), "sft_rl": ("rl", "toy-sft")}
"""Trained methods: (em.train method, starting checkpoint; `base` is DemoConfig.base_model)."""
LABELS = {
    "em": "EM (ours)",
    "em_mid": "EM + mid-reasoning",
    "base_rl": "Base+RL",
    "sft_rl": "SFT+RL",
    "sft": "SFT",
    "base": "base",
}


@dataclass
class DemoConfig:
    """Sizes of the toy study; the defaults fit about ten minutes on a 2-core CPU."""

    out: str = "runs/demo"
    iterations: int = 2
    queries: int = 128
    """Training queries (from the toy train split)."""
    k: int = 4
    """E-step rollouts per query and decision; RL methods get 2k auto rollouts per query."""
    per_query: int = 4
    """E-step training trajectories per query."""
    alpha: float = 4.0
    """E-step inverse temperature of s*."""
    lr: float = 1e-4
    """M-step learning rate (chosen on the dev split: 5e-4 collapsed the model, 3e-5 barely moved it)."""
    epochs: int = 1
    """M-step passes over EM's training set (RL baselines: as many trajectory passes). One pass over 128
    queries rather than two over 64 keeps EM's forced modes near the starting model's (docs/demo.md)."""
    micro_batch_size: int = 16
    dev: int = 36
    test: int = 200
    """First questions of the toy test split evaluated at the end (600, the whole split, with --full or
    several seeds; 200 keeps the single-seed default within ten minutes)."""
    max_new_tokens: int = 256
    batch_size: int = 64
    seed: int = 0
    """First training seed: seed s drives rollout sampling, E-step subsampling and M-step batch order."""
    seeds: int = 1
    """Training seeds: the study runs for seed, seed + 1, ... and reports means with 95% intervals."""
    methods: list[str] = field(default_factory=lambda: ["em", "base_rl", "sft_rl", "sft"])
    """em, em_mid (EM with mid-reasoning rollouts, estep.mid_reasoning), base_rl, sft_rl, sft."""
    cot_anchor_weight: float = 1.0
    """EM's cot anchor (MStepConfig.cot_anchor_weight, whose library default is 0: the paper's objective); on
    the toy world it keeps the cot mode near the starting model's (docs/demo.md). RL baselines have none."""
    em: dict[str, Any] = field(default_factory=dict)
    """Overrides of EM's TrainConfig (em and em_mid) on top of the above, e.g. `--set em.mstep.kl_coef=0.05`."""
    source: str = "toy"
    """Toy source of the training queries and the dev and test questions: toy, or toy-mid (the mid family)."""
    base_model: str = "toy-base"
    """Checkpoint EM and Base+RL start from, also evaluated as `base` (the mid study: toy-mid-base)."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Where and under which limits model code runs (e.g. `--set sandbox.url=http://host:8100`)."""

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(LABELS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; known: {sorted(LABELS)}")
        for name in ("iterations", "queries", "k", "per_query", "dev", "test", "epochs", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.source not in TOY_SOURCES:
            raise ValueError(f"source must be one of {TOY_SOURCES}, got {self.source!r}")
        if self.em:
            train_config(self, "em")  # unknown or bad EM overrides fail here, before anything runs

    @classmethod
    def full(cls, **changes: Any) -> DemoConfig:
        """The longer study of `autocode demo --full`."""
        base = {"out": "runs/demo-full", "iterations": 4, "queries": 400, "k": 8, "epochs": 2, "dev": 300, "test": 600}
        return cls(**{**base, **changes})


def train_config(config: DemoConfig, method: str) -> TrainConfig:
    """The em.train configuration of one trained method of the study (EM with `config.em`'s overrides)."""
    base = _train_config(config, method)
    if method == "em_mid":
        base = dataclasses.replace(base, estep=dataclasses.replace(base.estep, mid_reasoning=True))
    return with_overrides(base, config.em) if RUNS[method][0] == "em" and config.em else base


def _train_config(config: DemoConfig, method: str) -> TrainConfig:
    algo, start = RUNS[method]
    start = config.base_model if start == "base" else start
    rollout = RolloutConfig(
        max_new_tokens=config.max_new_tokens, temperature=1.0, top_p=0.9, seed=config.seed, max_active=256
    )
    return TrainConfig(
        method=algo,
        model=start,
        queries=config.source,
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
            cot_anchor_weight=config.cot_anchor_weight if algo == "em" else 0.0,
            schedule="constant",
            save_every=1000,
            seed=config.seed,
        ),
        eval=DevEval(
            source=f"{config.source}:dev",
            limit=config.dev,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
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
        limit=config.test if source.endswith(":test") else config.dev,
        out=str(out),
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        max_active=256,
        sandbox=config.sandbox,
    )
    return flatten_metrics(run_eval(ev, progress=progress, overwrite=overwrite))


def run_demo(config: DemoConfig, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the study for every seed; write metrics.json, report.md and the figures; return the metrics.

    Layout: `test/base` and `test/sft` first, once: the shipped checkpoints evaluated greedily do not depend on
    the seed; then `seed-<s>/<method>/` (an em.train run) and `seed-<s>/test/<method>/` per seed. Seeds can also
    run as separate processes (`--seeds 1 --set seed=s`, same `--out`) once `test/` is done; a final run with
    all the seeds then only aggregates. The study's settings are checked against the fingerprint recorded in
    `out` before anything runs, and every part (training run, evaluation) checks its own too; `overwrite`
    discards results made with other settings instead of refusing.
    """
    out = Path(config.out)
    guard(Stage(out, "demo", settings_of(config, leave_out=NOT_IN_FINGERPRINT), OUTPUTS), overwrite)
    save_config(config, out / "demo_config.yaml")
    started = time.monotonic()
    fixed = {"base": resolve_model(config.base_model)}
    fixed |= {"sft": resolve_model("toy-sft")} if "sft" in config.methods else {}
    tests = {
        name: evaluate(config, model, f"{config.source}:test", out / "test" / name, progress, overwrite)
        for name, model in fixed.items()
    }
    studies = [run_seed(config, seed, progress, overwrite) for seed in seed_list(config)]
    for study in studies:
        for name, test in tests.items():
            study["test"][name], study["samples"][name] = test, out / "test" / name / "samples.jsonl"
    sft_dev = None
    if "sft_rl" in config.methods:  # SFT+RL's iteration 0 is the SFT checkpoint on the same dev questions
        sft_dev = studies[0]["curves"]["sft_rl"][0]
    elif "sft" in config.methods:
        sft_dev = evaluate(config, fixed["sft"], f"{config.source}:dev", out / "sft" / "dev", progress, overwrite)
    metrics = aggregate(config, studies, round(time.monotonic() - started, 1), sft_dev)
    metrics["cost"] = eval_cost_points({_label(m, metrics): path.parent for m, path in studies[0]["samples"].items()})
    plot_pareto(metrics["cost"], out / "fig_cost_pareto.png", "toy test split: accuracy versus cost")
    write_json(out / "metrics.json", metrics)
    plot_all(metrics, out)
    (out / "report.md").write_text(render_report(metrics), encoding="utf-8")
    return metrics


def seed_list(config: DemoConfig) -> list[int]:
    return [config.seed + i for i in range(config.seeds)]


def run_seed(config: DemoConfig, seed: int, progress: bool, overwrite: bool = False) -> dict[str, Any]:
    """Train and test every RL method of the study with one seed, under `<out>/seed-<seed>`."""
    d = Path(config.out) / f"seed-{seed}"
    one = dataclasses.replace(config, seed=seed, out=str(d))
    curves = {
        m: train(train_config(one, m), progress=progress, overwrite=overwrite) for m in config.methods if m in RUNS
    }
    test = {
        m: evaluate(one, rows[-1]["model"], f"{config.source}:test", d / "test" / m, progress, overwrite)
        for m, rows in curves.items()
    }
    samples = {m: d / "test" / m / "samples.jsonl" for m in curves}
    phases = {m: code_rate_phases(d / m, samples[m]) for m in ("em", "sft_rl") if m in curves}
    return {"seed": seed, "curves": curves, "test": test, "samples": samples, "phases": phases}


def aggregate(
    config: DemoConfig, studies: list[dict[str, Any]], seconds: float, sft_dev: dict[str, Any] | None
) -> dict[str, Any]:
    """metrics.json: means over seeds with intervals, paired differences, per-seed figures, targets."""
    records = {m: [list(read_jsonl(s["samples"][m])) for s in studies] for m in studies[0]["samples"]}
    intervals = summarise(records)
    diffs = paired_differences(records)
    if "em" in records:
        diffs["em_auto_vs_best_mode_diff"] = auto_vs_best_mode(records["em"])
    if "em" in records and "em_mid" in records:  # what mid-reasoning rollouts add, and how code starts
        mid = {"em_mid": records["em_mid"], "em": records["em"]}
        diffs |= paired_differences(mid, "em_mid", figures=("auto_accuracy", "auto_code_after_text_rate"))
    for method in studies[0]["curves"]:  # trained models only: the shipped ones do not vary with the seed
        selection = [s["test"][method]["selection_accuracy"] for s in studies]
        if None not in selection:
            intervals[method]["selection_accuracy"] = seed_interval(selection)
    test = {m: _mean_row([s["test"][m] for s in studies]) for m in studies[0]["test"]}
    phases: dict[str, dict[str, list[float]]] = {}
    for s in studies:
        for method, by_phase in s["phases"].items():
            for phase, rates in by_phase.items():
                phases.setdefault(method, {}).setdefault(phase, []).extend(rates)
    return {
        "config": dataclasses.asdict(config),
        "seconds": seconds,
        "seeds": [s["seed"] for s in studies],
        "interval_method": INTERVAL_METHOD,
        "curves": {m: mean_curve([s["curves"][m] for s in studies]) for m in studies[0]["curves"]},
        "sft_dev": sft_dev,
        "test": test,
        "test_ci": intervals,
        **diffs,
        "per_seed": [{"seed": s["seed"], "test": s["test"], "curves": s["curves"]} for s in studies],
        "code_rate_phases": phases,
        "code_rate_extremes": {m: {p: extreme_share(r) for p, r in by.items()} for m, by in phases.items()},
        "targets": targets(test, intervals, diffs),
    }


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Numeric entries that differ between seeds averaged (None if any seed lacks them); others from the first."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        values = [r.get(key) for r in rows]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(set(values)) > 1:
            out[key] = None if None in values else sum(values) / len(values)
    return out


def mean_curve(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Dev curve averaged over seeds, point by point, with `auto_accuracy_ci95` (t over seeds; None for one)."""
    out = []
    for points in zip(*per_seed, strict=True):
        row = _mean_row(list(points))
        row["auto_accuracy_ci95"] = seed_interval([p["auto_accuracy"] for p in points])["ci95"]
        out.append(row)
    return out


def extreme_share(rates: list[float]) -> float | None:
    """Share of queries whose code-use rate is exactly 0 or 1 (the paper's Fig. 5 collapse)."""
    return sum(r in (0.0, 1.0) for r in rates) / len(rates) if rates else None


def code_rate_phases(run: Path, trained_samples: Path | None = None) -> dict[str, list[float]]:
    """Per-query unprompted code-use rate in each iteration's training rollouts of a run (EM: the E-step's
    auto rollouts; RL: the policy's own rollouts), and of the trained model on the test split
    (`trained_samples`: its eval samples; greedy, so 0 or 1 per query)."""
    files = sorted(run.glob("iter-*/collect/rollouts.jsonl"))
    phases = {f"iteration {int(f.parts[-3][5:])}": _raw_pi(f) for f in files}
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


def targets(
    test: dict[str, dict[str, Any]],
    intervals: dict[str, dict[str, Any]] | None = None,
    diffs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The issue's targets on the test split (means over seeds), each with its numbers, its 95% interval
    where one exists (`intervals`: demo's test_ci, `diffs`: its paired differences) and whether it holds."""
    if "em" not in test:
        return {}
    em, ci, diffs = test["em"], (intervals or {}).get("em", {}), diffs or {}
    best_mode = max(em["cot_accuracy"], em["code_accuracy"])
    out = {
        "em_auto_vs_best_mode": {
            "auto": em["auto_accuracy"],
            "best_of_cot_code": best_mode,
            "ci95": _ci(diffs.get("em_auto_vs_best_mode_diff")),
            "met": em["auto_accuracy"] >= best_mode + 0.05,
        },
        "selection_accuracy": {
            "value": em["selection_accuracy"],
            "ci95": _ci(ci.get("selection_accuracy")),
            "met": (em["selection_accuracy"] or 0) >= 0.85,
        },
        "code_rate_reduction": {
            "auto_code_rate": em["auto_code_use_rate"],
            "code_mode_code_rate": em["code_code_use_rate"],
            "ci95": _ci(ci.get("auto_code_use_rate")),
            "met": em["auto_code_use_rate"] <= 0.7 * em["code_code_use_rate"]
            and em["auto_accuracy"] >= em["code_accuracy"],
        },
    }
    if "sft_rl" in test:
        out["em_vs_sft_rl_auto"] = {
            "em": em["auto_accuracy"],
            "sft_rl": test["sft_rl"]["auto_accuracy"],
            "ci95": _ci(diffs.get("em_vs_sft_rl_auto_diff")),
            "met": em["auto_accuracy"] > test["sft_rl"]["auto_accuracy"],
        }
    for name in ("em_auto_vs_best_mode", "em_vs_sft_rl_auto"):  # differences: significant when above 0 at 95%
        if name in out and out[name]["ci95"] is not None:
            out[name]["significant"] = out[name]["ci95"][0] > 0
    return out


def _ci(interval: dict[str, Any] | None) -> list[float] | None:
    return None if interval is None else interval["ci95"]


def plot_all(metrics: dict[str, Any], out: Path) -> None:
    """Fig. 4 (dev accuracy vs generated tokens), Fig. 5 (code-rate distribution), Fig. 6 (modes on test)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_fig4(metrics, out / "fig4_accuracy_vs_tokens.png", plt)
    plot_fig5(metrics["code_rate_phases"], out / "fig5_code_rate_distribution.png", plt)
    names = list(metrics["test"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for j, key in enumerate(["auto_accuracy", "cot_accuracy", "code_accuracy", "union"]):
        xs = [i + (j - 1.5) * width for i in range(len(names))]
        ax.bar(xs, [100 * (metrics["test"][n][key] or 0) for n in names], width, label=key.replace("_accuracy", ""))
    ax.set_xticks(range(len(names)), [_label(n, metrics) for n in names])
    ax.set(ylabel="test accuracy (%)", title="Modes on the toy test split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig6_modes.png", dpi=120)
    plt.close(fig)


def plot_fig4(metrics: dict[str, Any], path: Path, plt: Any) -> None:
    """Dev accuracy (auto) against generated rollout tokens, mean over seeds with a 95% band."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in metrics["curves"].items():
        tokens = [r["tokens"] for r in rows]
        line = ax.plot(tokens, [100 * r["auto_accuracy"] for r in rows], "o-", label=LABELS[method])[0]
        if all(r.get("auto_accuracy_ci95") for r in rows):
            lo, hi = zip(*(r["auto_accuracy_ci95"] for r in rows), strict=True)
            ax.fill_between(tokens, [100 * v for v in lo], [100 * v for v in hi], color=line.get_color(), alpha=0.15)
    if metrics["sft_dev"]:
        ax.axhline(100 * metrics["sft_dev"]["auto_accuracy"], ls="--", color="gray", label=LABELS["sft"])
    seeds = len(metrics.get("seeds", [])) or 1
    title = "Training efficiency" + (f" ({seeds} seeds, 95% bands)" if seeds > 1 else "")
    ax.set(xlabel="generated rollout tokens", ylabel="dev accuracy, auto mode (%)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fig5(phases: dict[str, dict[str, list[float]]], path: Path, plt: Any) -> None:
    """The paper's Fig. 5: per-query code-use rates at each iteration, SFT+RL (its own rollouts) beside EM
    (the E-step's unprompted rollouts), plus each trained model on the test split; shares of queries."""
    titles = {"sft_rl": "SFT+RL: its rollouts", "em": "EM: E-step, unprompted rollouts"}
    methods = [m for m in ("sft_rl", "em") if phases.get(m)] or ["em"]
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        by_phase = phases.get(method, {})
        if by_phase:
            rates = list(by_phase.values())
            weights = [[1 / len(r)] * len(r) for r in rates]  # phases have different query counts: show shares
            ax.hist(rates, bins=[i / 10 for i in range(11)], weights=weights, label=list(by_phase))
            ax.legend()
        ax.set(xlabel="code-use rate of a query (auto mode)", ylabel="share of queries", title=titles[method])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _with_ci(mean: float | None, interval: dict[str, Any] | None) -> str:
    """`57.5 [50.6, 64.4]` in percent; just the mean when there is no interval."""
    if interval is None or interval.get("ci95") is None:
        return _pct(mean)
    lo, hi = interval["ci95"]
    return f"{_pct(mean)} [{_pct(lo)}, {_pct(hi)}]"


def _label(name: str, metrics: dict[str, Any]) -> str:
    return metrics["config"]["base_model"] if name == "base" else LABELS.get(name, name)


def render_report(metrics: dict[str, Any]) -> str:
    """report.md: the test table with intervals, paired differences, targets, per-seed figures, dev curves."""
    seeds = metrics["seeds"]
    lines = [
        "# AutoCode4Math on the toy world",
        "",
        f"Wall-clock: {metrics['seconds']:.0f} s. Config: `demo_config.yaml`. Seeds: {', '.join(map(str, seeds))}. "
        "Test split, greedy decoding, one sample per question.",
        "",
        f"Each figure: mean and 95% interval ({metrics['interval_method']}).",
        "",
        "| model | auto | cot | code | union | selection acc. | code use (auto) | code use (code mode) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    after_text = any(m.get("auto_code_after_text_rate") for m in metrics["test"].values())
    if after_text:  # code that starts after a line of text: the mid-reasoning measure
        lines[-2:] = [lines[-2] + " code after text (auto) |", lines[-1] + "---|"]
    for name, m in metrics["test"].items():
        ci = metrics["test_ci"].get(name, {})
        cells = [_with_ci(m[k], ci.get(k)) for k in QUESTION_FIGURES[:4]]
        cells += [_with_ci(m["selection_accuracy"], ci.get("selection_accuracy"))]
        cells += [_with_ci(m["auto_code_use_rate"], ci.get("auto_code_use_rate")), _pct(m["code_code_use_rate"])]
        if after_text:
            cells.append(_with_ci(m["auto_code_after_text_rate"], ci.get("auto_code_after_text_rate")))
        lines.append(f"| {_label(name, metrics)} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences: EM minus each model, per question and seed", ""]
    lines += ["| EM minus | auto | cot | code | union |", "|---|---|---|---|---|"]
    for name in metrics["test"]:
        keys = [f"em_vs_{name}_{f}_diff" for f in ("auto", "cot", "code", "union")]
        if all(k in metrics for k in keys):
            cells = [_with_ci(metrics[k]["mean"], metrics[k]) for k in keys]
            lines.append(f"| {_label(name, metrics)} | " + " | ".join(cells) + " |")
    mid = [k for k in ("em_mid_vs_em_auto_diff", "em_mid_vs_em_auto_code_after_text_rate_diff") if k in metrics]
    if mid:
        lines += ["", "## EM + mid-reasoning minus EM, per question and seed", ""]
        lines += [
            f"- {k.removeprefix('em_mid_vs_em_').removesuffix('_diff')}: {_with_ci(metrics[k]['mean'], metrics[k])}"
            for k in mid
        ]
    lines += ["", "## Targets", ""]
    for name, t in metrics["targets"].items():
        figures = ", ".join(
            f"{k} {_pct(v) if isinstance(v, float) else v}"
            for k, v in t.items()
            if k not in ("met", "ci95", "significant")
        )
        interval = f"; 95% interval [{_pct(t['ci95'][0])}, {_pct(t['ci95'][1])}]" if t.get("ci95") else ""
        if "significant" in t:
            interval += "; above 0 at 95%" if t["significant"] else "; the interval reaches 0: not significant at 95%"
        lines.append(f"- {name}: {'met' if t['met'] else 'NOT met'} on the mean ({figures}{interval})")
    if metrics.get("cost"):
        lines += ["", f"## Accuracy versus cost (test split, seed {seeds[0]})", ""]
        lines += cost_table(metrics["cost"], "fig_cost_pareto.png")
    lines += ["", "## Code use per query (the paper's Fig. 5): share of queries at 0% or 100%", ""]
    for method, by_phase in metrics["code_rate_extremes"].items():
        shares = ", ".join(f"{phase} {_pct(v)}%" for phase, v in by_phase.items())
        lines.append(f"- {LABELS[method]}: {shares}")
    if len(seeds) > 1:
        lines += ["", "## Per seed", "", "| seed | model | auto | cot | code | union | selection acc. |"]
        lines.append("|---|---|---|---|---|---|---|")
        for row in metrics["per_seed"]:
            for name, m in row["test"].items():
                figures = [m[k] for k in (*QUESTION_FIGURES[:4], "selection_accuracy")]
                lines.append(f"| {row['seed']} | {_label(name, metrics)} | " + " | ".join(map(_pct, figures)) + " |")
    lines += ["", "## Dev accuracy (auto) by iteration, mean over seeds", ""]
    lines += ["| method | iteration | generated tokens | auto |", "|---|---|---|---|"]
    for method, rows in metrics["curves"].items():
        for r in rows:
            auto = _with_ci(r["auto_accuracy"], {"ci95": r.get("auto_accuracy_ci95")})
            lines.append(f"| {LABELS[method]} | {r['iteration']} | {r['tokens']:,.0f} | {auto} |")
    lines += [
        "",
        "![Fig. 4](fig4_accuracy_vs_tokens.png) ![Fig. 5](fig5_code_rate_distribution.png) ![Fig. 6](fig6_modes.png)",
        "",
    ]
    return "\n".join(lines)
