"""The HF backend on a tiny random Qwen2: stop strings, trimming, left-padded batching, the engine end to end."""

from __future__ import annotations

import pytest

from autocode4math.benchmarks import Problem
from autocode4math.rollout import GenerationRequest, RolloutConfig, SamplingParams, make_requests, run_rollouts
from autocode4math.rollout.engine import encode
from autocode4math.rollout.hf import HFBackend
from autocode4math.sandbox import SandboxPool

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, stop="```output")


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return HFBackend(str(tiny_model_dir), device="cpu", batch_size=4)


def req(backend, text, max_tokens=40, seed=0):
    return GenerationRequest(ids=encode(backend.tokenizer, text), text=text, max_tokens=max_tokens, seed=seed)


def test_generation_is_cut_right_after_the_stop_string(backend):
    prompt = "Question: 3 + 4 =\n"
    (free,) = backend.generate([req(backend, prompt, 40)], GREEDY)
    assert free.finish == "length" and len(free.ids) == 40
    # a stop string the greedy model is known to produce after its first tokens: 3 ASCII letters of its output
    text = backend.tokenizer.decode(free.ids)
    start = next(
        i for i in range(len(text) // 3, len(text) - 3) if text[i : i + 3].isascii() and text[i : i + 3].isalpha()
    )
    stop = text[start : start + 3]
    (cut,) = backend.generate([req(backend, prompt, 40)], SamplingParams(0.0, 1.0, stop))
    assert cut.finish == "stop"
    assert cut.ids == free.ids[: len(cut.ids)] and len(cut.ids) < 40
    assert stop in cut.text and stop not in backend.tokenizer.decode(cut.ids[:-1])


def test_left_padded_batch_matches_single_rows(backend):
    prompts = ["Question: 1 + 1 =", "Question: what is 12 * 30 + 7, exactly?", "x"]
    singles = [backend.generate([req(backend, p, 12)], GREEDY)[0].ids for p in prompts]
    batched = [g.ids for g in backend.generate([req(backend, p, 12) for p in prompts], GREEDY)]
    assert batched == singles


def test_per_request_budgets_in_one_batch(backend):
    gens = backend.generate([req(backend, "a", 5), req(backend, "b", 9)], GREEDY)
    assert [len(g.ids) for g in gens] == [5, 9]
    assert [g.finish for g in gens] == ["length", "length"]


def test_sampling_is_seeded(backend):
    sampling = SamplingParams(temperature=1.0, top_p=0.9, stop="```output")
    one = backend.generate([req(backend, "Question:", 15, seed=3)], sampling)[0].ids
    two = backend.generate([req(backend, "Question:", 15, seed=3)], sampling)[0].ids
    other = backend.generate([req(backend, "Question:", 15, seed=4)], sampling)[0].ids
    assert one == two and one != other


def test_engine_end_to_end_on_the_tiny_model(backend):
    problems = [
        Problem(id=f"q{i}", question=f"What is {i} + 1?", answer=str(i + 1), benchmark="toy", meta={}) for i in range(2)
    ]
    requests = make_requests(problems, ["auto", "code"], 1)
    with SandboxPool(workers=1) as pool:
        records = run_rollouts(backend, requests, RolloutConfig(max_new_tokens=16), progress=False, sandbox=pool)
    assert len(records) == 4
    for r in records:
        assert r["prompt"].startswith("<|im_start|>user\n")  # the tokenizer's chat template
        assert len(r["response_ids"]) == len(r["response_mask"]) <= 16
        assert r["finish_reason"] in ("answer", "length", "round_limit")
        assert r["n_generated_tokens"] == sum(r["response_mask"])
        assert sum(s["end"] - s["start"] for s in r["segments"]) == len(r["response_ids"])
    assert records[2]["prefix_ids"] == encode(backend.tokenizer, records[2]["prefix"])


def test_plain_template_without_chat_template(tiny_model_factory):
    plain = HFBackend(str(tiny_model_factory(chat_template=None)), device="cpu")
    requests = make_requests([Problem(id="q", question="What is 2?", answer="2", benchmark="toy", meta={})], ["cot"], 1)
    with SandboxPool(workers=1) as pool:
        (r,) = run_rollouts(plain, requests, RolloutConfig(max_new_tokens=4), progress=False, sandbox=pool)
    assert r["prompt"].startswith("Question: What is 2?") and "without writing code" in r["prompt"]
    assert len(r["response_ids"]) == 4 and r["finish_reason"] == "length"


def test_loaded_model_needs_its_tokenizer(backend):
    with pytest.raises(ValueError, match="tokenizer"):
        HFBackend(backend.model)


def test_a_budget_past_the_context_is_cut_to_fit_with_one_warning(backend):
    """The same weights built for 48 positions: a 40-token budget after the prompt is cut at position 48."""
    import copy

    short = copy.deepcopy(backend.model)
    short.config.max_position_embeddings = 48
    capped = HFBackend(short, backend.tokenizer, device="cpu")
    request = req(backend, "Question: 3 + 4 =\n", 40)  # greedy runs the full 40 tokens here (first test)
    room = 48 - len(request.ids)
    assert 0 < room < 40
    (free,) = backend.generate([request], GREEDY)
    with pytest.warns(UserWarning, match="capped at position 48") as caught:
        (cut,) = capped.generate([request], GREEDY)
        capped.generate([request], GREEDY)
    assert len(caught) == 1  # once per backend
    assert (cut.ids, cut.finish) == (free.ids[:room], "length")
