"""The paper's measurements over rollout records: accuracy, code use, the union bound, selection accuracy.

All functions take rollout records (dicts with at least `id`, `benchmark`, `mode`, `sample`,
`prefix`, `response`, `correct`, `used_code`, `n_code_calls`, `code_blocks`, `n_generated_tokens`;
`prefix` and `response` also give the code-after-text rate) and are pure.

Definitions (also in docs/rollout.md):
- accuracy: mean of `correct` over all samples. Its 95% interval is a percentile bootstrap over
  *questions* (resampling questions with all their samples, 2000 resamples, fixed seed), because
  the 64 samples of one AIME question are not independent draws.
- per-question solve rate acc_m(q): mean of `correct` over the samples of question q in mode m.
- union bound (the paper's "free lunch"): mean over questions of max(acc_cot(q), acc_code(q)). With
  one sample per question this is the fraction of questions solved by CoT or by code.
- code after text: the share of samples whose first code block follows a line of reasoning text (the
  paper's mid-reasoning code integration), as opposed to code from the start (after the code prefix alone).
- cost per question (one answered sample): mean code calls (executed blocks), mean sandbox seconds
  (the blocks' `duration_s`; None for records written before it was recorded) and mean generated
  tokens (the model's own tokens, tool output excluded).
- Pareto front: a (model, mode) point is on it when no other point is at least as accurate for at
  most the same cost, and strictly better in one of the two.
- selection accuracy of auto mode: a question is *decisive* when acc_code(q) != acc_cot(q); its
  reference choice is code iff acc_code(q) > acc_cot(q). Each auto sample on a decisive question is
  right when its code decision c (`estep.decision_of`: it wrote the code prefix or ran code; the
  definition the E-step and M-step use) equals the reference choice; selection accuracy is the mean over those
  samples. Ties are excluded and counted apart: `both` (tied above 0) and `neither` (both 0). With
  one sample this is exactly "of the questions exactly one of cot/code solves, how often auto
  picked that one". Questions missing from cot, code or auto are left out.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocode4math.estep import decision_of
from autocode4math.health import tool_counts
from autocode4math.prompts import CODE_PREFIX

CI_METHOD = "percentile bootstrap over questions (2000 resamples, seed 0)"


def per_question(records: Iterable[dict[str, Any]], key: str = "correct") -> dict[str, float]:
    """Mean of `key` per question id."""
    sums: dict[str, list[float]] = defaultdict(list)
    for r in records:
        sums[str(r["id"])].append(float(r[key]))
    return {q: sum(v) / len(v) for q, v in sums.items()}


def bootstrap_ci(
    records: Sequence[dict[str, Any]], resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the sample-mean accuracy, resampling questions with replacement.

    Questions are taken in sorted id order, so the interval depends on the records, not on their order
    in a file (a resumed run appends in another order than an uninterrupted one).
    """
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        groups[str(r["id"])].append(float(r["correct"]))
    if not groups:
        return (math.nan, math.nan)
    ids = sorted(groups)
    sums = np.array([sum(groups[q]) for q in ids])
    counts = np.array([len(groups[q]) for q in ids])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with `df` degrees of freedom (df may be fractional; inf gives the normal).

    Bisection on the CDF, whose central part is the density integrated from 0 with Simpson's rule on
    4001 points (the density is smooth at the scale of 1, and the 0.975 quantile is below 13 for df >= 1).
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if math.isinf(df):
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def central(x: float) -> float:  # P(0 <= T <= x)
        t = np.linspace(0.0, x, 4001)
        f = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df))
        return float((f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()) * (t[1] - t[0]) / 3)

    lo, hi = 0.0, 1.0
    while central(hi) < p - 0.5:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < p - 0.5 else (lo, mid)
    return (lo + hi) / 2


def _interval(mean: float, var: float, df: float, level: float) -> dict[str, Any]:
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(var)
    return {"mean": mean, "ci95": [mean - half, mean + half], "se": math.sqrt(var), "df": df}


