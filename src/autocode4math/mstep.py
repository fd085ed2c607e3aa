"""M-step (off-policy RL): clipped ratio x advantage on the trajectories, cross-entropy on the code decision.

The paper's Eq. 6, written as a loss to minimise over a batch of E-step training records:
    L = - mean_i [ policy objective of trajectory i ] + w * mean_i [ decision loss of i ]
- Policy term: per response token t the ratio r_t = pi_theta(y_t|.) / pi_ref(y_t|.), with pi_ref the
  checkpoint that generated the data, its log-probs recomputed by a no-grad forward pass before
  training (sampling log-probs of a serving engine are not trusted). Default: PPO's
  min(r_t A, clip(r_t, 1-eps, 1+eps) A), averaged over the trajectory's tokens, then over trajectories.
  Options: the paper's literal clip(r) * A (`clip_form="literal"`) and one ratio per sequence
  (`ratio_level="sequence"`, r = prod_t r_t). Only model-written response tokens count: the prompt,
  the forced prefix (code prefix, partial solution) and tool output (response_mask 0) are masked.
- Decision term: pi_theta(c=1|x) is the probability of the code-prefix tokens after the decision
  context (prompt, plus the partial solution for mid-reasoning rollouts). c=1 samples add
  -log p(prefix|x), c=0 samples add -log(1 - p(prefix|x)) (computed stably); samples whose decision
  is not expressed by the prefix (code written unprompted) add nothing.

Training runs through HF accelerate, so one code path serves CPU, one GPU, and `accelerate launch`
with DDP/FSDP/DeepSpeed: bf16 autocast on GPU, gradient accumulation, gradient checkpointing, LoRA.
Batches are length-bucketed (sorted within windows, then shuffled); each process takes every
world-th micro-batch. A training-state checkpoint (model, optimizer, scheduler, RNG, step) is saved
every `save_every` steps, each into a new directory that is marked complete only once fully written,
and a rerun resumes at the newest complete one (a kill at any moment leaves one to resume from).
A rerun checks the stage's fingerprint first (fingerprint.py): results made with another config,
another starting model or other data are never continued.

Deliberately simplified: padded (not packed) batches; full-vocabulary log-softmax in float32 (fine
for small vocabularies, memory-heavy for 150k-token ones); LoRA is merged before the final save and
not supported together with FSDP; no value model (the advantage comes from the E-step).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from autocode4math.fingerprint import Stage, file_digest, guard, model_identity, settings_of
from autocode4math.io import DataError, JsonlAppender, read_done, read_jsonl, replacing, write_json, write_jsonl

TRAIN_KEYS = ("prompt_ids", "prefix_ids", "response_ids", "response_mask", "advantage", "c")


@dataclass
class MStepConfig:
    """How the M-step optimises."""

    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "cosine"
    """`cosine` (to min_lr_ratio * lr) or `constant`, both after linear warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a share of lr."""
    epochs: float = 1
    """Passes over the training set; a fractional part trains a last pass on that share of its shuffled order."""
    max_steps: int = 0
    """If > 0, stop after this many optimizer steps (the schedule spans them)."""
    micro_batch_size: int = 4
    """Trajectories per forward pass and process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step and process."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    clip_eps: float = 0.2
    """Ratio clip range eps: [1 - eps, 1 + eps]."""
    clip_form: str = "ppo"
    """`ppo`: min(rA, clip(r)A); `literal`: the paper's clip(r)A."""
    ratio_level: str = "token"
    """`token`: one ratio per token; `sequence`: one per trajectory (product over its tokens)."""
    decision_weight: float = 1.0
    """Weight w of the decision cross-entropy term."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to pi_ref on the trained tokens (the k3 estimator, averaged like the policy term)."""
    cot_anchor_weight: float = 0.0
    """Weight of the cot anchor: a c=0 decision term under the cot prompt, -log(1 - p(code prefix | cot
    prompt)), for each sample that carries `anchor_context_ids` (the E-step adds them). The cot instruction
    fixes the decision, so the decision learned on auto prompts must not leak into it (docs/method.md)."""
    cot_replay_weight: float = 0.0
    """Weight of the cot replay: every c=0 sample from the start of a question (no forced prefix, no code) is
    also trained, with its advantage, under the same question's cot prompt (`anchor_context_ids`), against
    pi_ref in that context. The cot instruction fixes c = 0, so a text trajectory is cot-mode behaviour; the
    term is added as `cot_replay_weight` x its policy loss, summed over the replayed rows and divided by the
    batch size (a replayed row weighs what its original does). 0 trains the auto prompt only (the paper)."""
    negative_weight: float = 1.0
    """Scale of negative advantages in the policy term: A < 0 becomes negative_weight x A (1: the paper's
    objective; 0: train on the trajectories that beat their state's mean only). Wrong trajectories share
    most of their tokens with right ones; pushing all of them down moves probability off confident tokens
    (docs/method.md)."""
    objective: str = "rl"
    """`rl`: the clipped off-policy objective above; `sft`: the token-mean negative log-likelihood of the
    model-written response tokens (the SFT baseline: advantages unused; ratio statistics still logged)."""
    bucket_window: int = 16
    """Micro-batches per length-sorting window (1: no bucketing)."""
    ref_batch_size: int = 8
    """Trajectories per no-grad forward pass when computing pi_ref log-probs."""
    bf16: bool = True
    """bf16 mixed precision on GPU (ignored on CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights."""
    lora_alpha: int = 16
    """LoRA scaling alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names LoRA adapts."""
    save_every: int = 50
    """Save a training-state checkpoint every this many steps (and at the end)."""
    seed: int = 0
    """Seeds batch order and initialisation of LoRA weights."""

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "epochs": self.epochs > 0,
            "max_steps": self.max_steps >= 0,
            "micro_batch_size": self.micro_batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "max_grad_norm": self.max_grad_norm >= 0,
            "clip_eps": 0 < self.clip_eps < 1,
            "decision_weight": self.decision_weight >= 0,
            "cot_anchor_weight": self.cot_anchor_weight >= 0,
            "cot_replay_weight": self.cot_replay_weight >= 0,
            "negative_weight": self.negative_weight >= 0,
            "kl_coef": self.kl_coef >= 0,
            "bucket_window": self.bucket_window >= 1,
            "ref_batch_size": self.ref_batch_size >= 1,
            "lora_r": self.lora_r >= 0,
            "save_every": self.save_every >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid values for {bad}: {[getattr(self, b) for b in bad]}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.clip_form not in ("ppo", "literal"):
            raise ValueError(f"clip_form must be 'ppo' or 'literal', got {self.clip_form!r}")
        if self.objective not in ("rl", "sft"):
            raise ValueError(f"objective must be 'rl' or 'sft', got {self.objective!r}")
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(f"ratio_level must be 'token' or 'sequence', got {self.ratio_level!r}")


