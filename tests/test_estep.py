"""E-step: Q, pi, s*, advantages and subsampling on hand-built records; the driver through the scripted model."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from dataclasses import dataclass

import pytest
import torch

from autocode4math.benchmarks import Problem
from autocode4math.estep import (
    MID_OFFSET,
    EStepConfig,
    add_decision_tokens,
    advantages,
    code_prior,
    cut_point,
    decision_of,
    mid_requests,
    q_values,
    quotas,
    reference_strategy,
    run_estep,
    subsample,
)
from autocode4math.io import read_jsonl
from autocode4math.prompts import CODE_PREFIX
from autocode4math.rollout.engine import encode

CP = CODE_PREFIX + "\n"


def rec(qid, mode, sample, correct, used_code=False, prefix=None, response="We add.\nSo \\boxed{1}."):
    prefix = CP if prefix is None and mode == "code" else (prefix or "")
    return {
        "id": qid,
        "benchmark": "toy",
        "mode": mode,
        "sample": sample,
        "prefix": prefix,
        "response": response,
        "used_code": used_code,
        "correct": correct,
        "finish_reason": "answer",
        "prompt_ids": [1, 2],
        "n_generated_tokens": 3,
    }


def query(qid, plain, coded, plain_code=()):
    """plain: correctness of auto rollouts without code; coded: of code-prefix rollouts; plain_code: auto with code."""
    rows = [rec(qid, "auto", i, ok) for i, ok in enumerate(plain)]
    rows += [rec(qid, "auto", len(plain) + i, ok, used_code=True) for i, ok in enumerate(plain_code)]
    rows += [rec(qid, "code", i, ok, used_code=True) for i, ok in enumerate(coded)]
    return rows


def test_decision_is_prefix_or_executed_code():
    assert decision_of(rec("q", "auto", 0, True), CODE_PREFIX) == 0
    assert decision_of(rec("q", "auto", 0, True, used_code=True), CODE_PREFIX) == 1
    assert decision_of(rec("q", "code", 0, True, used_code=False), CODE_PREFIX) == 1  # prefix forced, no code run
    assert decision_of(rec("q", "code", 0, True, prefix="First.\n" + CP), CODE_PREFIX) == 1  # mid-reasoning


@pytest.mark.parametrize(
    "record, c, decision_term",
    [
        (rec("q", "auto", 0, True), 0, "pushes the prefix down"),  # plain text, no code
        (rec("q", "auto", 0, True, used_code=True, response="```python\nprint(1)\n```"), 1, "none"),  # unprompted
        (rec("q", "code", 0, True, used_code=True), 1, "pulls the prefix up"),  # forced prefix, code ran
        (rec("q", "code", 0, True), 1, "pulls the prefix up"),  # forced prefix, the model declined code
        (rec("q", "auto", 0, True, response=CP + "Easy: \\boxed{1}."), 1, "none"),  # wrote the prefix, ran no code
        (rec("q", "auto", 0, True, response="  " + CP + "```python\n1\n```"), 1, "none"),  # wrote it, ran code
        (rec("q", "code", 0, True, prefix="We add.\n" + CP), 1, "pulls the prefix up"),  # mid-reasoning, forced
        (rec("q", "auto", 0, True, response="We add.\n" + CP), 0, "pushes the prefix down"),  # prefix not at the start
    ],
)
def test_one_code_decision_for_e_step_m_step_and_analysis(record, c, decision_term, tiny_tokenizer):
    """decision_of decides c; the decision term never pushes down a prefix the trajectory itself holds."""
    assert decision_of(record, CODE_PREFIX) == c
    row = {**record, "c": c}
    add_decision_tokens(row, tiny_tokenizer, CP, CODE_PREFIX)
    has_term = bool(row["decision_ids"])
    assert {"none": not has_term, "pulls the prefix up": has_term and c == 1,
            "pushes the prefix down": has_term and c == 0}[decision_term]  # fmt: skip
    wrote_prefix = (row["prefix"] + row["response"]).lstrip().startswith(CODE_PREFIX)
    assert not (has_term and c == 0 and wrote_prefix)


def test_the_e_step_and_the_analysis_count_a_written_prefix_as_c1():
    from autocode4math.analysis import selection_accuracy

    written = rec("a", "auto", 9, True, response=CP + "It is \\boxed{1}.")
    rows = query("a", [1, 0], [1, 1]) + [written]
    assert q_values(rows, CODE_PREFIX)["a"] == {0: 0.5, 1: 1.0}  # 1 of 2 plain; 2 forced + the written one
    assert code_prior(rows, 0.0) == {"a": pytest.approx(1 / 3)}  # 1 of the 3 unforced auto rollouts chose code
    cot, code = [rec("a", "cot", 0, False)], [rec("a", "code", 0, True)]  # code is the better mode for "a"
    assert selection_accuracy([written], cot, code)["selection_accuracy"] == 1.0
    assert selection_accuracy([rec("a", "auto", 0, True)], cot, code)["selection_accuracy"] == 0.0


def test_q_values_hand_counts():
    # c=0: plain rollouts 1,0,0,1 -> 2/4; c=1: prefix rollouts 1,1,1,0 plus one unprompted code user (1) -> 4/5.
    rows = query("a", [1, 0, 0, 1], [1, 1, 1, 0], plain_code=[1]) + query("b", [0, 0], [])
    q = q_values(rows, CODE_PREFIX)
    assert q["a"] == {0: 0.5, 1: 0.8}
    assert q["b"] == {0: 0.0, 1: None}  # no rollout took c=1


def test_code_prior_smoothing():
    # 5 auto rollouts without prefix, 1 used code: Laplace (1 + 1) / (5 + 2) = 2/7; no smoothing 1/5.
    rows = query("a", [1, 0, 0, 1], [1, 1, 1, 1], plain_code=[1])
    assert code_prior(rows, 1.0) == {"a": pytest.approx(2 / 7)}
    assert code_prior(rows, 0.0) == {"a": pytest.approx(1 / 5)}
    # 0 of 2: smoothed to 1/4 rather than a certain "never", so c=1 keeps a nonzero energy.
    assert code_prior(query("b", [1, 1], [1]), 1.0) == {"b": pytest.approx(1 / 4)}


def test_reference_strategy_hand_values():
    # pi(1) = 0.25, Q = (0.5, 1.0), alpha = 2: energies 2*0.75*0.5 = 0.75 and 2*0.25*1 = 0.5,
    # so s*(0) = e^0.75 / (e^0.75 + e^0.5) = 1 / (1 + e^-0.25) = 0.5622.
    s = reference_strategy(0.25, {0: 0.5, 1: 1.0}, 2.0)
    assert s[0] == pytest.approx(1 / (1 + math.exp(-0.25)))
    assert s[0] + s[1] == pytest.approx(1.0)
    assert reference_strategy(0.9, {0: 0.1, 1: 0.7}, 0.0) == {0: 0.5, 1: 0.5}  # alpha 0: uniform
    assert reference_strategy(0.5, {0: 0.3, 1: None}, 5.0) == {0: 1.0, 1: 0.0}  # c=1 has no rollouts
    with pytest.raises(ValueError, match="pi"):
        reference_strategy(1.5, {0: 0.5, 1: 0.5}, 1.0)


def test_advantages_are_normalised_per_query():
    # query a: rewards 1,0,0,1 -> mean 0.5, std 0.5 -> +1,-1,-1,+1; query b all correct -> std 0 -> 0.
    rows = query("a", [1, 0, 0, 1], []) + query("b", [1, 1], [])
    adv = advantages(rows, eps=1e-12)
    assert adv[:4] == pytest.approx([1, -1, -1, 1])
    assert adv[4:] == [0.0, 0.0]


def mid(qid, partial, plain, coded):
    """Continuations of `partial`: plain (auto, the partial forced) and with the code prefix after it."""
    rows = [{**rec(qid, "auto", 100 + i, ok, prefix=partial), "partial": partial} for i, ok in enumerate(plain)]
    rows += [
        {**rec(qid, "code", 100 + i, ok, used_code=True, prefix=partial + CP), "partial": partial}
        for i, ok in enumerate(coded)
    ]
    return rows


def test_mid_reasoning_states_are_valued_apart_from_their_query():
    # query a from the start: plain 1, 0, 0, 0, prefixed 0, 0 -> Q = (0.25, 0.0).
    # from partial "p\n": plain 0, 0, prefixed 1, 1 -> Q = (0, 1). Pooled per query it would be (0.17, 0.5).
    rows = query("a", [1, 0, 0, 0], [0, 0]) + mid("a", "p\n", [0, 0], [1, 1])
    q = q_values(rows, CODE_PREFIX)
    assert q["a"] == {0: 0.25, 1: 0.0} and q["a|p\n"] == {0: 0.0, 1: 1.0}
    # pi of the partial state from its own plain continuations: 0 of 2 used code -> (0 + 1) / (2 + 2)
    assert code_prior(rows, 1.0) == {"a": pytest.approx(1 / 6), "a|p\n": pytest.approx(1 / 4)}
    # advantages within each state: the start state 1,0,0,0,0,0 (mean 1/6); the partial 0,0,1,1 -> -1,-1,+1,+1
    assert advantages(rows, eps=1e-12)[6:] == pytest.approx([-1, -1, 1, 1])
    train, audit = subsample(rows, EStepConfig(alpha=4.0, per_query=2, mid_per_state=1))
    assert [(a["id"], a["partial"], len(a["chosen"])) for a in audit] == [("a", "", 2), ("a", "p\n", 1)]
    assert len(train) == 3


def test_quotas_spread_size_evenly():
    assert quotas(["a", "b", "c"], 4, 0, seed=0) == {"a": 4, "b": 4, "c": 4}
    q = quotas(["a", "b", "c"], 4, 7, seed=0)
    assert sum(q.values()) == 7 and sorted(q.values()) == [2, 2, 3]


def test_subsample_follows_the_reference_strategy():
    # pi from 4 plain rollouts (none with code): (0 + 1) / (4 + 2) = 1/6; Q = (0.25, 1.0); alpha = 6:
    # energies 6*(5/6)*0.25 = 1.25 and 6*(1/6)*1 = 1.0 -> s*(1) = 1 / (1 + e^0.25) = 0.4378.
    rows = query("a", [1, 0, 0, 0], [1, 1, 1, 1])
    expected = 1 / (1 + math.exp(0.25))
    draws = [subsample(rows, EStepConfig(alpha=6.0, per_query=1, seed=s))[0][0]["c"] for s in range(3000)]
    assert sum(draws) / len(draws) == pytest.approx(expected, abs=0.03)


def test_subsample_records_and_audit():
    rows = query("a", [1, 0, 0, 0], [1, 1, 0, 1]) + query("b", [1, 1], [0, 0])
    config = EStepConfig(alpha=1.0, per_query=3, seed=3)
    train, audit = subsample(rows, config)
    assert train == subsample(rows, config)[0]  # seeded
    assert [a["id"] for a in audit] == ["a", "b"]
    a = audit[0]
    assert a["Q"] == {"0": 0.25, "1": 0.75} and a["n"] == {"0": 4, "1": 4}
    assert a["pi_code"] == pytest.approx(1 / 6) and sum(a["s_star"].values()) == pytest.approx(1.0)
    assert len(a["chosen"]) == 3 and len(set(a["chosen"])) == 3  # without replacement
    assert [t["key"] for t in train if t["id"] == "a"] == a["chosen"]
    for t in train:
        assert t["c"] == decision_of(t, CODE_PREFIX) and "advantage" in t
    assert len(audit[1]["chosen"]) == 3 and audit[1]["Q"] == {"0": 1.0, "1": 0.0}


def test_skip_unsolved_draws_nothing_from_a_state_no_rollout_solved():
    # "b" failed on every rollout of both decisions; "a" and "c" were solved at least once.
    rows = query("a", [1, 0], [0, 0]) + query("b", [0, 0], [0, 0]) + query("c", [0, 0], [0, 1])
    kept = subsample(rows, EStepConfig(per_query=2, seed=0))[0]
    assert {t["id"] for t in kept} == {"a", "b", "c"}  # the paper's Eq. 5 draws from every state
    train, audit = subsample(rows, EStepConfig(per_query=2, seed=0, skip_unsolved=True))
    assert {t["id"] for t in train} == {"a", "c"} and len(train) == 4
    assert [len(a["chosen"]) for a in audit] == [2, 0, 2]
    # a mid-reasoning state is a state of its own: an unsolved partial solution of a solved query is skipped
    mid = [{**r, "sample": MID_OFFSET + r["sample"], "partial": "We add.\n"} for r in query("a", [0], [0])]
    train, _ = subsample(rows + mid, EStepConfig(per_query=2, mid_per_state=2, seed=0, skip_unsolved=True))
    assert not [t for t in train if t.get("partial")]
    train, _ = subsample(rows + mid, EStepConfig(per_query=2, mid_per_state=2, seed=0))
    assert len([t for t in train if t.get("partial")]) == 2


def test_skip_failed_decisions_never_draws_a_decision_that_no_rollout_of_it_solved():
    # "a": text solved once, code never; "b": code solved, text never; "c": both solved; "d": neither.
    rows = query("a", [1, 0, 0, 0], [0, 0, 0, 0]) + query("b", [0, 0, 0, 0], [1, 0, 0, 0])
    rows += query("c", [1, 0, 0, 0], [1, 0, 0, 0]) + query("d", [0, 0], [0, 0])
    config = EStepConfig(per_query=3, seed=0)
    plain = subsample(rows, config)[0]
    assert {t["c"] for t in plain if t["id"] in "ab"} == {0, 1}  # Eq. 5 gives the failed decision exp(0) / Z
    train, audit = subsample(rows, EStepConfig(per_query=3, seed=0, skip_failed_decisions=True))
    drawn = {q: sorted(t["c"] for t in train if t["id"] == q) for q in "abcd"}
    assert drawn["a"] == [0, 0, 0] and drawn["b"] == [1, 1, 1] and drawn["d"] == []
    assert len(drawn["c"]) == 3
    assert [a["s_star"] for a in audit] == [a["s_star"] for a in subsample(rows, config)[1]]  # s* itself unchanged
    # a mid-reasoning state is its own: code failed from the start but pays after the partial solution
    mid = [{**r, "sample": MID_OFFSET + r["sample"], "partial": "We add.\n"} for r in query("a", [0, 0], [1, 1])]
    train, _ = subsample(rows + mid, EStepConfig(per_query=3, mid_per_state=2, seed=0, skip_failed_decisions=True))
    assert sorted(t["c"] for t in train if t.get("partial")) == [1, 1]
    assert sorted(t["c"] for t in train if t["id"] == "a" and not t.get("partial")) == [0, 0, 0]


def test_cut_point_stays_before_code_and_the_last_line():
    rng = random.Random(0)
    assert cut_point("First line.\nSecond line.\n```python\nprint(1)\n```", rng) == len("First line.\n")
    assert cut_point("Only one line \\boxed{3}.", rng) is None
    text = "a\nb\nc\nd"
    assert {cut_point(text, random.Random(s)) for s in range(50)} == {2, 4, 6}


def test_mid_requests_continue_with_and_without_prefix():
    problems = {"a": Problem("a", "What is 1 + 1?", 2, "toy", {})}
    rows = query("a", [1, 1], [1]) + [rec("a", "auto", 5, True, used_code=True)]
    config = EStepConfig(mid_reasoning=True, mid_per_query=1, mid_k=2, seed=0)
    reqs, partials = mid_requests(rows, problems, config)
    assert len(reqs) == 4 and {r.sample for r in reqs} == {MID_OFFSET, MID_OFFSET + 1}
    assert {r.prefix for r in reqs} == {"We add.\n", "We add.\n" + CP}
    assert all(partials[r.key()] == "We add.\n" for r in reqs)
    assert mid_requests(rows, problems, config)[0] == reqs


def test_add_decision_tokens(tiny_tokenizer):
    prompt_ids = encode(tiny_tokenizer, "Question: x\n")
    plain = {**rec("a", "auto", 0, True), "prompt_ids": prompt_ids, "c": 0}
    add_decision_tokens(plain, tiny_tokenizer, CP, CODE_PREFIX)
    assert plain["decision_context_ids"] == prompt_ids and plain["decision_ids"] == encode(tiny_tokenizer, CP)
    mid = {
        **rec("a", "code", 0, True, prefix="We add.\n" + CP),
        "prompt_ids": prompt_ids,
        "c": 1,
        "partial": "We add.\n",
    }
    add_decision_tokens(mid, tiny_tokenizer, CP, CODE_PREFIX)
    assert mid["decision_context_ids"] == prompt_ids + encode(tiny_tokenizer, "We add.\n")
    unprompted = {**rec("a", "auto", 0, True, used_code=True), "prompt_ids": prompt_ids, "c": 1}
    add_decision_tokens(unprompted, tiny_tokenizer, CP, CODE_PREFIX)
    assert unprompted["decision_ids"] == []  # its decision is in its own tokens, not in the prefix


def test_config_checks():
    with pytest.raises(ValueError, match="c0_mode"):
        EStepConfig(c0_mode="plain")
    with pytest.raises(ValueError, match="k must be"):
        EStepConfig(k=0)


# --- the driver, through the scripted model ---


@dataclass
class _Result:
    status: str
    stdout: str
    error: str = ""
    duration_s: float = 0.0

    def feedback(self) -> str:
        return self.stdout


class FakeSandbox:
    """Runs code with exec in this process: enough for scripted, trusted test code."""

    def open_session(self) -> str:
        return "s"

    def close_session(self, session: str) -> None:
        pass

    def run_many(self, requests):
        out = []
        for _, code in requests:
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    exec(code, {})
                out.append(_Result("ok", buf.getvalue()))
            except Exception as e:  # a random model's code
                out.append(_Result("error", buf.getvalue(), repr(e)))
        return out


def _grader(items):
    from autocode4math.grading import grade

    return [grade(r, g, b) for r, g, b in items]


def _responder(context: str) -> str:
    """Question 'code-wins': CoT is wrong, code right; 'cot-wins': the reverse. Code is used only after the prefix."""
    wins = "code" if "6 times 7" in context else "cot"
    if "```output" in context:
        return "So the answer is \\boxed{42}." if wins == "code" else "So the answer is \\boxed{0}."
    if CODE_PREFIX in context:
        return "We compute.\n```python\nprint(6 * 7)\n```\n```output"
    answer = 42 if wins == "cot" else 41
    return f"We multiply the numbers.\nThus \\boxed{{{answer}}}."


PROBLEMS = [
    Problem("code-wins", "What is 6 times 7?", 42, "toy", {}),
    Problem("cot-wins", "What is 7 times 6?", 42, "toy", {}),
]


def _run(tmp_path, tokenizer, config, name="out"):
    from autocode4math.rollout.scripted import ScriptedBackend

    backend = ScriptedBackend(tokenizer, _responder)
    out = tmp_path / name
    summary = run_estep(backend, PROBLEMS, config, out, sandbox=FakeSandbox(), grader=_grader, progress=False)
    return out, summary, backend


def test_run_estep_writes_train_and_audit(tmp_path, tiny_tokenizer):
    config = EStepConfig(k=2, per_query=2, alpha=4.0)
    out, summary, _ = _run(tmp_path, tiny_tokenizer, config)
    audit = {a["id"]: a for a in read_jsonl(out / "audit.jsonl")}
    assert audit["code-wins"]["Q"] == {"0": 0.0, "1": 1.0}
    assert audit["cot-wins"]["Q"] == {"0": 1.0, "1": 0.0}
    assert audit["code-wins"]["pi_code"] == pytest.approx(1 / 4)  # 0 of 2 plain rollouts used code
    train = list(read_jsonl(out / "train.jsonl"))
    assert summary["n_rollouts"] == 8 and summary["n_train"] == len(train) == 4
    for t in train:
        assert t["decision_ids"] == encode(tiny_tokenizer, CP) and t["decision_context_ids"] == t["prompt_ids"]
        assert t["c"] == (1 if t["mode"] == "code" else 0)
    assert (out / "estep_config.yaml").exists()


def test_run_estep_resumes_from_its_rollouts(tmp_path, tiny_tokenizer):
    config = EStepConfig(k=2, per_query=2)
    out, _, first = _run(tmp_path, tiny_tokenizer, config)
    lines = (out / "rollouts.jsonl").read_text().splitlines(keepends=True)
    (out / "rollouts.jsonl").write_text("".join(lines[:5]) + lines[5][:40])  # killed while writing line 6
    train_before = (out / "train.jsonl").read_text()
    (out / "train.jsonl").unlink()
    _, summary, again = _run(tmp_path, tiny_tokenizer, config)
    assert summary["n_rollouts"] == 8
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == 8
    assert sum(again.calls) < sum(first.calls)  # only the 3 missing trajectories were generated
    assert (out / "train.jsonl").read_text() == train_before


def test_run_estep_mid_reasoning(tmp_path, tiny_tokenizer):
    config = EStepConfig(k=2, per_query=3, mid_reasoning=True, mid_per_query=1, mid_k=1)
    out, summary, _ = _run(tmp_path, tiny_tokenizer, config)
    rows = list(read_jsonl(out / "rollouts.jsonl"))
    mid = [r for r in rows if r.get("origin") == "mid"]
    assert len(mid) == 4 and summary["n_rollouts"] == 12
    assert {r["partial"] for r in mid} == {"We multiply the numbers.\n"}
    with_prefix = [r for r in mid if r["mode"] == "code"]
    assert all(r["used_code"] and r["prefix"] == "We multiply the numbers.\n" + CP for r in with_prefix)
    audit = {(a["id"], a["partial"]): a for a in read_jsonl(out / "audit.jsonl")}
    assert audit["code-wins", ""]["n"] == {"0": 2, "1": 2}  # the query's own state: 2 plain, 2 prefixed
    # each partial solution is a state of its own (Q per query and prefix, not pooled with the query's):
    # from "We multiply the numbers.\n" plain text answers 41 (wrong), the prefix leads to code (42, right)
    after = audit["code-wins", "We multiply the numbers.\n"]
    assert after["n"] == {"0": 1, "1": 1} and after["Q"] == {"0": 0.0, "1": 1.0}
    assert audit["cot-wins", "We multiply the numbers.\n"]["Q"] == {"0": 1.0, "1": 0.0}
    for t in read_jsonl(out / "train.jsonl"):
        if t.get("origin") == "mid":
            assert t["decision_context_ids"] == t["prompt_ids"] + encode(tiny_tokenizer, t["partial"])
    # 3 per query from its own state, mid_per_state (2) from each partial solution
    assert json.loads((out / "summary.json").read_text())["n_train"] == 2 * 3 + 2 * 2


@pytest.mark.slow
def test_estep_then_mstep_with_the_hf_backend(tmp_path, tiny_model_dir):
    """The real path on a tiny random model: HF generation -> train.jsonl -> M-step -> a loadable checkpoint."""
    from transformers import AutoModelForCausalLM

    from autocode4math.mstep import MStepConfig, run_mstep
    from autocode4math.rollout.engine import RolloutConfig

    config = EStepConfig(k=2, per_query=2, batch_size=8, rollout=RolloutConfig(max_new_tokens=12, temperature=1.0))
    summary = run_estep(
        str(tiny_model_dir), PROBLEMS, config, tmp_path / "e", sandbox=FakeSandbox(), grader=_grader, progress=False
    )
    assert summary["n_rollouts"] == 8 and summary["n_train"] == 4
    mconfig = MStepConfig(lr=1e-3, micro_batch_size=2, grad_accum=2, max_steps=1)
    model_dir = run_mstep(tiny_model_dir, tmp_path / "e" / "train.jsonl", mconfig, tmp_path / "m", progress=False)
    before, after = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoModelForCausalLM.from_pretrained(model_dir),
    )
    changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True)]
    assert any(changed)
