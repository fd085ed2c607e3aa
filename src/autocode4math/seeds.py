"""Figures over training seeds: per-question tables, means with intervals, paired differences.

A study run with several seeds evaluates every trained model on the same test questions, so its results
form a seeds x questions matrix per model and figure (1 or 0 per cell for greedy accuracy). A figure's
mean is the matrix mean; its interval treats seeds and questions as crossed random factors
(`analysis.crossed_interval`): it covers both a new training run and a new draw of test questions from
the same world. A paired difference (EM minus a baseline) is the same on the matrix of per-cell
differences, seed s of EM paired with seed s of the baseline (independent runs, so any pairing of seeds
is valid) and question q with question q. Models that do not depend on the seed (the shipped
checkpoints, evaluated greedily) contribute the same row for every seed.

Figures that are not means over questions (selection accuracy, whose decisive questions differ per
seed; dev-curve points) get a t-interval over the per-seed values (`analysis.seed_interval`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from autocode4math.analysis import code_after_text, crossed_interval, per_question

QUESTION_FIGURES = (
    "auto_accuracy",
    "cot_accuracy",
    "code_accuracy",
    "union",
    "auto_code_use_rate",
    "auto_code_after_text_rate",
)
"""Figures that are means over test questions, so they get the crossed interval."""
INTERVAL_METHOD = (
    "mean over seeds and test questions; 95% interval with seeds and questions as crossed random factors "
    "(two-way mean squares, Satterthwaite degrees of freedom), cut to the figure's range; selection "
    "accuracy and dev curves: t-interval over the per-seed values"
)


def question_figures(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{figure: {question id: value}} for the figures in QUESTION_FIGURES that the records allow."""
    by_mode = {m: [r for r in records if r["mode"] == m] for m in ("auto", "cot", "code")}
    out = {f"{m}_accuracy": per_question(rs) for m, rs in by_mode.items() if rs}
    if by_mode["auto"]:
        out["auto_code_use_rate"] = per_question(by_mode["auto"], "used_code")
        after = [{"id": r["id"], "after": code_after_text(r)} for r in by_mode["auto"]]
        out["auto_code_after_text_rate"] = per_question(after, "after")
    if by_mode["cot"] and by_mode["code"]:
        cot, code = out["cot_accuracy"], out["code_accuracy"]
        out["union"] = {q: max(cot[q], code[q]) for q in cot.keys() & code.keys()}
    return out


def figure_matrix(tables: Sequence[dict[str, float]], ids: Sequence[str] | None = None) -> np.ndarray:
    """Seeds x questions matrix over `ids` (default: the question ids every table has, sorted)."""
    ids = _shared_ids(tables) if ids is None else ids
    return np.array([[t[q] for q in ids] for t in tables], dtype=float)


def _shared_ids(tables: Sequence[dict[str, float]]) -> list[str]:
    shared = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    if not shared:
        raise ValueError("no question is shared by every seed's evaluation")
    return shared


def summarise(runs: dict[str, Sequence[Sequence[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {figure: crossed interval}}; `runs[model]` holds one list of evaluation records per seed."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, per_seed in runs.items():
        tables = [question_figures(records) for records in per_seed]
        figures = [f for f in QUESTION_FIGURES if all(f in t for t in tables)]
        out[model] = {f: _clipped(crossed_interval(figure_matrix([t[f] for t in tables])), 0.0) for f in figures}
    return out


def _clipped(interval: dict[str, Any], low: float) -> dict[str, Any]:
    """The interval cut to the figure's range: [0, 1] for a rate, [-1, 1] for a difference of rates."""
    if interval["ci95"] is not None:
        interval["ci95"] = [max(low, interval["ci95"][0]), min(1.0, interval["ci95"][1])]
    return interval


def paired_differences(
    runs: dict[str, Sequence[Sequence[dict[str, Any]]]],
    reference: str = "em",
    figures: Sequence[str] = ("auto_accuracy", "cot_accuracy", "code_accuracy", "union"),
) -> dict[str, dict[str, Any]]:
    """`{reference}_vs_{model}_{figure}_diff` (figure without `_accuracy`: auto, cot, code, union) for every
    other model: the crossed interval of reference minus model, per seed and question. Both need the same
    number of seeds."""
    if reference not in runs:
        return {}
    ref = [question_figures(records) for records in runs[reference]]
    out = {}
    for model, per_seed in runs.items():
        if model == reference:
            continue
        if len(per_seed) != len(ref):
            raise ValueError(f"{model} has {len(per_seed)} seeds, {reference} has {len(ref)}")
        other = [question_figures(records) for records in per_seed]
        for figure in figures:
            if all(figure in t for t in ref + other):
                diff = _difference([t[figure] for t in ref], [t[figure] for t in other])
                out[f"{reference}_vs_{model}_{figure.removesuffix('_accuracy')}_diff"] = _clipped(
                    crossed_interval(diff), -1.0
                )
    return out


def auto_vs_best_mode(per_seed: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """Crossed interval of auto minus the better forced mode, the better mode chosen per seed (by accuracy)."""
    tables = [question_figures(records) for records in per_seed]
    best = [
        max(t["cot_accuracy"], t["code_accuracy"], key=lambda table: sum(table.values()) / len(table)) for t in tables
    ]
    return _clipped(crossed_interval(_difference([t["auto_accuracy"] for t in tables], best)), -1.0)


def _difference(a: Sequence[dict[str, float]], b: Sequence[dict[str, float]]) -> np.ndarray:
    """Seeds x questions matrix of a - b over the question ids both have in every seed."""
    ids = _shared_ids([*a, *b])
    return figure_matrix(a, ids) - figure_matrix(b, ids)
