"""The analysis formulas on hand-built records, with expected values derived in comments."""

from __future__ import annotations

import math
import random

import pytest

from autocode4math.analysis import (
    all_metrics,
    bootstrap_ci,
    cost_points,
    cost_table,
    mean_sandbox_seconds,
    mode_metrics,
    pareto_front,
    plot_benchmark,
    plot_pareto,
    selection_accuracy,
    union_bound,
)
from autocode4math.prompts import CODE_PREFIX


def rec(q, mode, correct, used_code=False, sample=0, blocks=(), tokens=10, finish="answer", seconds=None):
    return {
        "id": q,
        "benchmark": "b",
        "mode": mode,
        "sample": sample,
        "correct": correct,
        "used_code": used_code,
        "n_code_calls": sum(s != "not_run" for s in blocks),
        "code_blocks": [{"status": s, **({} if seconds is None else {"duration_s": seconds})} for s in blocks],
        "n_generated_tokens": tokens,
        "finish_reason": finish,
        "prefix": CODE_PREFIX + "\n" if mode == "code" else "",
        "response": "```python\nprint(1)\n```" if used_code else "It is 1.",
    }


def test_mode_metrics_counts_exactly():
    records = [
        rec("q1", "auto", True, True, blocks=("ok", "error"), tokens=10),
        rec("q2", "auto", False, True, blocks=("ok", "not_run"), tokens=20, finish="round_limit"),
        rec("q3", "auto", True, False, tokens=30),
        rec("q4", "auto", False, False, tokens=40, finish="length"),
    ]
    m = mode_metrics(records)
    assert m["accuracy"] == 0.5  # 2 of 4
    assert m["code_use_rate"] == 0.5
    assert m["mean_code_calls"] == 0.75  # (2 + 1 + 0 + 0) / 4: the not_run block is not a call
    assert m["code_error_rate"] == pytest.approx(1 / 3)  # 3 executed blocks, 1 error
    assert m["mean_tokens"] == 25
    assert m["finish_reasons"] == {"answer": 2, "length": 1, "round_limit": 1}
    assert m["ci_low"] <= 0.5 <= m["ci_high"]


def test_code_error_rate_is_none_without_code():
    assert mode_metrics([rec("q", "cot", True)])["code_error_rate"] is None


def test_bootstrap_resamples_questions_not_samples():
    # q1: 4 samples all right, q2: 4 samples all wrong. Any resample of questions has mean 0, 0.5 or 1,
    # so the interval spans [0, 1]; a sample-level bootstrap would give a much narrower interval.
    records = [rec("q1", "cot", True, sample=s) for s in range(4)] + [
        rec("q2", "cot", False, sample=s) for s in range(4)
    ]
    assert bootstrap_ci(records) == (0.0, 1.0)
    # all correct: every resample has mean 1
    assert bootstrap_ci([rec(f"q{i}", "cot", True) for i in range(5)]) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_bootstrap_interval_narrows_with_more_questions():
    small = [rec(f"q{i}", "cot", i % 2 == 0) for i in range(10)]
    large = [rec(f"q{i}", "cot", i % 2 == 0) for i in range(400)]
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert hi_l - lo_l < hi_s - lo_s
    assert lo_l < 0.5 < hi_l


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intervals_do_not_depend_on_record_order(seed):
    # questions with different sample counts and solve rates, so an interval computed over the
    # questions in file order would change when a resumed run appends them in another order
    rng = random.Random(seed)
    records = [
        rec(f"q{i}", mode, rng.random() < (i % 5) / 4, sample=s)
        for i in range(30)
        for mode in ("cot", "code")
        for s in range(1 + i % 3)
    ]
    expected = all_metrics(records)
    for _ in range(3):
        rng.shuffle(records)
        assert all_metrics(records) == expected
        assert bootstrap_ci(records) == bootstrap_ci(sorted(records, key=lambda r: (r["id"], r["mode"])))


def test_union_bound_single_sample():
    # q1: both solve, q2: cot only, q3: code only, q4: neither -> union = 3/4
    cot = [rec("q1", "cot", True), rec("q2", "cot", True), rec("q3", "cot", False), rec("q4", "cot", False)]
    code = [rec("q1", "code", True), rec("q2", "code", False), rec("q3", "code", True), rec("q4", "code", False)]
    assert union_bound(cot, code) == 0.75


def test_union_bound_multi_sample_takes_per_question_max():
    # q1: cot 1/2, code 2/2 -> 1.0 ; q2: cot 1/2, code 0/2 -> 0.5 ; union = 0.75
    cot = [
        rec("q1", "cot", True, sample=0),
        rec("q1", "cot", False, sample=1),
        rec("q2", "cot", True, sample=0),
        rec("q2", "cot", False, sample=1),
    ]
    code = [
        rec("q1", "code", True, sample=0),
        rec("q1", "code", True, sample=1),
        rec("q2", "code", False, sample=0),
        rec("q2", "code", False, sample=1),
    ]
    assert union_bound(cot, code) == 0.75
    assert union_bound(cot, []) is None


