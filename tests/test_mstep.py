"""M-step: the loss functions on hand-built tensors, and training a tiny random Qwen2 model."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch

from autocode4math.io import DataError
from autocode4math.mstep import (
    MStepConfig,
    Sample,
    batch_loss,
    collate,
    decision_loss,
    latest_checkpoint,
    load_samples,
    lr_lambda,
    micro_batches,
    policy_loss,
    run_mstep,
    step_plan,
    token_logps,
)
from autocode4math.prompts import CODE_PREFIX

E = math.e


# --- policy_loss ---


def test_ppo_token_level_hand_values():
    # log-ratios [1, -1]: ratios e and 1/e; eps 0.2 clips them to 1.2 and 0.8.
    logp, ref = torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # A = +1: min(e, 1.2) = 1.2 and min(1/e, 0.8) = 1/e; mean over the 2 tokens, negated.
    loss, stats = policy_loss(logp, ref, torch.tensor([1.0]), mask, 0.2)
    assert loss.item() == pytest.approx(-(1.2 + 1 / E) / 2)
    # A = -1: min(-e, -1.2) = -e and min(-1/e, -0.8) = -0.8.
    loss, _ = policy_loss(logp, ref, torch.tensor([-1.0]), mask, 0.2)
    assert loss.item() == pytest.approx((E + 0.8) / 2)
    # both ratios lie outside [0.8, 1.2]; k3 KL = mean(r - 1 - log r) = ((e - 2) + (1/e - 1 + 1)) / 2.
    assert stats["clip_frac"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(((E - 2) + 1 / E) / 2)


def test_literal_clip_form_hand_values_and_zero_gradient_when_clipped():
    # the paper's clip(r) * A: ratios e, 1/e clip to 1.2, 0.8, so the objective is (1.2 + 0.8) / 2 = 1.
    logp = torch.tensor([[1.0, -1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), 0.2, clip_form="literal")
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))  # both clipped: no gradient at all
    # PPO keeps the gradient of the pessimistic token (r = 1/e < 0.8 with A > 0): d(-r/2)/dlogp = -r/2.
    logp2 = torch.tensor([[1.0, -1.0]], requires_grad=True)
    policy_loss(logp2, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), 0.2)[0].backward()
    assert logp2.grad[0, 0].item() == 0.0
    assert logp2.grad[0, 1].item() == pytest.approx(-1 / E / 2)


def test_sequence_level_ratio_hand_values():
    # log-ratios 0.1 + 0.05 (third token masked out) give r = e^0.15 = 1.1618, inside [0.8, 1.2]; A = 2.
    logp = torch.tensor([[0.1, 0.05, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, torch.zeros(1, 3), torch.tensor([2.0]), mask, 0.2, ratio_level="sequence")
    assert loss.item() == pytest.approx(-2 * math.exp(0.15))
    assert stats["clip_frac"].item() == 0.0
    # log-ratio 0.3 > log 1.2: with A = 2 > 0 PPO takes the clipped 1.2 * 2.
    loss, stats = policy_loss(
        torch.tensor([[0.3]]), torch.zeros(1, 1), torch.tensor([2.0]), torch.ones(1, 1), 0.2, ratio_level="sequence"
    )
    assert loss.item() == pytest.approx(-2.4)
    assert stats["clip_frac"].item() == 1.0


def test_masked_tokens_get_zero_gradient_in_policy_loss():
    logp = torch.tensor([[0.1, -0.3, 0.05], [0.0, 0.1, -0.1]], requires_grad=True)  # unmasked ratios unclipped
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    loss, _ = policy_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask, 0.2)
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0)
    assert torch.all(logp.grad[mask == 1] != 0)


def _loop_policy_loss(logp, ref, adv, mask, eps, clip_form):
    """Plain-Python token-level reference implementation."""
    per_seq = []
    for i in range(len(logp)):
        objs = []
        for t in range(len(logp[i])):
            if mask[i][t]:
                r = math.exp(logp[i][t] - ref[i][t])
                clipped = min(max(r, 1 - eps), 1 + eps) * adv[i]
                objs.append(min(r * adv[i], clipped) if clip_form == "ppo" else clipped)
        per_seq.append(sum(objs) / len(objs) if objs else 0.0)
    return -sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("clip_form", ["ppo", "literal"])
def test_vectorised_policy_loss_agrees_with_loop(clip_form):
    gen = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(4, 7, generator=gen) * 2, -torch.rand(4, 7, generator=gen) * 2
    adv = torch.randn(4, generator=gen)
    mask = (torch.rand(4, 7, generator=gen) > 0.3).float()
    mask[3] = 0  # a trajectory with no trainable token contributes 0
    loss, _ = policy_loss(logp, ref, adv, mask, 0.2, clip_form=clip_form)
    expected = _loop_policy_loss(logp.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, clip_form)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --- decision_loss ---


def test_decision_loss_hand_values():
    # p(prefix) = 0.25: c=1 costs -log 0.25 = 1.386, c=0 costs -log 0.75 = 0.288, no decision costs 0.
    lp = torch.full((3,), math.log(0.25))
    loss = decision_loss(lp, torch.tensor([1, 0, 1]), torch.tensor([1.0, 1.0, 0.0]))
    assert loss.item() == pytest.approx((-math.log(0.25) - math.log(0.75)) / 3)


def test_decision_loss_is_stable_at_the_extremes():
    # p(prefix) -> 1 for c=0: capped at log p = -1e-6, so -log(1 - e^-1e-6) ~ -log(1e-6) = 13.8.
    near_one = decision_loss(torch.tensor([-1e-12]), torch.tensor([0]), torch.ones(1))
    assert near_one.item() == pytest.approx(-math.log(1e-6), rel=1e-3)
    # p(prefix) = e^-50 for c=0: -log(1 - e^-50) ~ e^-50, tiny and finite; for c=1 exactly 50.
    assert 0 <= decision_loss(torch.tensor([-50.0]), torch.tensor([0]), torch.ones(1)).item() < 1e-20
    assert decision_loss(torch.tensor([-50.0]), torch.tensor([1]), torch.ones(1)).item() == pytest.approx(50.0)


# --- collate and batching ---


def _sample(ids, start, mask, decision=(), n_decision=0, advantage=1.0, c=0, key="k"):
    return Sample(list(ids), start, list(mask), advantage, c, list(decision), n_decision, True, False, key)


def test_collate_aligns_masks_with_next_token_targets():
    # prompt [5, 6], prefix [7], response [8, 9, 10] with 9 tool-written; decision row [5, 6, 7] with 1 prefix token.
    s = _sample([5, 6, 7, 8, 9, 10], 3, [1, 0, 1], decision=[5, 6, 7], n_decision=1)
    none = _sample([5, 6, 8], 2, [1])  # no decision term: a dummy 2-token decision row, fully masked
    b = collate([s, none], pad_id=0, ref=[[-1.0, -2.0, -3.0], [-4.0]])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 6, 8, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    # target t is ids[t + 1]: 8, 9, 10 are targets 2, 3, 4; the prefix token 7 (target 1) is not trained.
    assert b["rl_mask"].tolist() == [[0, 0, 1, 0, 1], [0, 1, 0, 0, 0]]
    assert b["ref_logp"].tolist() == [[0, 0, -1, -2, -3], [0, -4, 0, 0, 0]]
    assert b["dec_input_ids"].tolist() == [[5, 6, 7], [0, 0, 0]]
    assert b["dec_mask"].tolist() == [[0, 1], [0, 0]]  # target 1 is the prefix token 7 after [5, 6]
    assert b["has_decision"].tolist() == [1.0, 0.0]


def test_micro_batches_cover_every_sample_once_and_are_seeded():
    samples = [_sample(range(n + 2), 1, [1] * (n + 1), key=str(n)) for n in range(23)]
    plan = micro_batches(samples, 4, 2, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(23))
    assert plan == micro_batches(samples, 4, 2, seed=1, epoch=0)
    assert plan != micro_batches(samples, 4, 2, seed=1, epoch=1)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n, size, grad_accum", [(23, 4, 1), (23, 4, 2), (30, 3, 3), (17, 1, 4), (9, 2, 1)])
def test_step_plan_trains_every_micro_batch_of_every_epoch(n, size, grad_accum, world):
    """An epoch's leftover micro-batches are trained (they were dropped when steps_per_epoch rounded down)."""
    samples = [_sample(range(k % 7 + 2), 1, [1] * (k % 7 + 1), key=str(k)) for k in range(n)]
    for epochs in (1, 2, 3, 0.5, 1.75):
        config = MStepConfig(micro_batch_size=size, grad_accum=grad_accum, epochs=epochs)
        per_rank = [step_plan(samples, config, world, rank) for rank in range(world)]
        total = per_rank[0][0]
        seen = [0] * n
        for step in range(total):
            assert len({len(batches_for(step)) for _, batches_for in per_rank}) == 1  # processes stay in step
            for _, batches_for in per_rank:
                chunk = batches_for(step)
                assert chunk and all(chunk), (step, chunk)  # every process has work at every step
                for batch in chunk:
                    for i in batch:
                        seen[i] += 1
        wanted = round(epochs * n)  # trajectories a pass of `epochs` makes
        assert sum(seen) >= wanted and min(seen) >= math.floor(epochs)
        if world == 1:  # a single process never needs filling: exactly the wanted passes, each sample once per epoch
            assert sum(seen) == wanted and max(seen) <= math.ceil(epochs)
            assert total == math.ceil(_micro_batch_count(n, size, epochs) / grad_accum)
        else:  # a short last step is filled so that no process idles: at most one step's micro-batches more
            assert sum(seen) - wanted < world * grad_accum * size