def seed_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of per-seed values and its t-interval over seeds; `ci95` is None with fewer than two seeds."""
    if not values:
        raise ValueError("seed_interval needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "se": None, "df": None}
    return _interval(mean, statistics.variance(values) / len(values), len(values) - 1, level)


def crossed_interval(values: Any, level: float = 0.95) -> dict[str, Any]:
    """Mean of a seeds x questions matrix and its interval with seeds and questions both random.

    Every seed answers the same questions (the factors are crossed, not nested), so the model is
    x[s, q] = mu + a_s + b_q + e_sq. From the two-way mean squares (rows S, columns Q)
        MS_s = Q var(row means), MS_q = S var(column means), MS_e = residual SS / ((S-1)(Q-1)),
    Var(mean) = sigma_a^2/S + sigma_b^2/Q + sigma_e^2/(SQ) is estimated without bias by
    (MS_s + MS_q - MS_e) / (SQ) (floored at 0), with Satterthwaite's degrees of freedom (at least 1).
    One seed leaves the t-interval over questions, one question the t-interval over seeds;
    `ci95` is None for a single cell.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"crossed_interval needs a non-empty seeds x questions matrix, got shape {x.shape}")
    s, q = x.shape
    mean = float(x.mean())
    if s == 1 or q == 1:
        return seed_interval(x.ravel().tolist(), level)
    rows, cols = x.mean(axis=1), x.mean(axis=0)
    ms_s = q * float(((rows - mean) ** 2).sum()) / (s - 1)
    ms_q = s * float(((cols - mean) ** 2).sum()) / (q - 1)
    ms_e = float(((x - rows[:, None] - cols[None, :] + mean) ** 2).sum()) / ((s - 1) * (q - 1))
    total = ms_s + ms_q - ms_e
    spread = ms_s**2 / (s - 1) + ms_q**2 / (q - 1) + ms_e**2 / ((s - 1) * (q - 1))
    df = max(1.0, total**2 / spread) if spread > 0 and total > 0 else math.inf
    return _interval(mean, max(total, 0.0) / (s * q), df, level)


def code_after_text(record: dict[str, Any], code_prefix: str = CODE_PREFIX) -> bool:
    """True when the trajectory ran code and its first code block comes after a line of reasoning text, i.e.
    something other than the code prefix stands before it in the forced prefix plus the response."""
    if not record["used_code"]:
        return False
    before = (record.get("prefix", "") + record.get("response", "")).split("```python", 1)[0]
    return bool(before.replace(code_prefix, "").strip())


