"""The rollout engine through the scripted stand-in model: code rounds, segments, masks, stops, budget."""

from __future__ import annotations

import re

import pytest

from autocode4math.benchmarks import Problem
from autocode4math.prompts import CODE_PREFIX, PromptConfig
from autocode4math.rollout import RolloutConfig, RolloutRequest, make_requests, run_rollouts
from autocode4math.rollout.engine import cut_at_stop, encode, request_seed
from autocode4math.rollout.scripted import ScriptedBackend, by_rounds
from autocode4math.sandbox import SandboxPool

CODE_TURN = "Compute it.\n```python\nprint(6 * 7)\n```\n```output"
ANSWER_TURN = "So the answer is \\boxed{42}."


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


def problem(qid="q1", answer="42", question="What is 6 times 7?"):
    return Problem(id=qid, question=question, answer=answer, benchmark="toy", meta={})


def rollout(tokenizer, pool, responder, requests=None, **config):
    backend = ScriptedBackend(tokenizer, responder)
    requests = requests or [RolloutRequest(problem(), "auto", 0, "")]
    records = run_rollouts(backend, requests, RolloutConfig(**config), progress=False, sandbox=pool)
    return records, backend


def test_code_round_segments_and_mask(tiny_tokenizer, pool):
    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds([CODE_TURN, ANSWER_TURN]))
    tool_text = r["response"][len(CODE_TURN) : len(r["response"]) - len(ANSWER_TURN)]
    assert tool_text.startswith("\n") and tool_text.endswith("\n```\n") and "42" in tool_text
    expected = encode(tiny_tokenizer, CODE_TURN) + encode(tiny_tokenizer, tool_text)
    expected += encode(tiny_tokenizer, ANSWER_TURN) + [tiny_tokenizer.eos_token_id]
    assert r["response_ids"] == expected
    a = len(encode(tiny_tokenizer, CODE_TURN))
    b = a + len(encode(tiny_tokenizer, tool_text))
    assert r["segments"] == [
        {"kind": "model", "start": 0, "end": a},
        {"kind": "tool", "start": a, "end": b},
        {"kind": "model", "start": b, "end": len(expected)},
    ]
    assert r["response_mask"] == [1] * a + [0] * (b - a) + [1] * (len(expected) - b)
    assert 0 < r["code_blocks"][0].pop("duration_s") < 10  # sandbox seconds of the block
    assert r["code_blocks"] == [{"code": "print(6 * 7)\n", "status": "ok", "output": "42\n", "error": ""}]
    assert (r["n_code_calls"], r["used_code"], r["finish_reason"]) == (1, True, "answer")
    assert (r["pred"], r["correct"]) == ("42", True)
    assert r["n_generated_tokens"] == a + len(expected) - b
    assert r["prompt_ids"] == encode(tiny_tokenizer, r["prompt"])


def test_record_has_the_contract_keys(tiny_tokenizer, pool):
    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds([ANSWER_TURN]))
    keys = (
        "id benchmark mode sample question answer meta prompt prefix response prompt_ids prefix_ids response_ids"
        " response_mask segments code_blocks n_code_calls used_code finish_reason error tokens_from n_prompt_tokens"
        " n_generated_tokens pred correct grade_status grade_error"
    )
    assert list(r) == keys.split(" ")
    assert (r["used_code"], r["n_code_calls"], r["segments"][0]["kind"]) == (False, 0, "model")
    assert (r["error"], r["tokens_from"]) == ("", "model")
    assert r["response_mask"] == [1] * len(r["response_ids"])


def test_text_sampled_after_the_stop_string_is_dropped(tiny_tokenizer, pool):
    # the "model" hallucinates its own output block; the engine keeps only up to ```output and runs the code
    turn = "```python\nprint(2 + 3)\n```\n```output\n99\n```\n\\boxed{99}"
    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds([turn, "\\boxed{5}"]), max_code_rounds=1)
    assert r["response"].startswith("```python\nprint(2 + 3)\n```\n```output\n5\n```\n")
    assert "99" not in r["response"]
    assert (r["pred"], r["finish_reason"]) == ("5", "answer")


def test_session_keeps_state_between_rounds(tiny_tokenizer, pool):
    turns = ["```python\nx = 5\nprint(x)\n```\n```output", "```python\nprint(x * 2)\n```\n```output", "\\boxed{10}"]
    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds(turns))
    assert [b["output"] for b in r["code_blocks"]] == ["5\n", "10\n"]
    assert [s["kind"] for s in r["segments"]] == ["model", "tool", "model", "tool", "model"]
    assert (r["pred"], r["correct"]) == ("10", False)  # the gold is 42


def test_code_error_is_fed_back(tiny_tokenizer, pool):
    turns = ["```python\nprint(undefined_name)\n```\n```output", "\\boxed{42}"]
    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds(turns))
    assert r["code_blocks"][0]["status"] == "error"
    assert "NameError" in r["response"]
    assert r["used_code"] and r["correct"]