def _micro_batch_count(n: int, size: int, epochs: float) -> int:
    full, rest = divmod(round(epochs * n), n)
    return full * math.ceil(n / size) + math.ceil(rest / size)


def test_step_plan_refuses_too_few_micro_batches_and_honours_max_steps():
    samples = [_sample([1, 2, 3], 1, [1, 1], key=str(k)) for k in range(5)]
    with pytest.raises(ValueError, match="fewer than one optimizer step needs"):
        step_plan(samples, MStepConfig(micro_batch_size=2, grad_accum=4), 1, 0)
    total, batches_for = step_plan(samples, MStepConfig(micro_batch_size=2, max_steps=7), 1, 0)
    assert total == 7 and sum(len(b) for s in range(7) for b in batches_for(s)) == 12  # 2+2+1, 2+2+1, 2+2 (3 epochs)


def test_load_samples_names_the_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt_ids": [1]}) + "\n")
    with pytest.raises(DataError, match="train.jsonl:1: training record lacks"):
        load_samples(path)


def test_lr_schedule_hand_values():
    # warmup 2 of 10 steps, cosine to 0.1: 1/2, 2/2, then 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 8)) / 2.
    c = MStepConfig(warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_lambda(s, c, 10) for s in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert lr_lambda(6, c, 10) == pytest.approx(0.55) and lr_lambda(10, c, 10) == pytest.approx(0.1)
    assert lr_lambda(7, MStepConfig(schedule="constant"), 10) == 1.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="clip_form"):
        MStepConfig(clip_form="exact")
    with pytest.raises(ValueError, match="clip_eps"):
        MStepConfig(clip_eps=1.5)


