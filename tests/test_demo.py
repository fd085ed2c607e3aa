"""`autocode demo` end to end at a tiny size, from the shipped toy checkpoints."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from autocode4math.cli import app
from autocode4math.demo import DemoConfig, code_rate_phases, run_demo, targets, train_config


@pytest.mark.slow
def test_demo_writes_report_metrics_and_figures_and_resumes(tmp_path):
    cfg = DemoConfig(
        out=str(tmp_path / "demo"), iterations=1, queries=2, k=2, per_query=2, dev=2, test=3, max_new_tokens=48
    )
    metrics = run_demo(cfg, progress=False)
    out = tmp_path / "demo"
    assert metrics["seeds"] == [0] and (out / "seed-0" / "em" / "state.json").exists()
    assert (out / "test" / "base" / "samples.jsonl").exists()  # the shipped checkpoints: once, not per seed
    assert set(metrics["em_vs_sft_rl_auto_diff"]) >= {"mean", "ci95"}
    assert metrics["test_ci"]["em"]["auto_accuracy"]["mean"] == metrics["test"]["em"]["auto_accuracy"]
    for name in ("report.md", "metrics.json", "fig4_accuracy_vs_tokens.png", "fig5_code_rate_distribution.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "fig6_modes.png").stat().st_size > 0
    assert (out / "fig_cost_pareto.png").read_bytes()[:4] == b"\x89PNG"
    # accuracy versus cost: every model (EM and the baselines) in every mode, the front on both axes
    assert {(r["model"], r["mode"]) for r in metrics["cost"]} == {
        (label, mode)
        for label in ("EM (ours)", "Base+RL", "SFT+RL", "SFT", "toy-base")
        for mode in ("auto", "cot", "code")
    }
    assert any(r["pareto_mean_tokens"] for r in metrics["cost"]) and any(
        r["pareto_mean_code_calls"] for r in metrics["cost"]
    )
    assert "## Accuracy versus cost (test split, seed 0)" in (out / "report.md").read_text()
    assert set(metrics["test"]) == {"em", "base_rl", "sft_rl", "sft", "base"}
    for curve in metrics["curves"].values():
        assert [r["iteration"] for r in curve] == [0, 1]
        assert curve[1]["tokens"] > 0
    assert {"em_auto_vs_best_mode", "selection_accuracy", "code_rate_reduction"} <= set(metrics["targets"])
    assert "## Targets" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    again = run_demo(cfg, progress=False)  # everything is on disk: nothing is generated or trained again
    assert again["test"] == metrics["test"] and again["curves"] == metrics["curves"]


def test_targets_compare_the_measured_numbers():
    em = {
        "auto_accuracy": 0.80,
        "cot_accuracy": 0.60,
        "code_accuracy": 0.70,
        "selection_accuracy": 0.9,
        "auto_code_use_rate": 0.4,
        "code_code_use_rate": 1.0,
    }
    t = targets({"em": em, "sft_rl": {"auto_accuracy": 0.81}})
    assert t["em_auto_vs_best_mode"]["met"]  # 0.80 >= 0.70 + 0.05
    assert t["selection_accuracy"]["met"]
    assert t["code_rate_reduction"]["met"]  # 0.4 <= 0.7 * 1.0 and auto 0.80 >= code 0.70
    assert not t["em_vs_sft_rl_auto"]["met"]  # 0.80 < 0.81
    assert not targets({"em": {**em, "auto_accuracy": 0.74}})["em_auto_vs_best_mode"]["met"]
    assert "significant" not in t["em_vs_sft_rl_auto"]  # no interval, no verdict on significance
    diffs = {"em_vs_sft_rl_auto_diff": {"ci95": [-0.01, 0.1]}, "em_auto_vs_best_mode_diff": {"ci95": [0.02, 0.2]}}
    with_ci = targets({"em": em, "sft_rl": {"auto_accuracy": 0.75}}, diffs=diffs)
    assert with_ci["em_vs_sft_rl_auto"]["met"] and not with_ci["em_vs_sft_rl_auto"]["significant"]
    assert with_ci["em_auto_vs_best_mode"]["significant"] and "significant" not in with_ci["code_rate_reduction"]


def test_code_rate_phases_reads_unprompted_rollouts(tmp_path):
    for it, used in ((1, [False, False]), (2, [True, False]), (3, [True, True])):
        d = tmp_path / f"iter-{it:02d}" / "collect"
        d.mkdir(parents=True)
        rows = [{"mode": "auto", "prefix": "", "id": "q", "used_code": u} for u in used]
        rows.append({"mode": "code", "prefix": "Let's", "id": "q", "used_code": True})  # forced: not counted
        (d / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert code_rate_phases(tmp_path) == {"iteration 1": [0.0], "iteration 2": [0.5], "iteration 3": [1.0]}
    trained = tmp_path / "samples.jsonl"
    trained.write_text(
        "".join(json.dumps({"mode": "auto", "prefix": "", "id": q, "used_code": q == "a"}) + "\n" for q in "ab")
    )
    assert code_rate_phases(tmp_path, trained)["trained (test)"] == [1.0, 0.0]


def _passes(mstep, n: int) -> int:
    """Trajectory passes of an M-step over `n` training records, counted from mstep's own step plan."""
    from autocode4math.mstep import Sample, step_plan

    samples = [Sample(ids=[1] * (2 + i % 5), start=1, mask=[1] * (1 + i % 5), advantage=0.0, c=0, decision=[],
                      n_decision=0, correct=False, used_code=False, key=str(i)) for i in range(n)]  # fmt: skip
    total, batches_for = step_plan(samples, mstep, 1, 0)
    return sum(len(batch) for step in range(total) for batch in batches_for(step))


