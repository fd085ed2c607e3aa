"""Tiny Qwen2 models for the toy world: tokenizer, config, and pretraining of the shipped checkpoints.

Why: the method must be demonstrable without downloading weights, on a laptop CPU, through the same
code paths a 7B run uses. So the toy model is a standard `Qwen2ForCausalLM` (~2M parameters) with a
`PreTrainedTokenizerFast`, saved with `save_pretrained` and loaded with `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained(dir)` like any model.

Two stages mirror the paper's starting points:
- `base`: from scratch on `toyworld.base_corpus`: mostly CoT, code mostly behind the forced code
  prefix, so that unprompted the model rarely writes code while the prefix elicits it.
- `sft`:  the base fine-tuned on `toyworld.sft_corpus`, a tool-integrated set whose code choice is
  not tied to the family (a coin flip, or with `sft_code_digits` a digit in the question, which the
  shipped toy-sft uses), so the model's choice is unrelated to which mode the problem needs.

Sequences are tokenized the way the rollout engine sees them: prompt, forced prefix and each response
segment (model text up to and including "```output", then the tool's inserted output) are tokenized
on their own and concatenated. The loss covers only model-written tokens: not the prompt, not a
forced prefix, not the tool output.

Deliberately simplified: byte-level BPE trained on the toy corpus itself (digits split one per token);
no chat template (the plain template of `prompts.py` is used in training and inference alike); a
single-process loop with AdamW and a cosine schedule; no checkpoint resume within a stage (a stage
takes minutes).
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from autocode4math import toyworld
from autocode4math.rollout.engine import encode, encode_prompt, response_tokens

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE over `texts` with each digit its own token, wrapped with eos/pad tokens."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


@dataclass
class ToyModelConfig:
    """Shape of the tiny Qwen2 model."""

    hidden_size: int = 192
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (query and key/value alike)."""
    intermediate_size: int = 512
    """Width of the MLP."""
    max_positions: int = 512
    """Longest sequence the model is built for (prompt + full solution)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if min(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size, self.max_positions) < 1:
            raise ValueError("all ToyModelConfig sizes must be positive")


def build_model(config: ToyModelConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2ForCausalLM sized by `config` for `tokenizer`'s vocabulary."""
    hf_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(hf_config)