def test_selection_accuracy_single_sample():
    cot = [
        rec("q1", "cot", True),
        rec("q2", "cot", False),
        rec("q3", "cot", True),
        rec("q4", "cot", False),
        rec("q5", "cot", True),
    ]
    code = [
        rec("q1", "code", False),
        rec("q2", "code", True),
        rec("q3", "code", True),
        rec("q4", "code", False),
        rec("q5", "code", False),
    ]
    # decisive: q1 (cot), q2 (code), q5 (cot). auto: q1 no code (right), q2 no code (wrong), q5 code (wrong)
    auto = [
        rec("q1", "auto", True, False),
        rec("q2", "auto", False, False),
        rec("q3", "auto", True, True),
        rec("q4", "auto", False, True),
        rec("q5", "auto", False, True),
    ]
    s = selection_accuracy(auto, cot, code)
    assert s["selection_accuracy"] == pytest.approx(1 / 3)
    assert (s["n_decisive"], s["n_both"], s["n_neither"], s["n_auto_samples"]) == (3, 1, 1, 3)


def test_selection_accuracy_multi_sample_counts_every_auto_sample():
    # q1: code 2/2 > cot 0/2 -> reference code; auto samples use code in 3 of 4 -> 3/4 right
    cot = [rec("q1", "cot", False, sample=s) for s in range(2)]
    code = [rec("q1", "code", True, sample=s) for s in range(2)]
    auto = [rec("q1", "auto", True, used_code=s != 0, sample=s) for s in range(4)]
    assert selection_accuracy(auto, cot, code)["selection_accuracy"] == 0.75


def test_selection_accuracy_none_without_decisive_questions():
    cot, code = [rec("q1", "cot", True)], [rec("q1", "code", True)]
    assert selection_accuracy([rec("q1", "auto", True)], cot, code)["selection_accuracy"] is None


def test_all_metrics_and_plot(tmp_path):
    records = [rec("q1", m, m != "cot", used_code=m != "cot") for m in ("auto", "cot", "code")]
    records += [dict(r, benchmark="other") for r in records if r["mode"] == "auto"]
    metrics = all_metrics(records)
    assert set(metrics) == {"b", "other"}
    assert metrics["b"]["union"] == 1.0
    assert metrics["b"]["selection"]["selection_accuracy"] == 1.0
    assert "union" not in metrics["other"]
    png = plot_benchmark("b", metrics["b"], tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mode_metrics_rejects_empty():
    with pytest.raises(ValueError, match="at least one record"):
        mode_metrics([])


def test_sandbox_seconds_sum_executed_blocks_per_sample():
    records = [
        rec("q1", "code", True, True, blocks=("ok", "error"), seconds=0.25),  # 0.5 s: two executed blocks
        rec("q2", "code", True, True, blocks=("ok", "not_run"), seconds=0.25),  # 0.25 s: not_run does not count
        rec("q3", "code", False),  # no code: 0 s
    ]
    assert mean_sandbox_seconds(records) == pytest.approx(0.75 / 3)
    assert mode_metrics(records)["mean_sandbox_s"] == pytest.approx(0.25)
    # a record written before duration_s existed makes the figure unknown, not zero
    assert mean_sandbox_seconds([*records, rec("q4", "code", True, True, blocks=("ok",))]) is None
    assert mean_sandbox_seconds([rec("q", "cot", True)]) == 0.0


@pytest.mark.parametrize(
    "points, front",
    [
        # (cost, accuracy): b is cheaper and as accurate as a; c is dearer but more accurate; d is beaten by c
        ([(10, 0.5), (5, 0.5), (20, 0.9), (30, 0.8)], [False, True, True, False]),
        ([(1, 0.1)], [True]),
        ([(3, 0.5), (3, 0.5)], [True, True]),  # equal points do not dominate each other
        ([(0, 0.0), (0, 0.2), (1, 0.2)], [False, True, False]),
    ],
)
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def test_cost_points_across_models_and_modes(tmp_path):
    model_a = all_metrics(
        [rec("q1", "cot", True, tokens=100), rec("q2", "cot", False, tokens=100)]
        + [rec(q, "code", True, True, blocks=("ok",), tokens=40, seconds=0.1) for q in ("q1", "q2")]
    )["b"]
    model_b = all_metrics([rec(q, "cot", q == "q1", tokens=20) for q in ("q1", "q2")])["b"]
    rows = cost_points({"A": model_a, "B": model_b})
    by = {(r["model"], r["mode"]): r for r in rows}
    assert by[("A", "code")]["mean_sandbox_s"] == pytest.approx(0.1)
    assert by[("A", "code")]["mean_code_calls"] == 1.0 and by[("A", "cot")]["mean_tokens"] == 100
    # tokens: A/code (40, 100%) beats A/cot (100, 50%); B/cot (20, 50%) is the cheapest -> front {A/code, B/cot}
    assert {k for k, r in by.items() if r["pareto_mean_tokens"]} == {("A", "code"), ("B", "cot")}
    # calls: both cot rows cost 0 calls at 50%, A/code buys 100% with one call -> all three on the front
    assert all(r["pareto_mean_code_calls"] for r in rows)
    table = cost_table(rows, "cost.png")
    assert "| A | code | 100.0 | 1.00 | 0.100 | 40 | tokens, calls |" in table
    assert table[-1] == "![accuracy versus cost](cost.png)"
    png = plot_pareto(rows, tmp_path / "p" / "cost.png", "b")
    assert png.read_bytes()[:4] == b"\x89PNG"