def test_round_limit(tiny_tokenizer, pool):
    loop = "```python\nprint(1)\n```\n```output"
    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds([loop]), max_code_rounds=2)
    assert r["finish_reason"] == "round_limit"
    assert r["n_code_calls"] == 2
    assert [b["status"] for b in r["code_blocks"]] == ["ok", "ok", "not_run"]


def test_zero_rounds_allowed_stops_at_first_block(tiny_tokenizer, pool):
    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds([CODE_TURN, ANSWER_TURN]), max_code_rounds=0)
    assert (r["finish_reason"], r["n_code_calls"], r["used_code"]) == ("round_limit", 0, False)


def test_stop_without_code_block_ends_the_trajectory(tiny_tokenizer, pool):
    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds(["No code here.\n```output", "\\boxed{42}"]))
    assert (r["finish_reason"], r["n_code_calls"], r["response"]) == ("answer", 0, "No code here.\n```output")


def test_budget_is_shared_across_rounds(tiny_tokenizer, pool):
    first = len(encode(tiny_tokenizer, CODE_TURN))
    (full,), _ = rollout(tiny_tokenizer, pool, by_rounds([CODE_TURN, "x" * 200]))
    tool = full["segments"][1]["end"] - full["segments"][1]["start"]
    budget = first + tool + 7
    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds([CODE_TURN, "\\boxed{42} " * 50]), max_new_tokens=budget)
    assert len(r["response_ids"]) == budget
    assert r["segments"][-1] == {"kind": "model", "start": first + tool, "end": budget}
    assert r["finish_reason"] == "length"
    assert r["pred"] == "42" and r["correct"] is False  # the budget ran out: graded wrong


def test_second_round_gets_what_is_left_of_the_budget(tiny_tokenizer, pool):
    (r,), backend = rollout(tiny_tokenizer, pool, by_rounds([CODE_TURN, ANSWER_TURN]), max_new_tokens=100)
    used = r["segments"][1]["end"]  # model tokens of round 0 plus the tool output
    assert [q.max_tokens for q in backend.requests] == [100, 100 - used]
    assert backend.requests[1].ids == r["prompt_ids"] + r["prefix_ids"] + r["response_ids"][:used]


def test_seeds_do_not_depend_on_batch_composition(tiny_tokenizer, pool):
    requests = [RolloutRequest(problem(f"q{i}"), "auto", s, "") for i in range(3) for s in range(2)]

    def seeds(max_active):
        backend = ScriptedBackend(tiny_tokenizer, by_rounds([CODE_TURN, ANSWER_TURN]))
        run_rollouts(backend, requests, RolloutConfig(max_active=max_active), progress=False, sandbox=pool)
        return sorted(q.seed for q in backend.requests)

    assert seeds(6) == seeds(2)
    assert len(set(seeds(6))) == 12  # 6 trajectories x 2 rounds, all different


def test_tool_output_filling_the_budget_ends_with_length(tiny_tokenizer, pool):
    turn = "```python\nprint('7' * 300)\n```\n```output"
    budget = len(encode(tiny_tokenizer, turn)) + 3
    (r,), backend = rollout(tiny_tokenizer, pool, by_rounds([turn, "\\boxed{42}"]), max_new_tokens=budget)
    assert r["finish_reason"] == "length"
    assert r["segments"][-1]["kind"] == "tool"
    assert backend.calls == [1]


def test_never_stopping_model_ends_at_budget(tiny_tokenizer, pool):
    (r,), _ = rollout(tiny_tokenizer, pool, lambda ctx: "blah " * 1000, max_new_tokens=25)
    assert (len(r["response_ids"]), r["finish_reason"], r["correct"]) == (25, "length", False)


def test_batching_one_call_per_round_and_order(tiny_tokenizer, pool):
    # q0 answers at once; q1 and q2 run one code round
    def responder(ctx):
        if "q0" in ctx or "```output" in ctx:
            return ANSWER_TURN
        return CODE_TURN

    probs = [problem(f"q{i}", question=f"Question q{i}: 6 times 7?") for i in range(3)]
    requests = [RolloutRequest(p, "auto", 0, "") for p in probs]
    seen = []
    backend = ScriptedBackend(tiny_tokenizer, responder)
    records = run_rollouts(backend, requests, RolloutConfig(), progress=False, sandbox=pool, on_record=seen.append)
    assert backend.calls == [3, 2]
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    assert [r["id"] for r in seen] == ["q0", "q1", "q2"]  # q0 finishes in round 0, the others in round 1
    assert [r["used_code"] for r in records] == [False, True, True]
    backend = ScriptedBackend(tiny_tokenizer, responder)
    run_rollouts(backend, requests, RolloutConfig(max_active=2), progress=False, sandbox=pool)
    assert backend.calls[0] == 2 and sum(backend.calls) == 5


def test_code_mode_prefix_is_part_of_the_response_context(tiny_tokenizer, pool):
    contexts = []

    def responder(ctx):
        contexts.append(ctx)
        return ANSWER_TURN

    requests = make_requests([problem()], ["code"], 1)
    backend = ScriptedBackend(tiny_tokenizer, responder)
    (r,) = run_rollouts(backend, requests, RolloutConfig(), progress=False, sandbox=pool)
    assert r["prefix"] == CODE_PREFIX + "\n"
    assert r["prefix_ids"] == encode(tiny_tokenizer, CODE_PREFIX + "\n")
    assert contexts == [r["prompt"] + r["prefix"]]
    assert r["response"] == ANSWER_TURN