def encode_demo(tokenizer: PreTrainedTokenizerFast, demo: toyworld.Demo) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a demo, tokenized as the rollout engine records it; labels -100 off the loss."""
    context = encode_prompt(tokenizer, demo.prompt) + encode(tokenizer, demo.prefix)
    response, mask, _ = response_tokens(tokenizer, demo.response, tokenizer.eos_token_id)
    return context + response, [-100] * len(context) + [t if m else -100 for t, m in zip(response, mask, strict=True)]


@dataclass
class PretrainConfig:
    """One pretraining stage of a toy checkpoint."""

    stage: str = "base"
    """`base` (from scratch on the CoT-heavy corpus) or `sft` (fine-tune on the tool-integrated set)."""
    out_dir: str = ""
    """Where to save; default: runs/toy-<stage>. A directory holding a checkpoint (the shipped ones in the
    package's checkpoints/ included) is replaced only by `pretrain(..., overwrite=True)`."""
    init_from: str = ""
    """Checkpoint to start from: the sft stage defaults to the package's toy-base; a base stage given one
    continues its pretraining (with its tokenizer) instead of starting from scratch."""
    seed: int = 0
    """Seeds the corpus, the initialisation and the batch order."""
    n_examples: int = 40000
    """Demonstrations generated for the stage."""
    steps: int = 1000
    """Optimizer steps (the shipped base took 3400 + 2000 steps of 32 sequences; 1000 only learns the formats)."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate (linear warmup, cosine decay to a tenth)."""
    warmup_steps: int = 50
    """Steps of linear warmup."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_minutes: float = 0.0
    """Stop early after this many minutes of training (0: no limit)."""
    threads: int = 2
    """torch CPU threads."""
    vocab_size: int = 512
    """BPE vocabulary (base stage only)."""
    sft_mode_share: float = 0.0
    """Share of sft demos that are cot-prompt CoT or code-mode demos instead of auto-prompt ones."""
    sft_code_rate: float = 0.5
    """Chance that an sft demo uses code, independent of its family (when `sft_code_digits` is empty)."""
    sft_code_digits: str = ""
    """If set (e.g. "7"), an auto sft demo uses code exactly when its question contains one of these digits."""
    log_every: int = 50
    """Steps between progress lines."""
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    """Model shape (base stage only)."""
    mix: toyworld.BaseMix = field(default_factory=toyworld.BaseMix)
    """Composition of the base corpus."""

    def __post_init__(self) -> None:
        if self.stage not in ("base", "sft"):
            raise ValueError(f"stage must be 'base' or 'sft', got {self.stage!r}")
        if min(self.n_examples, self.steps, self.batch_size, self.threads, self.log_every) < 1:
            raise ValueError("n_examples, steps, batch_size, threads and log_every must be positive")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0, got {self.max_minutes}")
        toyworld.check_code_digits(self.sft_code_digits)

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / f"toy-{self.stage}"


def _corpus(config: PretrainConfig) -> list[toyworld.Demo]:
    exclude = toyworld.held_out_questions()
    if config.stage == "base":
        return toyworld.base_corpus(config.n_examples, config.seed, config.mix, exclude)
    return toyworld.sft_corpus(
        config.n_examples,
        config.seed + 7919,
        config.sft_code_rate,
        exclude,
        config.sft_mode_share,
        config.sft_code_digits,
    )


def _start(config: PretrainConfig, corpus: list[toyworld.Demo]) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    if config.stage == "sft" or config.init_from:
        init = config.init_from or str(CHECKPOINT_DIR / "toy-base")
        return AutoModelForCausalLM.from_pretrained(init), AutoTokenizer.from_pretrained(init)
    texts = [d.prompt + d.prefix + d.response for d in corpus]
    tokenizer = train_tokenizer(texts, config.vocab_size)
    return build_model(config.model, tokenizer), tokenizer


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/labels, each [batch, longest]."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _length_bucketed(rng: random.Random, rows: list, batch_size: int, pool: int = 8) -> list[list]:
    """`pool` random batches regrouped by length, in random order: less padding, same data distribution."""
    drawn = sorted(rng.sample(rows, min(len(rows), batch_size * pool)), key=lambda r: len(r[0]))
    batches = [drawn[i : i + batch_size] for i in range(0, len(drawn), batch_size)]
    rng.shuffle(batches)
    return batches


def _lr_at(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(config: PretrainConfig, log: Callable[[str], None] = print, overwrite: bool = False) -> Path:
    """Train one stage and save model + tokenizer + MADE_BY.md + train_log.jsonl in the output dir.

    An output directory that already holds a checkpoint is refused (before any training) unless `overwrite`.
    """
    from autocode4math.config import ConfigError

    out = config.resolved_out_dir()
    if (out / "config.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a checkpoint; give another --out-dir, or --overwrite to replace it")
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    corpus = _corpus(config)
    model, tokenizer = _start(config, corpus)
    rows = [encode_demo(tokenizer, d) for d in corpus]
    log(
        f"stage {config.stage}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(rows)} demos, "
        f"mean {sum(len(r[0]) for r in rows) / len(rows):.0f} tokens, longest {max(len(r[0]) for r in rows)}"
    )
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = random.Random(config.seed)
    model.train()
    start, tokens, history = time.time(), 0, []
    batches: list[list[tuple[list[int], list[int]]]] = []
    for step in range(config.steps):
        if not batches:
            batches = _length_bucketed(order, rows, config.batch_size)
        batch = _batch(batches.pop(), tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        elapsed = time.time() - start
        if step % config.log_every == 0 or step == config.steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(elapsed, 1)})
            log(
                f"step {step + 1}/{config.steps}  loss {loss.item():.4f}  {tokens / elapsed:,.0f} tok/s  "
                f"{elapsed / 60:.1f} min (eta {elapsed / (step + 1) * (config.steps - step - 1) / 60:.1f} min)"
            )
        if config.max_minutes and elapsed > config.max_minutes * 60:
            log(f"stopping at step {step + 1}: max_minutes={config.max_minutes} reached")
            break
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_records(out, config, history, time.time() - start)
    log(f"saved {out}")
    return out


def _write_records(out: Path, config: PretrainConfig, history: list[dict], seconds: float) -> None:
    with (out / "train_log.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    machine = f"{platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}"
    made_by = [
        f"# toy-{config.stage}",
        "",
        "Made by:",
        "",
        "```",
        "autocode toy pretrain " + " ".join(sys.argv[3:]) if "toy" in sys.argv else " ".join(sys.argv),
        "```",
        "",
        f"- seed: {config.seed}",
        f"- steps run: {history[-1]['step'] + 1 if history else 0} of {config.steps}, batch {config.batch_size}",
        f"- final logged loss: {history[-1]['loss'] if history else 'n/a'}",
        f"- training time: {seconds / 60:.1f} min on {config.threads} CPU thread{'s' if config.threads > 1 else ''}",
        f"- machine: {machine}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "Resolved config:",
        "",
        "```json",
        json.dumps(asdict(config), indent=2),
        "```",
        "",
    ]
    (out / "MADE_BY.md").write_text("\n".join(made_by), encoding="utf-8")