# --- losses: pure functions on tensors ---


def policy_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantage: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
    clip_form: str = "ppo",
    ratio_level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped off-policy loss. logp, ref_logp, mask: [B, T]; advantage: [B]. Returns (loss, stats).

    Token level: each trajectory's loss is the mean over its masked tokens of -obj(r_t, A), and the
    batch loss the mean over trajectories. Sequence level: r = exp(sum_t mask * (logp - ref_logp)).
    stats: clip_frac (share of ratios outside [1-eps, 1+eps]) and approx_kl (mean over masked
    tokens of r - 1 - log r, an estimate of KL(pi_ref || pi_theta)), both without gradient.
    """
    mask = mask.to(logp.dtype)
    log_ratio = (logp - ref_logp) * mask
    if ratio_level == "sequence":
        log_ratio, adv, weight = log_ratio.sum(-1), advantage, torch.ones_like(advantage)
    else:
        adv, weight = advantage.unsqueeze(-1), mask
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps) * adv
    obj = torch.minimum(ratio * adv, clipped) if clip_form == "ppo" else clipped
    loss = -obj.mean() if ratio_level == "sequence" else -trajectory_mean(obj, mask)
    with torch.no_grad():
        outside = ((ratio < 1 - eps) | (ratio > 1 + eps)).to(logp.dtype)
        clip_frac = (outside * weight).sum() / weight.sum().clamp(min=1)
        token_lr = (logp - ref_logp) * mask
        kl = ((torch.exp(token_lr) - 1 - token_lr) * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"clip_frac": clip_frac, "approx_kl": kl}


def trajectory_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each trajectory's masked tokens, then over trajectories (an empty mask counts 0). [B, T] -> []."""
    return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood, mean over each trajectory's masked tokens, then over trajectories. [B, T] -> []."""
    return -trajectory_mean(logp, mask.to(logp.dtype))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi_theta || pi_ref) by the k3 estimator, exp(d) - d - 1 with d = ref_logp - logp per token (>= 0,
    unbiased, low variance); mean over each trajectory's masked tokens, then over trajectories. [B, T] -> []."""
    mask = mask.to(logp.dtype)
    d = (ref_logp - logp) * mask
    return trajectory_mean(torch.exp(d) - d - 1, mask)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both ends (Maechler's split at -log 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def decision_loss(prefix_logp: torch.Tensor, c: torch.Tensor, has_decision: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the code decision, mean over the batch. All inputs: [B].

    prefix_logp = log p(code prefix | decision context) = log pi(c=1|x). c=1 adds -prefix_logp, c=0
    adds -log(1 - exp(prefix_logp)); rows with has_decision 0 add 0. The log-prob is capped just
    below 0 so that a certain prefix gives a large finite loss for c=0 rather than infinity.
    """
    lp = prefix_logp.clamp(max=-1e-6)
    per = torch.where(c.bool(), -lp, -log1mexp(lp))
    return (per * has_decision.to(per.dtype)).mean()


# --- data ---


@dataclass
class Sample:
    """One training trajectory, tokenized."""

    ids: list[int]
    """prompt + prefix + response tokens."""
    start: int
    """Index in `ids` of the first response token."""
    mask: list[int]
    """response_mask: 1 for model-written response tokens."""
    advantage: float
    c: int
    decision: list[int]
    """Decision context + code-prefix tokens ([] when the sample has no decision term)."""
    n_decision: int
    """Number of code-prefix tokens at the end of `decision` (0: no decision term)."""
    correct: bool
    used_code: bool
    key: str
    anchor: list[int] = field(default_factory=list)
    """Cot prompt + code-prefix tokens of the cot anchor ([] when the record has none)."""
    n_anchor: int = 0
    """Number of code-prefix tokens at the end of `anchor` (0: no anchor term)."""
    replay: Sample | None = None
    """The same response under the cot prompt, for the cot replay (None when the sample is not replayed)."""


def load_samples(path: str | Path) -> list[Sample]:
    """Read E-step training records (train.jsonl) into Samples; bad rows raise DataError naming the line."""
    out = []
    for n, r in enumerate(read_jsonl(path), start=1):
        missing = [k for k in TRAIN_KEYS if k not in r]
        if missing:
            raise DataError(f"{path}:{n}: training record lacks {missing} (is this an E-step train.jsonl?)")
        if len(r["response_mask"]) != len(r["response_ids"]):
            raise DataError(f"{path}:{n}: response_mask and response_ids differ in length")
        if not r["prompt_ids"]:
            raise DataError(f"{path}:{n}: empty prompt_ids")
        ctx, dec = list(r.get("decision_context_ids", [])), list(r.get("decision_ids", []))
        if dec and not ctx:
            raise DataError(f"{path}:{n}: decision_ids without decision_context_ids")
        anchor_ctx, anchor_ids = list(r.get("anchor_context_ids", [])), list(r.get("anchor_ids", []))
        if bool(anchor_ctx) != bool(anchor_ids):
            raise DataError(f"{path}:{n}: anchor_context_ids and anchor_ids must be given together")
        prefix = list(r["prompt_ids"]) + list(r["prefix_ids"])
        sample = Sample(
            ids=prefix + list(r["response_ids"]),
            start=len(prefix),
            mask=[int(m) for m in r["response_mask"]],
            advantage=float(r["advantage"]),
            c=int(r["c"]),
            decision=ctx + dec,
            n_decision=len(dec),
            anchor=anchor_ctx + anchor_ids,
            n_anchor=len(anchor_ids),
            correct=bool(r.get("correct", False)),
            used_code=bool(r.get("used_code", False)),
            key=str(r.get("key", n)),
        )
        out.append(replace(sample, replay=cot_replay(sample, anchor_ctx, r)))
    if not out:
        raise DataError(f"{path}: no training records")
    return out


def cot_replay(sample: Sample, cot_prompt: list[int], record: dict[str, Any]) -> Sample | None:
    """`sample`'s response under the cot prompt, when it is cot-mode behaviour: c = 0, from the start of the
    question (no forced prefix or partial solution), no code executed and not already under the cot prompt;
    else None."""
    if not cot_prompt or sample.c != 0 or record["prefix_ids"] or sample.used_code:
        return None
    if list(record["prompt_ids"]) == list(cot_prompt):  # generated under the cot prompt (c0_mode=cot): trained as is
        return None
    response = sample.ids[sample.start :]
    return replace(sample, ids=list(cot_prompt) + response, start=len(cot_prompt), decision=[], n_decision=0,
                   anchor=[], n_anchor=0, key=f"{sample.key}#cot")  # fmt: skip


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows to their longest: (ids, attention mask), both [N, W]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
    return ids, attention


def collate(samples: Sequence[Sample], pad_id: int, ref: Sequence[Sequence[float]] | None = None) -> dict:
    """Pad B samples into trajectory rows [B, W] and decision rows [B, Wd] (two forward passes, little padding).

    Masks are aligned with next-token targets (position t scores token t + 1): rl_mask and ref_logp
    [B, W-1], dec_mask [B, Wd-1]; advantage, c, has_decision, has_anchor: [B]. Cot-anchor rows follow the
    decision rows in dec_input_ids ([2B, Wd] then), so one forward pass scores both.
    """
    ids, attention = _pad([s.ids for s in samples], pad_id)
    b = len(samples)
    rows = [(s.decision, s.n_decision) for s in samples]
    if any(s.n_anchor for s in samples):
        rows += [(s.anchor, s.n_anchor) for s in samples]
    dec_ids, dec_attention = _pad([row or [pad_id, pad_id] for row, _ in rows], pad_id)
    rl_mask, ref_logp = torch.zeros((b, ids.shape[1] - 1)), torch.zeros((b, ids.shape[1] - 1))
    dec_mask = torch.zeros((len(rows), dec_ids.shape[1] - 1))
    for i, s in enumerate(samples):
        n = len(s.mask)
        rl_mask[i, s.start - 1 : s.start - 1 + n] = torch.tensor(s.mask, dtype=torch.float)
        if ref is not None:
            ref_logp[i, s.start - 1 : s.start - 1 + n] = torch.tensor(ref[i], dtype=torch.float)
    for i, (row, n_prefix) in enumerate(rows):
        if n_prefix:
            dec_mask[i, len(row) - 1 - n_prefix : len(row) - 1] = 1
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "dec_input_ids": dec_ids,
        "dec_attention_mask": dec_attention,
        "rl_mask": rl_mask,
        "ref_logp": ref_logp,
        "dec_mask": dec_mask,
        "advantage": torch.tensor([s.advantage for s in samples]),
        "c": torch.tensor([s.c for s in samples]),
        "has_decision": torch.tensor([float(s.n_decision > 0) for s in samples]),
        "has_anchor": torch.tensor([float(s.n_anchor > 0) for s in samples]),
    }


def token_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every position: [N, W-1], float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def batch_loss(
    model: Any, batch: dict, config: MStepConfig, replay: dict | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward the trajectory rows and the decision rows of a collated batch; return the loss and its parts.

    `replay`: the collated cot-replay rows of the batch's samples that have one (docs/method.md).
    """
    logp = token_logps(model, batch["input_ids"], batch["attention_mask"])
    rl, stats = _policy_term(logp, batch, config)
    replayed = torch.zeros_like(rl)
    if replay is not None:
        replay_logp = token_logps(model, replay["input_ids"], replay["attention_mask"])
        replayed = _policy_term(replay_logp, replay, config)[0] * (len(replay["c"]) / len(batch["c"]))
    dec_logp = token_logps(model, batch["dec_input_ids"], batch["dec_attention_mask"])
    prefix_logp = (dec_logp * batch["dec_mask"]).sum(-1)
    b = len(batch["c"])
    dec = decision_loss(prefix_logp[:b], batch["c"], batch["has_decision"])
    anchor = torch.zeros_like(dec)
    if len(prefix_logp) > b:  # cot-anchor rows: the cot instruction means c = 0
        anchor = decision_loss(prefix_logp[b:], torch.zeros_like(batch["c"]), batch["has_anchor"])
    kl = kl_penalty(logp, batch["ref_logp"], batch["rl_mask"]) if config.kl_coef else torch.zeros_like(dec)
    loss = rl + config.decision_weight * dec + config.cot_anchor_weight * anchor + config.kl_coef * kl
    loss = loss + config.cot_replay_weight * replayed
    parts = {"rl_loss": rl, "decision_loss": dec, "anchor_loss": anchor, "kl_loss": kl, "replay_loss": replayed}
    return loss, {**{k: v.detach() for k, v in parts.items()}, **stats}


def _policy_term(logp: torch.Tensor, batch: dict, config: MStepConfig) -> tuple[torch.Tensor, dict]:
    """The clipped policy loss of a collated batch (or the SFT loss with objective `sft`), and its stats."""
    adv = batch["advantage"]
    if config.negative_weight != 1.0:
        adv = torch.where(adv < 0, adv * config.negative_weight, adv)
    rl, stats = policy_loss(logp, batch["ref_logp"], adv, batch["rl_mask"], config.clip_eps,
                            config.clip_form, config.ratio_level)  # fmt: skip
    if config.objective == "sft":
        rl = sft_loss(logp, batch["rl_mask"])
    return rl, stats


def micro_batches(
    samples: Sequence[Sample], size: int, window: int, seed: int, epoch: int, keep: int | None = None
) -> list[list[int]]:
    """One epoch's micro-batches of sample indices: shuffled, sorted by length within windows, shuffled again.

    `keep` limits the epoch to the first `keep` samples of its shuffled order (a fractional last epoch).
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(samples)))
    rng.shuffle(order)
    order = order[:keep]
    span = size * window
    batches = []
    for lo in range(0, len(order), span):
        chunk = sorted(order[lo : lo + span], key=lambda i: len(samples[i].ids))
        batches += [chunk[j : j + size] for j in range(0, len(chunk), size)]
    rng.shuffle(batches)
    return batches


# --- pi_ref log-probs ---


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """Hash of the trajectories' tokens, so stored reference log-probs are never reused for other data."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.key, s.ids, s.mask]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def reference_logps(model: Any, samples: Sequence[Sample], pad_id: int, batch_size: int, accelerator: Any) -> list:
    """Per-sample log-probs of the response tokens under `model` (the generating checkpoint), no grad.

    Each process scores every world-th batch (padded with repeats so all run the same number of
    forward passes, as sharded models need); the results are gathered on all processes.
    """
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = [list(range(i, min(i + batch_size, len(samples)))) for i in range(0, len(samples), batch_size)]
    per_rank = math.ceil(len(batches) / world)
    mine = [batches[(rank + world * j) % len(batches)] for j in range(per_rank)]
    found: dict[int, list[float]] = {}
    for idx in mine:
        batch = collate([samples[i] for i in idx], pad_id)
        with accelerator.autocast():
            logp = token_logps(
                model, batch["input_ids"].to(accelerator.device), batch["attention_mask"].to(accelerator.device)
            )
        for row, i in enumerate(idx):
            s = samples[i]
            found[i] = logp[row, s.start - 1 : s.start - 1 + len(s.mask)].cpu().tolist()
    if world > 1:
        from accelerate.utils import gather_object

        for part in gather_object([found]):
            found.update(part)
    return [found[i] for i in range(len(samples))]


def load_or_compute_ref(model, samples, pad_id, config: MStepConfig, accelerator, path: Path) -> list:
    """Reference log-probs from `path` if they were computed for these samples, else computed and stored."""
    fingerprint = data_fingerprint(samples)
    if path.exists():
        stored = torch.load(path, weights_only=True)
        if stored.get("fingerprint") == fingerprint:
            return stored["logps"]
    logps = reference_logps(model, samples, pad_id, config.ref_batch_size, accelerator)
    if accelerator.is_main_process:
        with replacing(path) as tmp:
            torch.save({"fingerprint": fingerprint, "logps": logps}, tmp)
    accelerator.wait_for_everyone()
    return logps


# --- training ---


def lr_lambda(step: int, config: MStepConfig, total: int) -> float:
    """Multiplier of lr at `step`: linear warmup, then constant or cosine down to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_plan(samples: Sequence[Sample], config: MStepConfig, world: int, rank: int) -> tuple[int, Callable]:
    """(total optimizer steps, step -> this process's micro-batches for that step).

    Steps take `world * grad_accum` micro-batches at a time, in order through the epochs' shuffled plans, so
    no micro-batch is dropped: an epoch's leftover micro-batches share a step with the next epoch's first
    ones, and only the last step may be short. A fractional `epochs` ends with a pass over that share of a
    shuffled order, so `epochs * len(samples)` trajectories are trained (rounded to a whole one). A short
    last step is filled from a further epoch's plan only as far as every process gets the same number of
    micro-batches (a distributed step needs the same forward and backward passes on every process: sharded
    models gather their weights in each). With `max_steps`, the epochs
    run on, whole, until that many steps.
    """
    per_step, size = world * config.grad_accum, config.micro_batch_size
    n_batches = math.ceil(len(samples) / size)
    if n_batches < per_step:
        raise ValueError(
            f"{len(samples)} samples make {n_batches} micro-batches of {size}, fewer than one "
            f"optimizer step needs ({world} processes x grad_accum {config.grad_accum})"
        )
    full, rest = divmod(round(config.epochs * len(samples)), len(samples))
    end = config.max_steps * per_step if config.max_steps else full * n_batches + math.ceil(rest / size)
    partial = full if rest and not config.max_steps else None  # the epoch cut to `rest` samples
    plans: dict[int, list[list[int]]] = {}

    def plan(epoch: int) -> list[list[int]]:
        if epoch not in plans:
            plans.clear()  # a step spans at most two epochs: keep only what it needs
            keep = rest if epoch == partial else None
            plans[epoch] = micro_batches(samples, size, config.bucket_window, config.seed, epoch, keep)
        return plans[epoch]

    def micro_batch(g: int) -> list[int]:
        if g >= end:  # filling a short last step: the epoch after the last one
            return plan(full + 1)[(g - end) % n_batches]
        return plan(g // n_batches)[g % n_batches]

    def batches_for(step: int) -> list[list[int]]:
        lo = step * per_step
        count = world * math.ceil(max(min(lo + per_step, end) - lo, 1) / world)  # the same for every process
        return [micro_batch(g) for g in range(lo, lo + count)][rank::world]

    return math.ceil(end / per_step), batches_for


def _load_model(model_dir: str, config: MStepConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def _adapt(model: Any, config: MStepConfig) -> Any:
    """Apply LoRA and gradient checkpointing as configured."""
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora_r:
            model.enable_input_require_grads()
    return model


def _to(batch: dict, device: Any) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _replay_batch(samples: list[Sample], idx: list[int], ref: dict[int, list[float]], pad_id: int,
                  device: Any) -> dict | None:  # fmt: skip
    """The collated cot-replay rows of the micro-batch `idx`; None when the run replays nothing.

    A micro-batch without a replayed sample in a run that replays gets one fully masked dummy row (loss 0),
    so every process makes the same forward passes (sharded models gather weights in each).
    """
    if not ref:
        return None
    have = [i for i in idx if samples[i].replay is not None]
    if not have:
        dummy = Sample([pad_id, pad_id], 1, [0], 0.0, 0, [], 0, False, False, "dummy")
        return _to(collate([dummy], pad_id, [[0.0]]), device)
    return _to(collate([samples[i].replay for i in have], pad_id, [ref[i] for i in have]), device)


def _step_metrics(parts: list[dict], samples: list[Sample], accelerator: Any) -> dict[str, float]:
    """Mean of the micro-batches' loss parts and the batch's code rate and accuracy, averaged over processes."""
    keys = ("loss", "rl_loss", "decision_loss", "anchor_loss", "kl_loss", "replay_loss", "clip_frac", "approx_kl")
    local = [sum(float(p[k]) for p in parts) / len(parts) for k in keys]
    local += [sum(s.used_code for s in samples) / len(samples), sum(s.correct for s in samples) / len(samples)]
    values = accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="mean").tolist()
    return dict(zip((*keys, "code_rate", "accuracy"), values, strict=True))


def _checkpoint_files(directory: Path) -> dict[str, int]:
    """{relative path: size} of every file under a checkpoint directory."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def _is_complete(checkpoint: Path) -> bool:
    """A checkpoint is complete once its trainer.json exists and every file it lists has the listed size."""
    try:
        files = json.loads((checkpoint / "trainer.json").read_text())["files"]
        return all((checkpoint / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-", 1)[1])


def latest_checkpoint(out: Path) -> Path | None:
    """The complete training-state checkpoint with the highest step under out/state, or None."""
    found = [d for d in (out / "state").glob("step-*") if d.is_dir() and _is_complete(d)]
    return max(found, key=_step_of) if found else None


def _drop_other_checkpoints(out: Path, keep: Path | None) -> None:
    """Delete every checkpoint directory but `keep`: older ones and half-written ones."""
    for d in (out / "state").glob("step-*"):
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


def _save_state(accelerator: Any, out: Path, step: int) -> None:
    """Add the checkpoint out/state/step-N, then drop the previous one.

    Never delete first: the new checkpoint is written into its own directory, every file fsynced,
    and marked complete last by trainer.json (which lists the files and their sizes), so a kill at
    any moment leaves the previous complete checkpoint in place; resume takes the newest complete one.
    """
    target = out / "state" / f"step-{step:08d}"
    if accelerator.is_main_process and target.exists():  # a half-written attempt at this step
        shutil.rmtree(target)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = _checkpoint_files(target)
        for name in files:
            with (target / name).open("rb+") as f:
                os.fsync(f.fileno())
        write_json(target / "trainer.json", {"step": step, "files": files})
        _drop_other_checkpoints(out, target)
    accelerator.wait_for_everyone()


def _resume(accelerator: Any, out: Path, metrics_path: Path) -> int:
    """Load the newest complete checkpoint, if any; cut logged metrics back to its step; return that step.

    Half-written checkpoints are deleted. Metrics rows past the checkpoint (logged by a run killed
    before it could save again) are dropped, so the rerun logs each step exactly once.
    """
    checkpoint = latest_checkpoint(out)
    step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        step = _step_of(checkpoint)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _drop_other_checkpoints(out, checkpoint)
        if metrics_path.exists():
            write_jsonl(metrics_path, [r for r in read_done(metrics_path) if r["step"] <= step])
    return step


NOT_IN_FINGERPRINT = ("save_every", "ref_batch_size", "gradient_checkpointing")
"""MStepConfig fields that cannot change the trained model (checkpoint frequency, memory savers)."""
OUTPUTS = (
    *("model", "state", "metrics.jsonl", "tb", "ref_logps.pt*", "ref_logps_replay.pt*", "done.json"),
    *("mstep_config.yaml", "*.tmp"),
    *("launch_mstep.yaml", "launch_fingerprint.json", "launch.log"),
)
"""What the M-step writes in its directory (all discarded by `overwrite`)."""


def mstep_stage(out: Path, settings: dict[str, Any]) -> Stage:
    """The M-step's fingerprinted stage in `out`."""
    return Stage(out, "M-step", settings, OUTPUTS)


def fingerprint_settings(model: str | Path, data: str | Path, config: MStepConfig) -> dict[str, Any]:
    """What determines a standalone M-step's output: its config, the starting model and the data, by content."""
    inputs = {"model": model_identity(str(model)), "data": file_digest(data)}
    return {**settings_of(config, leave_out=NOT_IN_FINGERPRINT), **inputs}


def run_mstep(
    model: str | Path,
    data: str | Path,
    config: MStepConfig,
    out_dir: str | Path,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    fingerprint: dict[str, Any] | None = None,
) -> Path:
    """Train `model` (a checkpoint directory, also pi_ref) on E-step records `data`; return out_dir/model.

    Writes under out_dir: fingerprint.json, mstep_config.yaml, ref_logps.pt, metrics.jsonl, tb/
    (TensorBoard), state/step-N/ (training-state checkpoint) and model/ (save_pretrained, with
    tokenizer). Running again resumes at the last complete checkpoint; after completion it returns at
    once. Results made under another fingerprint (`fingerprint_settings`, or `fingerprint` when the
    caller knows its inputs' identities) raise ResumeError, or are discarded with `overwrite`.
    `on_step(step, metrics)` is called after every optimizer step (on every process).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    from autocode4math.config import save_config

    out = Path(out_dir)
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 and torch.cuda.is_available() else "no")
    if accelerator.is_main_process:
        guard(mstep_stage(out, fingerprint or fingerprint_settings(model, data, config)), overwrite)
    accelerator.wait_for_everyone()
    if (out / "model" / "config.json").exists() and (out / "done.json").exists():
        return out / "model"
    if accelerator.distributed_type == DistributedType.DEEPSPEED and config.grad_accum > 1:
        raise ValueError("with DeepSpeed set grad_accum=1 (its engine steps on every backward); raise micro_batch_size")
    set_seed(config.seed)
    if accelerator.is_main_process:
        save_config(config, out / "mstep_config.yaml")
    samples = load_samples(data)
    if not config.cot_anchor_weight:  # no anchor term: skip scoring its rows
        samples = [replace(s, anchor=[], n_anchor=0) for s in samples]
    if not config.cot_replay_weight:
        samples = [replace(s, replay=None) for s in samples]
    replayed = [i for i, s in enumerate(samples) if s.replay is not None]
    net, tokenizer = _load_model(str(model), config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ref = load_or_compute_ref(net.to(accelerator.device), samples, pad_id, config, accelerator, out / "ref_logps.pt")
    ref_replay = {}
    if replayed:  # pi_ref of the replayed responses under the cot prompt
        rows = [samples[i].replay for i in replayed]
        logps = load_or_compute_ref(net, rows, pad_id, config, accelerator, out / "ref_logps_replay.pt")
        ref_replay = dict(zip(replayed, logps, strict=True))
    net = _adapt(net, config)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total, batches_for = step_plan(samples, config, accelerator.num_processes, accelerator.process_index)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, config, total))
    net, optimizer = accelerator.prepare(net, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    metrics_path = out / "metrics.jsonl"
    start = _resume(accelerator, out, metrics_path)
    log, writer = _loggers(accelerator, out, metrics_path)
    net.train()
    for step in range(start, total):
        chunk = batches_for(step)
        parts, seen = [], []
        for k, idx in enumerate(chunk):
            batch = _to(collate([samples[i] for i in idx], pad_id, [ref[i] for i in idx]), accelerator.device)
            replay = _replay_batch(samples, idx, ref_replay, pad_id, accelerator.device)
            sync = contextlib.nullcontext() if k == len(chunk) - 1 else accelerator.no_sync(net)
            with sync:
                loss, part = batch_loss(net, batch, config, replay)
                accelerator.backward(loss / len(chunk))
            parts.append({"loss": loss.detach(), **part})
            seen += [samples[i] for i in idx]
        norm = accelerator.clip_grad_norm_(net.parameters(), config.max_grad_norm) if config.max_grad_norm else None
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"step": step + 1, "lr": lr, **_step_metrics(parts, seen, accelerator)}
        metrics["grad_norm"] = float(norm) if norm is not None else None
        _log(log, writer, metrics, accelerator, progress, total)
        if (step + 1) % config.save_every == 0 or step + 1 == total:
            _save_state(accelerator, out, step + 1)
        if on_step is not None:
            on_step(step + 1, metrics)
    _close(log, writer)
    return _save_model(accelerator, net, tokenizer, config, out, total)


def _loggers(accelerator: Any, out: Path, metrics_path: Path) -> tuple[Any, Any]:
    """metrics.jsonl appender and a TensorBoard writer; tb/ is rebuilt from metrics.jsonl at every start,
    so a resumed run has one event file holding each logged step once."""
    if not accelerator.is_main_process:
        return None, None
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(out / "tb", ignore_errors=True)
    writer = SummaryWriter(str(out / "tb"))
    for row in read_done(metrics_path):
        _scalars(writer, row)
    return JsonlAppender(metrics_path), writer


def _scalars(writer: Any, metrics: dict) -> None:
    for name, value in metrics.items():
        if name != "step" and value is not None:
            writer.add_scalar(f"mstep/{name}", value, metrics["step"])


def _log(log: Any, writer: Any, metrics: dict, accelerator: Any, progress: bool, total: int) -> None:
    if log is None:
        return
    log.write(metrics)
    _scalars(writer, metrics)
    if progress:
        accelerator.print(
            f"step {metrics['step']}/{total} loss {metrics['loss']:.4f} rl {metrics['rl_loss']:.4f} "
            f"dec {metrics['decision_loss']:.4f} clip {metrics['clip_frac']:.3f} kl {metrics['approx_kl']:.5f}"
        )


def _close(log: Any, writer: Any) -> None:
    if log is not None:
        log.close()
        writer.close()


def _save_model(accelerator: Any, net: Any, tokenizer: Any, config: MStepConfig, out: Path, total: int) -> Path:
    """save_pretrained the trained model (LoRA merged) and tokenizer to out/model, then mark done."""
    accelerator.wait_for_everyone()
    target = out / "model"
    unwrapped = accelerator.unwrap_model(net)
    if config.lora_r:
        unwrapped = unwrapped.merge_and_unload()
        state = None
    else:
        state = accelerator.get_state_dict(net)
    unwrapped.save_pretrained(
        target, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(target)
        write_json(out / "done.json", {"steps": total})
    accelerator.wait_for_everyone()
    return target
