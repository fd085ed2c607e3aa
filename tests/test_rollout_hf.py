"""The HF backend on a tiny random Qwen2: stop strings, trimming, left-padded batching, the engine end to end."""

from __future__ import annotations

from dataclasses import replace

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


SAMPLE = SamplingParams(temperature=1.0, top_p=0.9, stop="```output")
PROMPTS = ["Question: 1 + 1 =", "Question: what is 12 * 30 + 7, exactly?", "x", "Let's first analyze", "def f(n):"]


def test_sampling_is_seeded_per_request(backend):
    one = backend.generate([req(backend, "Question:", 15, seed=3)], SAMPLE)[0].ids
    two = backend.generate([req(backend, "Question:", 15, seed=3)], SAMPLE)[0].ids
    others = {tuple(backend.generate([req(backend, "Question:", 15, seed=s)], SAMPLE)[0].ids) for s in range(4, 9)}
    assert one == two
    assert tuple(one) not in others and len(others) == 5


def test_sampled_row_ignores_neighbours_batch_size_and_order(backend):
    """A row's sample depends on its context and seed only: not on who shares its batch, where, or how many."""
    target = req(backend, "Question: 3 + 4 =\n", 10, seed=11)
    alone = backend.generate([target], SAMPLE)[0].ids
    others = [req(backend, p, 4 + i, seed=40 + i) for i, p in enumerate(PROMPTS)]
    small = HFBackend(backend.model, backend.tokenizer, device="cpu", batch_size=2)
    batches = [
        backend.generate([others[0], target, others[1]], SAMPLE)[1],
        backend.generate([*others[2:], target], SAMPLE)[-1],  # a batch of 4 with target last, padded the other way
        small.generate([others[3], others[4], others[0], target], SAMPLE)[-1],  # batch size 2, second batch
    ]
    assert all(g.ids == alone for g in batches)
    # the neighbours are not disturbed by the target either
    assert backend.generate([others[0], target, others[1]], SAMPLE)[0].ids == small.generate([others[0]], SAMPLE)[0].ids


def test_resumed_sampled_rollouts_equal_uninterrupted(backend):
    """A resume rebuilds batches from the requests left; every trajectory still gets the tokens it got before."""
    problems = [
        Problem(id=f"q{i}", question=f"What is {i} * 7 + 2?", answer=str(7 * i + 2), benchmark="toy", meta={})
        for i in range(2)
    ]
    requests = make_requests(problems, ["auto", "code"], 2)
    config = RolloutConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, max_active=8, seed=5)
    with SandboxPool(workers=1) as pool:
        whole = run_rollouts(backend, requests, config, progress=False, sandbox=pool)
        left = requests[3:][::-1]  # as if the first 3 had finished before a kill, the rest read back in another order
        resumed = run_rollouts(backend, left, replace(config, max_active=3), progress=False, sandbox=pool)
    by_key = {(r["mode"], r["id"], r["sample"]): r for r in whole}
    assert len({tuple(r["response_ids"]) for r in whole}) > len(whole) // 2  # the samples really differ
    for r in resumed:
        assert r["response_ids"] == by_key[(r["mode"], r["id"], r["sample"])]["response_ids"]


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 0.9), (1.5, 1.0)])
def test_first_token_follows_softmax_with_temperature_and_top_p(backend, temperature, top_p):
    """Chi-square of 3000 first tokens (one seed each) against softmax(logits / T) cut to its top-p nucleus."""
    import torch

    prompt = "Question: what is 12 * 30 + 7, exactly?"
    ids = encode(backend.tokenizer, prompt)
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    mass_before = torch.cumsum(probs[order], 0) - probs[order]
    nucleus = order[mass_before < top_p]  # the smallest set of top tokens holding at least top_p
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()

    wide = HFBackend(backend.model, backend.tokenizer, device="cpu", batch_size=1000)
    n = 3000
    sampling = SamplingParams(temperature, top_p, "```output")
    gens = wide.generate([req(wide, prompt, 1, seed=s) for s in range(n)], sampling)
    counts = torch.bincount(torch.tensor([g.ids[0] for g in gens]), minlength=len(probs)).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus

    def chi_square(reference):  # bins with >= 5 expected draws; the rest pooled into one bin
        big = reference * n >= 5
        observed = torch.cat([counts[big], counts[~big].sum().reshape(1)])
        wanted = torch.cat([reference[big] * n, (reference[~big] * n).sum().reshape(1)])
        keep = wanted > 0
        return float(((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum()), int(keep.sum()) - 1

    stat, dof = chi_square(expected)
    limit = dof + 5 * (2 * dof) ** 0.5  # mean + 5 sd of chi-square(dof)
    assert dof >= 5 and stat < limit
    # the check has power: the untempered, uncut softmax is rejected
    plain = torch.softmax(logits, dim=-1)
    assert chi_square(plain)[0] > limit


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