def mode_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (with interval), code-use rate, mean code calls, code error rate, mean tokens, and the
    code calls and gradings by status (see health.tool_counts)."""
    if not records:
        raise ValueError("mode_metrics needs at least one record")
    n = len(records)
    blocks = [b for r in records for b in r["code_blocks"] if b["status"] != "not_run"]
    low, high = bootstrap_ci(records)
    tools = tool_counts(records)
    return {
        "n_samples": n,
        "n_questions": len({str(r["id"]) for r in records}),
        "accuracy": sum(bool(r["correct"]) for r in records) / n,
        "ci_low": low,
        "ci_high": high,
        "code_use_rate": sum(bool(r["used_code"]) for r in records) / n,
        "code_after_text_rate": sum(code_after_text(r) for r in records) / n,
        "mean_code_calls": sum(r["n_code_calls"] for r in records) / n,
        "code_error_rate": (sum(b["status"] != "ok" for b in blocks) / len(blocks)) if blocks else None,
        "n_code_blocks": len(blocks),
        "mean_tokens": sum(r["n_generated_tokens"] for r in records) / n,
        "mean_sandbox_s": mean_sandbox_seconds(records),
        "finish_reasons": {
            k: sum(r["finish_reason"] == k for r in records) for k in ("answer", "length", "round_limit")
        },
        "code_calls": tools["code_calls"],
        "grading": tools["grading"],
    }


def mean_sandbox_seconds(records: Sequence[dict[str, Any]]) -> float | None:
    """Mean over records of the summed `duration_s` of their executed code blocks; None if any lacks it."""
    total = 0.0
    for r in records:
        for b in r["code_blocks"]:
            if b["status"] == "not_run":
                continue
            if b.get("duration_s") is None:
                return None
            total += float(b["duration_s"])
    return total / len(records) if records else None


def union_bound(cot: Sequence[dict[str, Any]], code: Sequence[dict[str, Any]]) -> float | None:
    """Mean over questions in both modes of max(acc_cot, acc_code); None when they share none."""
    a, b = per_question(cot), per_question(code)
    shared = sorted(set(a) & set(b))
    return sum(max(a[q], b[q]) for q in shared) / len(shared) if shared else None


def selection_accuracy(
    auto: Sequence[dict[str, Any]],
    cot: Sequence[dict[str, Any]],
    code: Sequence[dict[str, Any]],
    code_prefix: str = CODE_PREFIX,
) -> dict[str, Any]:
    """Selection accuracy of auto against the cot/code reference (definition in the module docstring)."""
    a, b = per_question(cot), per_question(code)
    auto_by_q: dict[str, list[bool]] = defaultdict(list)
    for r in auto:
        auto_by_q[str(r["id"])].append(bool(decision_of(r, code_prefix)))
    shared = sorted(set(a) & set(b) & set(auto_by_q))
    right = total = both = neither = decisive = 0
    for q in shared:
        if a[q] == b[q]:
            both += a[q] > 0
            neither += a[q] == 0
            continue
        decisive += 1
        want_code = b[q] > a[q]
        right += sum(used == want_code for used in auto_by_q[q])
        total += len(auto_by_q[q])
    return {
        "selection_accuracy": right / total if total else None,
        "n_decisive": decisive,
        "n_both": both,
        "n_neither": neither,
        "n_auto_samples": total,
    }


def benchmark_metrics(records: Sequence[dict[str, Any]], code_prefix: str = CODE_PREFIX) -> dict[str, Any]:
    """Per-mode metrics of one benchmark plus the union bound and selection accuracy when possible."""
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_mode[r["mode"]].append(r)
    out: dict[str, Any] = {"modes": {m: mode_metrics(rs) for m, rs in sorted(by_mode.items())}}
    if "cot" in by_mode and "code" in by_mode:
        out["union"] = union_bound(by_mode["cot"], by_mode["code"])
        if "auto" in by_mode:
            out["selection"] = selection_accuracy(by_mode["auto"], by_mode["cot"], by_mode["code"], code_prefix)
    return out


def all_metrics(records: Iterable[dict[str, Any]], code_prefix: str = CODE_PREFIX) -> dict[str, Any]:
    """{benchmark: benchmark_metrics} over every benchmark present."""
    by_bench: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_bench[str(r["benchmark"])].append(r)
    return {b: benchmark_metrics(rs, code_prefix) for b, rs in sorted(by_bench.items())}


def breakdown(
    records: Sequence[dict[str, Any]], labels: dict[str, Any], code_prefix: str = CODE_PREFIX
) -> dict[str, dict[str, Any]]:
    """Per group (`labels`: question id -> group, e.g. a MATH subject or a toy family): the compact analysis.

    Each group gets n_questions, accuracy and code-use rate per mode, the union bound and selection
    accuracy (when all three modes are present). Records of questions without a label are left out.
    """
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if str(r["id"]) in labels:
            by_group[str(labels[str(r["id"])])].append(r)
    out = {}
    for group, rows in sorted(by_group.items()):
        m = benchmark_metrics(rows, code_prefix)
        row: dict[str, Any] = {"n_questions": len({str(r["id"]) for r in rows})}
        for mode, v in m["modes"].items():
            row[f"{mode}_accuracy"], row[f"{mode}_code_use_rate"] = v["accuracy"], v["code_use_rate"]
            row[f"{mode}_code_after_text_rate"] = v["code_after_text_rate"]
        row["union"] = m.get("union")
        row["selection_accuracy"] = (m.get("selection") or {}).get("selection_accuracy")
        out[group] = row
    return out


def plot_benchmark(name: str, metrics: dict[str, Any], path: str | Path) -> Path:
    """Bar chart: accuracy of auto, cot, code (with 95% intervals) and the union bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, errs = [], [], []
    for mode in ("auto", "cot", "code"):
        m = metrics["modes"].get(mode)
        if m is not None:
            labels.append(mode)
            values.append(100 * m["accuracy"])
            errs.append((100 * (m["accuracy"] - m["ci_low"]), 100 * (m["ci_high"] - m["accuracy"])))
    if metrics.get("union") is not None:
        labels.append("union")
        values.append(100 * metrics["union"])
        errs.append((0.0, 0.0))
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    bars = ax.bar(
        labels,
        values,
        yerr=np.array(errs).T if errs else None,
        capsize=4,
        color=["#4c72b0", "#dd8452", "#55a868", "#8c8c8c"][: len(labels)],
    )
    ax.bar_label(bars, fmt="%.1f", padding=2)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(name)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COST_AXES = {"mean_tokens": "generated tokens per question", "mean_code_calls": "code calls per question"}