def test_make_requests():
    probs = [problem("a"), problem("b")]
    reqs = make_requests(probs, ["auto", "code"], 2, PromptConfig(code_prefix="Use code."))
    assert [(r.problem.id, r.mode, r.sample) for r in reqs] == [
        ("a", "auto", 0),
        ("a", "auto", 1),
        ("b", "auto", 0),
        ("b", "auto", 1),
        ("a", "code", 0),
        ("a", "code", 1),
        ("b", "code", 0),
        ("b", "code", 1),
    ]
    assert {r.prefix for r in reqs if r.mode == "code"} == {"Use code.\n"}
    assert {r.prefix for r in reqs if r.mode == "auto"} == {""}
    with pytest.raises(ValueError, match="unknown modes"):
        make_requests(probs, ["magic"], 1)
    with pytest.raises(ValueError, match="n must be"):
        make_requests(probs, ["auto"], 0)


def test_cut_at_stop_keeps_the_completing_token(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "abc```output\n42\n```")
    cut, hit = cut_at_stop(ids, tiny_tokenizer, "```output")
    text = tiny_tokenizer.decode(cut)
    assert hit and "```output" in text and "42" not in text
    assert "```output" not in tiny_tokenizer.decode(cut[:-1])
    assert cut_at_stop(ids, tiny_tokenizer, "nope") == (ids, False)


def test_request_seeds_differ_by_sample_round_and_base_and_survive_a_restart():
    import os
    import subprocess
    import sys

    seeds = {request_seed(0, ("b", "auto", "q", s), k) for s in range(8) for k in range(3)}
    assert len(seeds) == 24
    key = ("b", "auto", "q", 0)
    assert request_seed(1, key, 0) != request_seed(0, key, 0)
    # a resumed job is a new interpreter with another string-hash seed: it must draw the same seeds
    code = f"from autocode4math.rollout.engine import request_seed; print(request_seed(1, {key!r}, 0))"
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert int(out.stdout) == request_seed(1, key, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"max_code_rounds": -1}, "max_code_rounds"),
        ({"max_active": 0}, "max_active"),
    ],
)
def test_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**kwargs)


def test_resolve_model_finds_shipped_names_and_refuses_missing_paths(tmp_path, monkeypatch):
    from autocode4math.config import ConfigError
    from autocode4math.rollout import SHIPPED_CHECKPOINTS, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "em").mkdir(parents=True)
    (tmp_path / "weights.bin").write_text("x")
    assert resolve_model("toy-sft") == str(SHIPPED_CHECKPOINTS / "toy-sft")
    assert resolve_model("runs/em") == "runs/em"  # an existing directory, as given
    for hub_id in ("Qwen/Qwen2.5-Math-1.5B", "gpt2", "org/model-v1.5"):
        assert resolve_model(hub_id) == hub_id  # left to the Hub
    for path in ("./nope", "../nope", "/no/such/dir", "runs/em2", "runs/em/model", "a/b/c", "~/no-such-ckpt/"):
        with pytest.raises(ConfigError, match=rf"model '{re.escape(path)}': directory does not exist"):
            resolve_model(path)
    with pytest.raises(ConfigError, match="is a file, not a checkpoint directory"):
        resolve_model("weights.bin")
    with pytest.raises(ConfigError, match="no model given"):
        resolve_model("")
    assert resolve_model("./served-name", "openai") == "./served-name"  # a served model's name, not a path


@pytest.mark.parametrize(
    "turns",
    [[CODE_TURN, ANSWER_TURN], [ANSWER_TURN], [CODE_TURN, "Again.\n```python\nprint(1/0)\n```\n```output", ANSWER_TURN],
     [CODE_PREFIX + "\n" + CODE_TURN, ANSWER_TURN]],
)  # fmt: skip
def test_a_written_response_gets_the_tokens_and_mask_the_engine_records(tiny_tokenizer, pool, turns):
    """One implementation of which tokens are trained: replaying a finished response gives the rollout's own."""
    from autocode4math.rollout.engine import response_tokens

    (r,), _ = rollout(tiny_tokenizer, pool, by_rounds(turns))
    replayed = response_tokens(tiny_tokenizer, r["response"], tiny_tokenizer.eos_token_id)
    assert replayed == (r["response_ids"], r["response_mask"], r["segments"])
    stop_ids = encode(tiny_tokenizer, "```output")
    trained = [t for t, m in zip(r["response_ids"], r["response_mask"], strict=True) if m]
    for k in range(r["n_code_calls"]):  # the model writes the stop string: its tokens are trained, not masked
        assert r["segments"][2 * k]["kind"] == "model"
        assert r["response_ids"][r["segments"][2 * k]["end"] - len(stop_ids) : r["segments"][2 * k]["end"]] == stop_ids
    assert len(trained) == r["n_generated_tokens"]