@pytest.mark.parametrize("queries, micro_batch_size", [(5, 16), (13, 3), (7, 4)])
def test_every_method_makes_the_same_number_of_trajectory_passes_at_every_size(queries, micro_batch_size):
    """EM trains on queries x per_query records, RL on queries x 2k; both make exactly EM's passes."""
    for k in range(1, 9):
        for per_query in range(1, 2 * k + 1):
            for epochs in (1, 2, 3):
                cfg = DemoConfig(queries=queries, k=k, per_query=per_query, epochs=epochs,
                                 micro_batch_size=micro_batch_size)  # fmt: skip
                em, rl = train_config(cfg, "em"), train_config(cfg, "base_rl")
                em_passes = _passes(em.mstep, queries * per_query)
                rl_passes = _passes(rl.mstep, queries * rl.rl_samples)
                assert em_passes == epochs * queries * per_query  # no micro-batch left out
                assert rl_passes == em_passes, (k, per_query, epochs, em_passes, rl_passes)


def test_full_demo_gives_the_baselines_em_s_passes_not_twice_them():
    cfg = DemoConfig.full()  # k=8, per_query=4, epochs=2: 8 passes per query, RL has 16 rollouts per query
    rl = train_config(cfg, "base_rl")
    assert rl.rl_samples == 16 and train_config(cfg, "sft_rl").model == "toy-sft"
    assert rl.mstep.epochs == 0.5 and _passes(rl.mstep, cfg.queries * 16) == 8 * cfg.queries


@pytest.mark.parametrize(
    "args",
    [
        ["--seeds", "0"],
        ["--set", "em.mstep.no_such_field=1"],
        ["--set", "source=toy-geometry"],
        ["--set", "methods=[em,magic]"],
    ],
)
def test_cli_rejects_bad_demo_settings_before_running(tmp_path, args):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), *args])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "d").exists()


def test_several_seeds_test_on_the_whole_split_unless_told():
    from autocode4math.cli import demo_config

    assert demo_config(False, "", 1, []).test == 200
    assert demo_config(False, "", 5, []).test == 600 and demo_config(False, "", 5, []).seeds == 5
    assert demo_config(False, "", 5, ["test=100"]).test == 100


def test_em_overrides_and_the_mid_study_configs():
    cfg = DemoConfig(em={"mstep": {"kl_coef": 0.05}}, source="toy-mid", base_model="toy-mid-base")
    em, mid, rl = train_config(cfg, "em"), train_config(cfg, "em_mid"), train_config(cfg, "base_rl")
    assert em.mstep.kl_coef == mid.mstep.kl_coef == 0.05 and rl.mstep.kl_coef == 0.0
    assert mid.estep.mid_reasoning and not em.estep.mid_reasoning
    assert em.model == rl.model == "toy-mid-base" and em.queries == "toy-mid" and em.eval.source == "toy-mid:dev"
    assert em.out.endswith("em") and mid.out.endswith("em_mid")


def test_the_cot_anchor_reaches_em_and_not_the_rl_baselines():
    from autocode4math.em import _mstep_config

    for weight in (1.0, 0.0, 2.5):
        cfg = DemoConfig(cot_anchor_weight=weight, em={"mstep": {"kl_coef": 0.05}})
        em, rl = train_config(cfg, "em"), train_config(cfg, "base_rl")
        assert _mstep_config(em, 1).cot_anchor_weight == weight and em.mstep.kl_coef == 0.05
        assert _mstep_config(rl, 1).cot_anchor_weight == 0.0
    assert DemoConfig().cot_anchor_weight == 1.0  # the demo's default, unlike the library's (0)
    assert train_config(DemoConfig(), "base_rl").mstep.cot_anchor_weight == 0.0  # not even in the RL fingerprint
    assert DemoConfig.full().epochs == 2 and DemoConfig().epochs == 1


def test_seeds_share_a_demo_directory_but_other_settings_do_not():
    """Seeds run as separate processes into one --out (each seed's runs record their own fingerprint)."""
    from autocode4math.demo import NOT_IN_FINGERPRINT
    from autocode4math.fingerprint import differences, settings_of

    def fingerprint(**changes):
        return settings_of(DemoConfig(test=600, **changes), leave_out=NOT_IN_FINGERPRINT)

    assert fingerprint(seed=0) == fingerprint(seed=3, seeds=2) == fingerprint(seed=1, batch_size=8)
    assert differences(fingerprint(), settings_of(DemoConfig(test=200), leave_out=NOT_IN_FINGERPRINT)) == [
        "test: 600 -> 200"
    ]
    assert fingerprint() != fingerprint(em={"mstep": {"cot_anchor_weight": 2.0}})


def test_only_em_trains_the_forced_mode_terms():
    from autocode4math.em import TrainConfig, _mstep_config
    from autocode4math.mstep import MStepConfig

    terms = MStepConfig(cot_anchor_weight=1.5, cot_replay_weight=0.5, decision_weight=1.0)
    em, rl, sft = (_mstep_config(TrainConfig(method=m, mstep=terms), 1) for m in ("em", "rl", "sft"))
    assert (em.cot_anchor_weight, em.cot_replay_weight) == (1.5, 0.5)
    assert (rl.cot_anchor_weight, rl.cot_replay_weight, rl.decision_weight) == (0.0, 0.0, 0.0)
    assert (sft.cot_anchor_weight, sft.cot_replay_weight, sft.objective) == (0.0, 0.0, "sft")