"""The cost axes of the Pareto plots: mode_metrics key -> axis label."""


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point is as accurate for no more cost, and better in one."""

    def dominated(c: float, a: float) -> bool:
        return any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points)

    return [not dominated(c, a) for c, a in points]


def cost_points(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy and cost per (model, mode), from each model's `benchmark_metrics` on one benchmark.

    Each row: model, mode, accuracy, ci_low, ci_high, mean_code_calls, mean_sandbox_s, mean_tokens,
    and per cost axis `pareto_<axis>`: whether the row is on the Pareto front of all rows.
    """
    keys = ("accuracy", "ci_low", "ci_high", "mean_code_calls", "mean_sandbox_s", "mean_tokens")
    rows = [
        {"model": model, "mode": mode, **{k: m.get(k) for k in keys}}
        for model, bench in models.items()
        for mode, m in bench["modes"].items()
    ]
    for axis in COST_AXES:
        front = pareto_front([(r[axis], r["accuracy"]) for r in rows])
        for r, on in zip(rows, front, strict=True):
            r[f"pareto_{axis}"] = on
    return rows


def eval_cost_points(runs: dict[str, str | Path], benchmark: str | None = None) -> list[dict[str, Any]]:
    """cost_points of several evaluation output directories (label -> dir with metrics.json) on one benchmark.

    `benchmark` defaults to the first benchmark of the first run.
    """
    import json

    models = {label: json.loads((Path(d) / "metrics.json").read_text(encoding="utf-8")) for label, d in runs.items()}
    if benchmark is None:
        benchmark = next(iter(next(iter(models.values()))["benchmarks"]))
    return cost_points({label: m["benchmarks"][benchmark] for label, m in models.items()})


def cost_table(rows: Sequence[dict[str, Any]], image: str | None = None) -> list[str]:
    """Markdown lines: one row per (model, mode) with accuracy, the three costs and its Pareto fronts; then the plot."""

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = [
        "| model | mode | acc % | code calls / q | sandbox s / q | tokens / q | Pareto front |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fronts = [
            name for axis, name in (("mean_tokens", "tokens"), ("mean_code_calls", "calls")) if r[f"pareto_{axis}"]
        ]
        lines.append(
            f"| {r['model']} | {r['mode']} | {fmt(100 * r['accuracy'], '.1f')} | {fmt(r['mean_code_calls'], '.2f')} | "
            f"{fmt(r['mean_sandbox_s'], '.3f')} | {fmt(r['mean_tokens'], '.0f')} | {', '.join(fronts) or '-'} |"
        )
    return lines + ([f"![accuracy versus cost]({image})"] if image else [])


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Accuracy against each cost axis (one panel each): a point per (model, mode), the Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    markers = {"auto": "o", "cot": "s", "code": "^"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(5 * len(COST_AXES), 3.8))
    for ax, (axis, label) in zip(axes, COST_AXES.items(), strict=True):
        for r in rows:
            color = colors[models.index(r["model"]) % len(colors)]
            ax.scatter(r[axis], 100 * r["accuracy"], marker=markers.get(r["mode"], "D"), color=color, s=40)
        front = sorted((r[axis], 100 * r["accuracy"]) for r in rows if r[f"pareto_{axis}"])
        ax.plot(*zip(*front, strict=True), "--", color="gray", lw=1, label="Pareto front")
        ax.set(xlabel=label, ylabel="accuracy (%)")
    short = [m if len(m) <= 32 else "…" + m[-31:] for m in models]  # model paths can be long
    handles = [
        plt.Line2D([], [], color=colors[i % len(colors)], marker="o", ls="", label=m) for i, m in enumerate(short)
    ]
    handles += [plt.Line2D([], [], color="black", marker=mk, ls="", label=mode) for mode, mk in markers.items()]
    handles.append(plt.Line2D([], [], color="gray", ls="--", label="Pareto front"))
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