# --- a tiny random Qwen2 ---


def make_record(tok, question, response, *, c=0, advantage=1.0, code=False, tool="", correct=True, sample=0):
    """A training record as the E-step writes it; `tool` text is inserted after the response, mask 0."""
    prompt_ids = tok(f"Question: {question}\nSolution:\n", add_special_tokens=False)["input_ids"]
    prefix = CODE_PREFIX + "\n" if code else ""
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    model_ids = tok(response, add_special_tokens=False)["input_ids"]
    tool_ids = tok(tool, add_special_tokens=False)["input_ids"] if tool else []
    decision = not (c == 1 and not code)
    return {
        "id": question,
        "benchmark": "toy",
        "mode": "code" if code else "auto",
        "sample": sample,
        "key": f"toy/{question}/{sample}",
        "prompt_ids": prompt_ids,
        "prefix_ids": prefix_ids,
        "response_ids": model_ids + tool_ids,
        "response_mask": [1] * len(model_ids) + [0] * len(tool_ids),
        "advantage": advantage,
        "c": c,
        "correct": correct,
        "used_code": bool(code),
        "decision_context_ids": prompt_ids if decision else [],
        "decision_ids": tok(CODE_PREFIX + "\n", add_special_tokens=False)["input_ids"] if decision else [],
    }


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _fresh(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _batch_of(model, records, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    samples = load_samples(path)
    with torch.no_grad():
        b = collate(samples, 0)
        logp = token_logps(model, b["input_ids"], b["attention_mask"])
    ref = [logp[i, s.start - 1 : s.start - 1 + len(s.mask)].tolist() for i, s in enumerate(samples)]
    return collate(samples, 0, ref)


def _train(model, batch, config, steps, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = batch_loss(model, batch, config)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _seq_logp(model, batch, row, mask_key):
    prefix = "dec_" if mask_key == "dec_mask" else ""
    with torch.no_grad():
        logp = token_logps(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])
    return (logp[row] * batch[mask_key][row]).sum().item()


def test_loss_decreases_on_a_fixed_batch(tiny_model_dir, tiny, tmp_path):
    _, tok = tiny
    model = _fresh(tiny_model_dir)
    records = [
        make_record(tok, "What is 3 * 7?", "3 * 7 = 21. \\boxed{21}", advantage=1.0),
        make_record(tok, "What is 3 * 7?", "3 * 7 = 24. \\boxed{24}", advantage=-1.0, correct=False),
        make_record(tok, "What is 12 + 30?", "x", c=1, code=True, tool="```output\n42\n```\n", advantage=0.5),
    ]
    batch = _batch_of(model, records, tmp_path)
    losses = _train(model, batch, MStepConfig(), steps=8, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1


def test_masked_tokens_get_zero_gradient_through_the_model(tiny_model_dir, tiny, tmp_path):
    _, tok = tiny
    model = _fresh(tiny_model_dir)
    record = make_record(tok, "What is 12 + 30?", "print(12 + 30)", c=1, code=True, tool="```output\n42\n```\n")
    batch = _batch_of(model, [record], tmp_path)
    captured = []

    def capture(**kwargs):
        out = model(**kwargs)
        out.logits.retain_grad()
        captured.append(out.logits)
        return out

    batch["ref_logp"] = batch["ref_logp"] - 0.05  # ratio e^0.05 inside the clip range: gradients flow
    loss, _ = batch_loss(capture, batch, MStepConfig())
    loss.backward()
    grad = captured[0].grad[0, :-1].abs().sum(-1)  # trajectory row, per target position
    trained = batch["rl_mask"][0] == 1
    assert torch.all(grad[~trained] == 0)  # prompt, code prefix, tool output and padding
    assert torch.all(grad[trained] > 0)
    dec_grad = captured[1].grad[0, :-1].abs().sum(-1)  # decision row: only the code-prefix targets
    assert torch.all(dec_grad[batch["dec_mask"][0] == 0] == 0) and torch.all(dec_grad[batch["dec_mask"][0] == 1] > 0)


def test_positive_advantage_raises_the_trajectory_log_prob(tiny_model_dir, tiny, tmp_path):
    _, tok = tiny
    model = _fresh(tiny_model_dir)
    batch = _batch_of(model, [make_record(tok, "What is 3 * 7?", "3 * 7 = 21. \\boxed{21}", advantage=1.0)], tmp_path)
    before = _seq_logp(model, batch, 0, "rl_mask")
    _train(model, batch, MStepConfig(decision_weight=0.0), steps=3, lr=1e-3)
    assert _seq_logp(model, batch, 0, "rl_mask") > before + 0.5


def test_decision_term_raises_p_prefix_for_c1_and_lowers_it_for_c0(tiny_model_dir, tiny, tmp_path):
    _, tok = tiny
    model = _fresh(tiny_model_dir)
    c1 = _batch_of(model, [make_record(tok, "What is 3 * 7?", "21", c=1, code=True, advantage=0.0)], tmp_path)
    c0 = _batch_of(model, [make_record(tok, "What is 3 * 7?", "21", c=0, advantage=0.0)], tmp_path)
    start = _seq_logp(model, c1, 0, "dec_mask")
    _train(model, c1, MStepConfig(), steps=12, lr=3e-2)
    raised = _seq_logp(model, c1, 0, "dec_mask")
    assert raised > start + 5 and raised > math.log(0.1)  # p(prefix) went from ~0 to substantial
    # c=0: the gradient of -log(1 - p) scales with p, so it acts once the prefix is likely
    _train(model, c0, MStepConfig(), steps=5, lr=1e-2)
    assert _seq_logp(model, c0, 0, "dec_mask") < raised - 0.5


def _write_train(tok, path, n=8):
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        ok = i % 3 != 0
        rows.append(
            make_record(
                tok,
                f"What is {a} * {b}?",
                f"{a} * {b} = {a * b if ok else a * b + 1}. \\boxed{{{a * b}}}",
                c=i % 2,
                code=bool(i % 2),
                advantage=1.0 if ok else -1.0,
                correct=ok,
                sample=i,
            )
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Killed(Exception):
    pass


def _kill_at(n):
    def on_step(step, metrics):
        if step == n:
            raise Killed

    return on_step


@pytest.mark.slow
def test_run_mstep_resumes_to_the_same_result(tiny_model_dir, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    _, tok = tiny
    data = _write_train(tok, tmp_path / "train.jsonl")
    config = MStepConfig(lr=1e-3, micro_batch_size=2, grad_accum=2, epochs=2, save_every=2, warmup_steps=1)
    full = run_mstep(tiny_model_dir, data, config, tmp_path / "full", progress=False)

    with pytest.raises(Killed):
        run_mstep(tiny_model_dir, data, config, tmp_path / "resumed", on_step=_kill_at(3), progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000002"
    resumed = run_mstep(tiny_model_dir, data, config, tmp_path / "resumed", progress=False)
    a, b = AutoModelForCausalLM.from_pretrained(full), AutoModelForCausalLM.from_pretrained(resumed)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name
    rows = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], abs=1e-6)
    assert set(rows[0]) >= {"loss", "rl_loss", "decision_loss", "clip_frac", "approx_kl", "code_rate", "accuracy"}
    assert rows[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # first step: pi_theta is pi_ref
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] < rows[1]["lr"]  # warmup 1, then cosine
    assert any((tmp_path / "full/tb").iterdir())
    assert (tmp_path / "full/model/tokenizer.json").exists()


RESUME = MStepConfig(lr=1e-3, micro_batch_size=2, grad_accum=2, epochs=2, save_every=2, warmup_steps=1)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny, tmp_path_factory):
    """An uninterrupted M-step run (4 steps, checkpoints at 2 and 4) and its data file."""
    _, tok = tiny
    root = tmp_path_factory.mktemp("mstep_reference")
    data = _write_train(tok, root / "train.jsonl")
    return data, run_mstep(tiny_model_dir, data, RESUME, root / "full", progress=False)


def _same_weights(a_dir, b_dir):
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def _tb_steps(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(tb_dir.iterdir())
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return len(files), [e.step for e in acc.Scalars("mstep/loss")]


@pytest.mark.slow
def test_killed_before_the_first_checkpoint_logs_each_step_once(tiny_model_dir, reference, tmp_path):
    data, full = reference
    out = tmp_path / "m"
    for _ in range(2):  # killed twice after step 1, before the checkpoint of step 2
        with pytest.raises(Killed):
            run_mstep(tiny_model_dir, data, RESUME, out, on_step=_kill_at(1), progress=False)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1]
    run_mstep(tiny_model_dir, data, RESUME, out, progress=False)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert _tb_steps(out / "tb") == (1, [1, 2, 3, 4])  # one event file, each step once
    _same_weights(full, out / "model")


@pytest.mark.slow
def test_resume_recovers_from_half_written_checkpoints(tiny_model_dir, reference, tmp_path):
    import shutil

    data, full = reference
    out = tmp_path / "m"
    with pytest.raises(Killed):
        run_mstep(tiny_model_dir, data, RESUME, out, on_step=_kill_at(3), progress=False)
    good = latest_checkpoint(out)
    assert good.name == "step-00000002"
    bad = {n: out / "state" / f"step-0000000{n}" for n in (4, 5, 6, 7)}  # newer, but each one damaged
    for path in bad.values():
        shutil.copytree(good, path)
    (bad[4] / "trainer.json").unlink()  # killed before the completion marker was written
    (bad[5] / "model.safetensors").unlink()  # a checkpoint without weights
    (bad[6] / "optimizer.bin").write_bytes((bad[6] / "optimizer.bin").read_bytes()[:100])  # a torn file
    shutil.rmtree(bad[7])
    bad[7].mkdir()  # killed right after creating the directory
    (out / "state" / "leftover.tmp").mkdir()  # not a checkpoint at all
    assert latest_checkpoint(out) == good
    run_mstep(tiny_model_dir, data, RESUME, out, progress=False)
    _same_weights(full, out / "model")
    assert sorted(d.name for d in (out / "state").iterdir()) == ["leftover.tmp", "step-00000004"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_kill_while_saving_keeps_the_previous_checkpoint(tiny_model_dir, reference, tmp_path, monkeypatch):
    import autocode4math.mstep as mstep

    data, full = reference
    out = tmp_path / "m"
    real = mstep.write_json

    def die_on_second_marker(path, obj):
        if path.name == "trainer.json" and obj["step"] == 4:
            raise Killed  # step 4's files are written, its marker is not
        real(path, obj)

    monkeypatch.setattr(mstep, "write_json", die_on_second_marker)
    with pytest.raises(Killed):
        run_mstep(tiny_model_dir, data, RESUME, out, progress=False)
    monkeypatch.setattr(mstep, "write_json", real)
    assert latest_checkpoint(out).name == "step-00000002"
    assert (out / "state" / "step-00000004" / "model.safetensors").exists()
    run_mstep(tiny_model_dir, data, RESUME, out, progress=False)
    _same_weights(full, out / "model")


@pytest.mark.slow
def test_changed_settings_or_data_refuse_instead_of_reusing(tiny_model_dir, tiny, reference, tmp_path):
    import shutil

    from autocode4math.fingerprint import ResumeError

    data, full = reference
    out = tmp_path / "m"
    shutil.copytree(full.parent, out)  # a finished M-step
    assert run_mstep(tiny_model_dir, data, replace(RESUME, save_every=1), out, progress=False) == out / "model"
    with pytest.raises(ResumeError, match=r"lr: 0\.001 -> 0\.002.*--overwrite"):
        run_mstep(tiny_model_dir, data, replace(RESUME, lr=2e-3), out, progress=False)
    other = _write_train(tiny[1], tmp_path / "other.jsonl", n=10)
    with pytest.raises(ResumeError, match=r"data: \"sha256:"):
        run_mstep(tiny_model_dir, other, RESUME, out, progress=False)
    with pytest.raises(ResumeError, match=r"model: "):
        run_mstep(full, data, RESUME, out, progress=False)
    (out / "fingerprint.json").unlink()  # results without a record cannot be checked
    with pytest.raises(ResumeError, match="without a fingerprint"):
        run_mstep(tiny_model_dir, data, RESUME, out, progress=False)
    model = run_mstep(tiny_model_dir, data, replace(RESUME, lr=2e-3), out, progress=False, overwrite=True)
    assert json.loads((out / "fingerprint.json").read_text())["settings"]["lr"] == 2e-3
    assert [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()][0] == 2e-3
    assert "lr: 0.002" in (model.parent / "mstep_config.yaml").read_text()


def test_lora_trains_only_the_adapted_projections_and_saves_merged(tiny_model_dir, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    _, tok = tiny
    data = _write_train(tok, tmp_path / "train.jsonl", n=4)
    config = MStepConfig(lr=1e-2, micro_batch_size=2, max_steps=1, lora_r=4, gradient_checkpointing=True)
    out = run_mstep(tiny_model_dir, data, config, tmp_path / "lora", progress=False)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()  # a plain model: LoRA merged
    changed = {name.split(".")[-2] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_cli_mstep_runs_and_rejects_unknown_overrides(tiny_model_dir, tiny, tmp_path):
    from typer.testing import CliRunner

    from autocode4math.cli import app

    _, tok = tiny
    data = _write_train(tok, tmp_path / "train.jsonl", n=4)
    args = ["mstep", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "m")]
    bad = CliRunner().invoke(app, [*args, "--set", "learning_rate=1e-3"])
    assert bad.exit_code != 0 and "learning_rate" in bad.output
    ok = CliRunner().invoke(app, [*args, "--set", "max_steps=1", "--set", "micro_batch_size=2"])
    assert ok.exit_code == 0, ok.output
    assert len((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()) == 1
    assert "max_steps: 1" in (tmp_path / "m" / "mstep_config.yaml").read_text()


def test_sft_loss_is_token_mean_nll_per_trajectory_then_mean():
    from autocode4math.mstep import sft_loss

    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # trajectory 1: (1 + 2) / 2 = 1.5; trajectory 2: 0.5 / 1 = 0.5; mean 1.0 (masked -3 and -9 ignored)
    assert sft_loss(logp, mask).item() == pytest.approx(1.0)


# --- the cot anchor and the cot replay (forced-mode options) ---


def _with_cot_prompt(tok, record, question):
    cot = tok(f"Question: {question}\nthink without code\nSolution:\n", add_special_tokens=False)["input_ids"]
    prefix = tok(CODE_PREFIX + "\n", add_special_tokens=False)["input_ids"]
    return {**record, "anchor_context_ids": cot, "anchor_ids": prefix}


def test_cot_replay_rows_are_the_text_responses_under_the_cot_prompt(tiny, tmp_path):
    _, tok = tiny
    text = _with_cot_prompt(tok, make_record(tok, "What is 3 * 7?", "3 * 7 = 21. \\boxed{21}"), "What is 3 * 7?")
    code = _with_cot_prompt(tok, make_record(tok, "What is 3 * 7?", "x", c=1, code=True, sample=1), "What is 3 * 7?")
    mid = {**text, "prefix_ids": tok("3 * 7 = 21.\n", add_special_tokens=False)["input_ids"], "sample": 2, "key": "m"}
    bare = {k: v for k, v in text.items() if not k.startswith("anchor")} | {"key": "bare"}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (text, code, mid, bare)))
    under_cot = {**text, "prompt_ids": text["anchor_context_ids"], "key": "cot"}  # c0_mode=cot: already cot-mode
    path.write_text("".join(json.dumps(r) + "\n" for r in (text, code, mid, bare, under_cot)))
    s_text, s_code, s_mid, s_bare, s_cot = load_samples(path)
    assert s_code.replay is None and s_mid.replay is None and s_bare.replay is None and s_cot.replay is None
    replay = s_text.replay
    assert replay.ids == text["anchor_context_ids"] + text["response_ids"]
    assert replay.start == len(text["anchor_context_ids"]) and replay.mask == s_text.mask
    assert replay.advantage == s_text.advantage and replay.n_decision == 0 and replay.n_anchor == 0


def test_cot_replay_adds_its_weighted_policy_loss_per_batch_sample(tiny_model_dir, tiny, tmp_path):
    _, tok = tiny
    model = _fresh(tiny_model_dir)
    q = "What is 3 * 7?"
    records = [
        _with_cot_prompt(tok, make_record(tok, q, "3 * 7 = 21. \\boxed{21}", advantage=0.7), q),
        _with_cot_prompt(tok, make_record(tok, q, "print(3 * 7)", c=1, code=True, advantage=-0.4, sample=1), q),
    ]
    batch = _batch_of(model, records, tmp_path)
    samples = load_samples(tmp_path / "train.jsonl")
    rows = [s.replay for s in samples if s.replay is not None]
    assert len(rows) == 1
    with torch.no_grad():
        r = collate(rows, 0)
        logp = token_logps(model, r["input_ids"], r["attention_mask"])
    # pi_ref is the model itself: every ratio is 1, so a replayed row's policy loss is -A; the batch holds 2 samples
    replay = collate(rows, 0, [logp[0, rows[0].start - 1 : rows[0].start - 1 + len(rows[0].mask)].tolist()])
    with torch.no_grad():
        off, _ = batch_loss(model, batch, MStepConfig(cot_replay_weight=0.0), replay)
        on, parts = batch_loss(model, batch, MStepConfig(cot_replay_weight=2.0), replay)
    assert parts["replay_loss"].item() == pytest.approx(-0.7 / 2, abs=1e-5)
    assert (on - off).item() == pytest.approx(2.0 * -0.7 / 2, abs=1e-5)


def test_cot_anchor_adds_the_c0_decision_term_under_the_cot_prompt(tiny_model_dir, tiny, tmp_path):
    _, tok = tiny
    model = _fresh(tiny_model_dir)
    q = "What is 3 * 7?"
    records = [_with_cot_prompt(tok, make_record(tok, q, "21", c=c, code=bool(c), sample=c), q) for c in (0, 1)]
    batch = _batch_of(model, records, tmp_path)
    with torch.no_grad():
        off, _ = batch_loss(model, batch, MStepConfig(cot_anchor_weight=0.0))
        on, parts = batch_loss(model, batch, MStepConfig(cot_anchor_weight=3.0))
        row = records[0]["anchor_context_ids"] + records[0]["anchor_ids"]
        logp = token_logps(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
    lp = logp[len(records[0]["anchor_context_ids"]) - 1 :].sum()
    expected = -torch.log1p(-torch.exp(lp)).item()  # the same for both samples: same question, c = 0 under cot
    assert parts["anchor_loss"].item() == pytest.approx(expected, rel=1e-4)
    assert (on - off).item() == pytest.approx(3.0 * expected, rel=1e-4)


def test_run_mstep_with_cot_replay_scores_and_trains_the_replayed_rows(tiny_model_dir, tiny, tmp_path):
    _, tok = tiny
    data = _write_train(tok, tmp_path / "train.jsonl", n=4)
    rows = [{**json.loads(line), "advantage": 0.5} for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps(_with_cot_prompt(tok, r, r["id"])) + "\n" for r in rows))
    config = MStepConfig(lr=1e-3, micro_batch_size=2, epochs=1, cot_replay_weight=1.0)
    run_mstep(tiny_model_dir, data, config, tmp_path / "m", progress=False)
    stored = torch.load(tmp_path / "m" / "ref_logps_replay.pt", weights_only=True)["logps"]
    assert len(stored) == sum(r["c"] == 0 for r in rows) == 2
    metrics = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert any(m["replay_loss"] != 0 for m in metrics)


def test_a_micro_batch_without_replayed_samples_still_makes_the_replay_pass_at_zero_loss(tiny_model_dir, tiny):
    from autocode4math.mstep import _replay_batch

    model = _fresh(tiny_model_dir)
    plain = _sample([5, 6, 7, 8], 2, [1, 1], advantage=1.0)
    replayed = replace(plain, replay=_sample([9, 7, 8], 1, [1, 1], advantage=1.0))
    samples = [plain, replayed]
    assert _replay_batch(samples, [0], {}, 0, "cpu") is None  # the run replays nothing: no extra pass
    dummy = _replay_batch(samples, [0], {1: [-1.0, -1.0]}, 0, "cpu")  # the run replays, this batch has none
    batch = collate([plain], 0, [[-1.0, -1.0]])
    _, parts = batch_loss(model, batch, MStepConfig(cot_replay_weight=1.0), dummy)
    assert dummy["rl_mask"].sum() == 0 and parts["replay_loss"].item() == 0.0
    real = _replay_batch(samples, [0, 1], {1: [-1.0, -1.0]}, 0, "cpu")
    assert real["input_ids"].tolist() == [[9, 7, 8]]


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_negative_weight_scales_only_negative_advantages(tiny_model_dir, tiny, tmp_path, weight):
    _, tok = tiny
    model = _fresh(tiny_model_dir)
    records = [
        make_record(tok, "What is 3 * 7?", "3 * 7 = 21. \\boxed{21}", advantage=1.0),
        make_record(tok, "What is 3 * 7?", "3 * 7 = 24. \\boxed{24}", advantage=-1.5, correct=False),
    ]
    batch = _batch_of(model, records, tmp_path)
    batch["ref_logp"] = batch["ref_logp"] - 0.05  # inside the clip range: both rows contribute
    scaled, _ = batch_loss(model, batch, MStepConfig(negative_weight=weight))
    by_hand = {**batch, "advantage": torch.tensor([1.0, -1.5 * weight])}
    expected, _ = batch_loss(model, by_hand, MStepConfig())
    plain, _ = batch_loss(model, batch, MStepConfig())
    assert scaled.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(scaled.item() - plain.item()) > 1e-3  # the negative row's share really changed
