"""Figures over seeds: t quantiles, crossed intervals, paired differences, and demo's aggregation.

Expected values are derived in the comments from the definitions (or from textbook tables), not from the
functions under test.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest

from autocode4math.analysis import crossed_interval, seed_interval, t_quantile
from autocode4math.demo import DemoConfig, aggregate, mean_curve, render_report
from autocode4math.seeds import auto_vs_best_mode, paired_differences, question_figures, summarise


@pytest.mark.parametrize(("df", "table"), [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_t_quantile_matches_the_table(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)
    assert t_quantile(0.025, df) == pytest.approx(-table, abs=1e-3)  # symmetric


def test_t_quantile_limits_and_errors():
    assert t_quantile(0.975, math.inf) == pytest.approx(1.95996, abs=1e-4)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.9602, abs=1e-3)
    assert t_quantile(0.95, 5) == pytest.approx(2.015, abs=1e-3)  # another level: one-sided 95% of df 5
    for p, df in ((0.0, 3), (1.0, 3), (0.5, 0)):
        with pytest.raises(ValueError):
            t_quantile(p, df)


def test_one_seed_gives_the_t_interval_over_questions():
    row = [1, 0, 1, 1, 0, 1, 1, 1]
    r = crossed_interval([row])
    # textbook: mean 6/8, half-width t(0.975, 7) * s / sqrt(8)
    half = t_quantile(0.975, 7) * statistics.stdev(row) / math.sqrt(8)
    assert r["mean"] == 0.75 and r["df"] == 7
    assert r["ci95"] == pytest.approx([0.75 - half, 0.75 + half])


def test_one_question_gives_the_t_interval_over_seeds():
    r = crossed_interval([[0.2], [0.4], [0.9]])
    half = t_quantile(0.975, 2) * statistics.stdev([0.2, 0.4, 0.9]) / math.sqrt(3)
    assert r["mean"] == pytest.approx(0.5) and r["ci95"] == pytest.approx([0.5 - half, 0.5 + half])


def test_additive_matrix_has_seed_and_question_variance():
    # x[s, q] = a_s + b_q with a = (0, 0.2), b = (0, 0.5, 1.0): no interaction, so MS_e = 0.
    # MS_s = Q var(a) = 3 * 0.02 = 0.06; MS_q = S var(b) = 2 * 0.25 = 0.5.
    # Var(mean) = (0.06 + 0.5 - 0) / (2 * 3) = 0.0933..., i.e. var(a)/S + var(b)/Q = 0.01 + 0.0833.
    # Satterthwaite: df = 0.56^2 / (0.06^2 / 1 + 0.5^2 / 2) = 0.3136 / 0.1286 = 2.4386.
    r = crossed_interval([[0.0, 0.5, 1.0], [0.2, 0.7, 1.2]])
    assert r["mean"] == pytest.approx(0.6)
    assert r["se"] == pytest.approx(math.sqrt(0.56 / 6))
    assert r["df"] == pytest.approx(0.3136 / 0.1286)
    half = t_quantile(0.975, 0.3136 / 0.1286) * math.sqrt(0.56 / 6)
    assert r["ci95"] == pytest.approx([0.6 - half, 0.6 + half])


def test_interaction_enters_through_the_residual_mean_square():
    # x = [[1, 0], [0, 1]]: row and column means are all 0.5, so MS_s = MS_q = 0 and everything is
    # interaction: MS_e = 4 * 0.25 / 1 = 1. The estimate (0 + 0 - 1) / 4 < 0 is floored at 0.
    assert crossed_interval([[1, 0], [0, 1]])["se"] == 0.0
    # Add a question effect: x = [[1, 1, 0], [0, 1, 0]]. Means: rows 2/3, 1/3; columns 0.5, 1, 0; all 0.5.
    # MS_s = 3 * 2 * (1/6)^2 / 1 = 1/6; MS_q = 2 * (0 + 0.25 + 0.25) / 2 = 0.5;
    # residuals x - row - col + 0.5 = [[1/3, -1/6, -1/6], [-1/3, 1/6, 1/6]] -> SS_e = 1/3, MS_e = 1/6.
    # Var = (1/6 + 1/2 - 1/6) / 6 = 1/12.
    assert crossed_interval([[1, 1, 0], [0, 1, 0]])["se"] == pytest.approx(math.sqrt(1 / 12))


def test_a_model_repeated_over_seeds_keeps_its_question_interval():
    # The shipped checkpoints are evaluated once and repeated for every seed: no seed variance, and the
    # interval is the one-seed interval over questions (df Q - 1).
    row = [1, 0, 0, 1, 1, 0, 1]
    once, thrice = crossed_interval([row]), crossed_interval([row] * 3)
    assert thrice["mean"] == pytest.approx(once["mean"])
    assert thrice["df"] == pytest.approx(6) and thrice["ci95"] == pytest.approx(once["ci95"])


def test_constant_matrix_and_seed_interval_edges():
    assert crossed_interval([[1, 1], [1, 1]])["ci95"] == [1.0, 1.0]
    assert seed_interval([0.4])["ci95"] is None and seed_interval([0.4])["mean"] == 0.4
    with pytest.raises(ValueError):
        crossed_interval([])


def clip(ci, low):
    """An interval cut to a rate's range [0, 1] (low 0) or a difference's [-1, 1] (low -1)."""
    return [max(low, ci[0]), min(1, ci[1])]


def rec(q, mode, correct, used_code=False):
    return {"id": q, "mode": mode, "correct": correct, "used_code": used_code}


def evaluation(auto, cot, code, code_use=None):
    """Records of one greedy evaluation: per mode, one 0/1 per question q0, q1, ..."""
    code_use = code_use or [0] * len(auto)
    out = [rec(f"q{i}", "auto", bool(a), bool(u)) for i, (a, u) in enumerate(zip(auto, code_use, strict=True))]
    out += [rec(f"q{i}", "cot", bool(c)) for i, c in enumerate(cot)]
    return out + [rec(f"q{i}", "code", bool(c), True) for i, c in enumerate(code)]


def test_question_figures_union_and_code_use():
    t = question_figures(evaluation(auto=[1, 0, 1], cot=[1, 0, 0], code=[0, 0, 1], code_use=[0, 1, 1]))
    assert t["union"] == {"q0": 1.0, "q1": 0.0, "q2": 1.0}  # max(cot, code) per question
    assert t["auto_code_use_rate"] == {"q0": 0.0, "q1": 1.0, "q2": 1.0}
    assert t["cot_accuracy"]["q0"] == 1.0


def test_paired_differences_are_per_question_and_seed():
    em = [evaluation([1, 1, 0], [1, 0, 0], [0, 1, 0]), evaluation([1, 0, 1], [1, 0, 0], [0, 1, 1])]
    rl = [evaluation([0, 1, 0], [1, 0, 0], [0, 0, 0]), evaluation([1, 0, 0], [0, 0, 0], [0, 1, 1])]
    runs = {"em": em, "rl": rl}
    diffs = paired_differences(runs)
    # auto: seed 0 [1-0, 1-1, 0-0] = [1, 0, 0]; seed 1 [0, 0, 1]: mean 2/6
    assert diffs["em_vs_rl_auto_diff"]["mean"] == pytest.approx(1 / 3)
    assert diffs["em_vs_rl_auto_diff"]["ci95"] == pytest.approx(
        clip(crossed_interval([[1, 0, 0], [0, 0, 1]])["ci95"], -1)
    )
    # union: em seed 0 [1, 1, 0], seed 1 [1, 1, 1]; rl seed 0 [1, 0, 0], seed 1 [0, 1, 1] -> [[0, 1, 0], [1, 0, 0]]
    assert diffs["em_vs_rl_union_diff"]["mean"] == pytest.approx(2 / 6)
    assert set(diffs) == {f"em_vs_rl_{f}_diff" for f in ("auto", "cot", "code", "union")}
    assert summarise(runs)["em"]["auto_accuracy"]["mean"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="seeds"):
        paired_differences({"em": em, "rl": rl[:1]})


def test_auto_vs_best_mode_picks_the_better_mode_per_seed():
    # seed 0: cot 2/3 beats code 1/3; seed 1: code 2/3 beats cot 0.
    per_seed = [evaluation([1, 1, 1], [1, 1, 0], [0, 0, 1]), evaluation([1, 0, 0], [0, 0, 0], [1, 1, 0])]
    # differences: seed 0 auto - cot = [0, 0, 1]; seed 1 auto - code = [0, -1, 0]
    r = auto_vs_best_mode(per_seed)
    assert r["mean"] == pytest.approx(0.0)
    assert r["ci95"] == pytest.approx(clip(crossed_interval([[0, 0, 1], [0, -1, 0]])["ci95"], -1))
    assert r["ci95"] == [-1.0, 1.0]  # 3 questions: the t-interval is wider than a difference of rates can be


def test_mean_curve_bands_only_with_several_seeds():
    a = [{"iteration": 0, "tokens": 0, "auto_accuracy": 0.4}, {"iteration": 1, "tokens": 100, "auto_accuracy": 0.5}]
    b = [{"iteration": 0, "tokens": 0, "auto_accuracy": 0.4}, {"iteration": 1, "tokens": 300, "auto_accuracy": 0.7}]
    rows = mean_curve([a, b])
    assert rows[1]["tokens"] == 200 and rows[1]["auto_accuracy"] == pytest.approx(0.6)
    assert rows[1]["auto_accuracy_ci95"] == pytest.approx(seed_interval([0.5, 0.7])["ci95"])
    assert mean_curve([a])[1]["auto_accuracy_ci95"] is None


def _flat(records):
    """The per-seed flat test figures demo keeps (what em.flatten_metrics returns), from hand-built records."""
    t = question_figures(records)
    out = {f: sum(v.values()) / len(v) for f, v in t.items()}
    return {**out, "selection_accuracy": 0.9, "code_code_use_rate": 1.0}


def test_aggregate_writes_seeds_intervals_and_differences(tmp_path):
    evals = {
        ("em", 0): evaluation([1, 1, 0, 1], [1, 0, 0, 0], [0, 1, 0, 1], [0, 1, 1, 1]),
        ("em", 1): evaluation([1, 0, 0, 1], [1, 0, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1]),
        ("sft_rl", 0): evaluation([1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]),
        ("sft_rl", 1): evaluation([0, 1, 0, 1], [1, 1, 0, 0], [0, 1, 0, 1]),
        ("base", None): evaluation([1, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 0]),
    }
    paths = {}
    for (model, seed), records in evals.items():
        paths[model, seed] = tmp_path / f"{model}-{seed}.jsonl"
        paths[model, seed].write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = [{"iteration": 0, "tokens": 0, "auto_accuracy": 0.5}, {"iteration": 1, "tokens": 10, "auto_accuracy": 0.6}]
    studies = []
    for seed in (0, 1):
        models = {"em": paths["em", seed], "sft_rl": paths["sft_rl", seed], "base": paths["base", None]}
        studies.append(
            {
                "seed": seed,
                "curves": {"em": curve, "sft_rl": curve},
                "test": {m: _flat(evals[m, seed if m != "base" else None]) for m in models},
                "samples": models,
                "phases": {"em": {"iteration 1": [0.0, 0.5]}, "sft_rl": {"iteration 1": [1.0, 1.0]}},
            }
        )
    m = aggregate(DemoConfig(seeds=2), studies, 1.0, None)
    assert m["seeds"] == [0, 1] and [row["seed"] for row in m["per_seed"]] == [0, 1]
    # EM minus SFT+RL, auto: seed 0 [0, 1, 0, 1], seed 1 [1, -1, 0, 0]: mean 2/8
    diff = m["em_vs_sft_rl_auto_diff"]
    assert diff["mean"] == pytest.approx(2 / 8)
    assert diff["ci95"] == pytest.approx(clip(crossed_interval([[0, 1, 0, 1], [1, -1, 0, 0]])["ci95"], -1))
    # base is the same every seed: EM minus base, cot: seed 0 [0, 0, 0, -1], seed 1 [0, 0, 0, 0]
    assert m["em_vs_base_cot_diff"]["mean"] == pytest.approx(-1 / 8)
    assert m["test"]["em"]["auto_accuracy"] == pytest.approx(5 / 8)
    em_auto = clip(crossed_interval([[1, 1, 0, 1], [1, 0, 0, 1]])["ci95"], 0)
    assert m["test_ci"]["em"]["auto_accuracy"]["ci95"] == pytest.approx(em_auto)
    assert 0 <= em_auto[0] < 5 / 8 < em_auto[1] <= 1
    assert m["targets"]["em_vs_sft_rl_auto"]["ci95"] == diff["ci95"]
    assert "selection_accuracy" not in m["test_ci"]["base"]  # a shipped model: no seed variation to show
    assert m["code_rate_extremes"] == {"em": {"iteration 1": 0.5}, "sft_rl": {"iteration 1": 1.0}}
    json.dumps(m)  # metrics.json is plain JSON
    report = render_report(m)
    assert "EM minus" in report and "## Per seed" in report
    assert f"{100 * diff['ci95'][0]:.1f}" in report
