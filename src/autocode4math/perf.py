"""FLOPs, bytes and physical bounds for Qwen2-architecture models: what a GPU run could reach at best.

Why: a throughput figure means little alone. Decoding a batch is bound by memory traffic (every step
reads all weights once plus every sequence's KV cache), training by matrix FLOPs. This module counts
both from a model config, so `autocode bench rollout|train` can print the bound beside each measured
figure, and docs/performance.md can give memory estimates for sizes no test machine holds.

Counting conventions (stated, because published MFU figures differ in them):
- A matrix product of [n, k] by [k, m] costs 2·n·k·m FLOPs. Only matrix products are counted: norms,
  activations, RoPE, softmax and biases are left out (well under 1% of the total at these sizes).
- Attention scores and the weighted sum cost 2·2·(heads·head_dim) FLOPs per token per layer per key
  attended. Training counts causal attention exactly: token t attends to t+1 keys, so a sequence of
  length T averages (T+1)/2 keys. Decoding at context c attends to c keys.
- Training = forward + backward = 3 × forward ("model FLOPs"). Gradient checkpointing recomputes the
  forward (4 × forward on the hardware) but MFU is quoted in model FLOPs, as in the PaLM paper.
- The lm_head product (hidden × vocab) is counted; the embedding lookup is not (it is a gather).

Deliberately simplified: memory figures for training are estimates from a per-token activation model
(`train_memory_estimate`, constants explained there), not measurements; the measured peak comes from
`torch.cuda.max_memory_allocated` in `autocode bench train`.

The architectures ship as config.json files (no weights) in presets/models/; `random_model` builds one
with random weights and `bench_tokenizer` trains a byte-level BPE of Qwen2.5's vocabulary size on local
text (cached), so benchmarks run at real size with nothing downloaded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS_DIR = Path(__file__).parent / "presets" / "models"
ARCHS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "tiny")


@dataclass(frozen=True)
class Arch:
    """The shape of a Qwen2 decoder (the fields of its config.json that set FLOPs and bytes)."""

    vocab_size: int
    """Rows of the embedding and of the lm_head."""
    hidden_size: int
    """Width h of the residual stream."""
    intermediate_size: int
    """Width i of the SwiGLU MLP."""
    num_layers: int
    """Decoder layers L."""
    num_heads: int
    """Query heads H."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention)."""
    tie_word_embeddings: bool
    """lm_head shares the embedding matrix."""
    name: str = ""
    """A label (e.g. qwen2.5-0.5b)."""

    def __post_init__(self) -> None:
        sizes = {k: getattr(self, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers")}
        sizes.update(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)
        bad = [k for k, v in sizes.items() if v < 1]
        if bad:
            raise ValueError(f"Arch: {bad} must be >= 1, got {[sizes[b] for b in bad]}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Arch: hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                f"and num_heads by num_kv_heads {self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the K (or V) projection: kv_heads · head_dim."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> Arch:
        """From a config.json dict or a transformers PretrainedConfig."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        try:
            return cls(
                vocab_size=int(get("vocab_size")),
                hidden_size=int(get("hidden_size")),
                intermediate_size=int(get("intermediate_size")),
                num_layers=int(get("num_hidden_layers")),
                num_heads=int(get("num_attention_heads")),
                num_kv_heads=int(get("num_key_value_heads") or get("num_attention_heads")),
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                name=name,
            )
        except TypeError as e:
            raise ValueError(f"config {name or ''} lacks a Qwen2 field ({e})") from None


def arch_config(name: str) -> dict[str, Any]:
    """The shipped config.json of architecture `name` (one of ARCHS) as a dict."""
    path = MODELS_DIR / name / "config.json"
    if name not in ARCHS or not path.exists():
        raise ValueError(f"unknown architecture {name!r}; expected one of {ARCHS}")
    return json.loads(path.read_text())


def load_arch(name: str) -> Arch:
    return Arch.from_config(arch_config(name), name)


# --- parameters ---


def param_counts(a: Arch) -> dict[str, int]:
    """Parameters by part; `total` equals the numel of transformers' Qwen2ForCausalLM built from the config.

    Per layer: q (h·h + h bias), k and v (h·kv + kv bias each), o (h·h, no bias), gate/up/down (3·h·i),
    two RMSNorm weights (2·h). Plus the embedding (V·h), the final norm (h), and an untied lm_head (V·h).
    """
    h, i, kv = a.hidden_size, a.intermediate_size, a.kv_dim
    attention = 2 * h * h + 2 * h * kv + h + 2 * kv
    layer = attention + 3 * h * i + 2 * h
    embedding = a.vocab_size * h
    lm_head = 0 if a.tie_word_embeddings else a.vocab_size * h
    layers = a.num_layers * layer
    total = embedding + layers + h + lm_head
    return {"embedding": embedding, "lm_head": lm_head, "layers": layers, "total": total, "non_embedding": layers + h}


# --- FLOPs ---


def matmul_flops_per_token(a: Arch) -> int:
    """Forward FLOPs per token of the weight matrix products (all layers and the lm_head), attention excluded."""
    h, i, kv = a.hidden_size, a.intermediate_size, a.kv_dim
    per_layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * i)
    return a.num_layers * per_layer + 2 * h * a.vocab_size


def attention_flops_per_token(a: Arch, keys: float) -> float:
    """Forward FLOPs per token of QK^T and softmax·V when the token attends to `keys` positions."""
    return 4.0 * a.num_layers * a.num_heads * a.head_dim * keys


def forward_flops_per_token(a: Arch, keys: float) -> float:
    return matmul_flops_per_token(a) + attention_flops_per_token(a, keys)


def train_flops_per_token(a: Arch, seq_len: float) -> float:
    """Model FLOPs per trained token (forward + backward = 3 × forward), causal attention at mean (T+1)/2 keys."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return 3.0 * forward_flops_per_token(a, (seq_len + 1) / 2)


# --- bytes ---


def kv_bytes_per_token(a: Arch, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token occupies: K and V, every layer, kv_heads · head_dim each."""
    return 2 * a.num_layers * a.kv_dim * dtype_bytes


def decode_weight_bytes(a: Arch, dtype_bytes: int = 2) -> int:
    """Weight bytes one decoding step must read: every layer, the final norm, and one vocab × hidden matrix
    (the lm_head; the embedding lookup reads only the batch's rows, so an untied embedding is not counted)."""
    c = param_counts(a)
    return (c["non_embedding"] + a.vocab_size * a.hidden_size) * dtype_bytes


# --- devices ---


@dataclass(frozen=True)
class Device:
    """Peak figures of an accelerator, from its vendor's datasheet."""

    name: str
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s (datasheets quote twice this 'with sparsity')."""
    mem_bandwidth: float
    """HBM bandwidth, bytes/s."""
    memory_bytes: float
    """HBM capacity, bytes."""
    source: str


_H100 = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100)"
DEVICES = {
    "h100-sxm": Device("NVIDIA H100 SXM 80GB", 989.4e12, 3.35e12, 80e9, _H100),
    "h100-pcie": Device("NVIDIA H100 PCIe 80GB", 756.0e12, 2.0e12, 80e9, _H100),
    "h200": Device(
        "NVIDIA H200 SXM 141GB", 989.4e12, 4.8e12, 141e9, "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200)"
    ),
    "a100-80gb": Device(
        "NVIDIA A100 SXM 80GB", 312e12, 2.039e12, 80e9, "NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100)"
    ),
}


def detect_device(cuda_name: str) -> Device | None:
    """The DEVICES entry for a `torch.cuda.get_device_name()` string, or None when unknown (no bound is printed)."""
    n = cuda_name.upper()
    if "H200" in n:
        return DEVICES["h200"]
    if "H100" in n:
        return DEVICES["h100-pcie" if "PCIE" in n else "h100-sxm"]
    if "A100" in n and "80" in n:
        return DEVICES["a100-80gb"]
    return None


# --- bounds ---


def decode_bound(
    a: Arch, device: Device, batch: int, prompt_tokens: int, new_tokens: int, dtype_bytes: int = 2
) -> dict[str, float]:
    """Best-case generated tokens/s for `batch` sequences of `prompt_tokens` + `new_tokens` on `device`.

    Prefill: batch · prompt tokens at peak FLOPs. Each decoding step s (context c = prompt + s) takes at
    least max(bytes / bandwidth, FLOPs / peak) with bytes = weights + batch · c · KV bytes per token and
    FLOPs = batch · forward FLOPs at c keys. Returns tokens_per_s (batch · new_tokens over the summed
    time), the time split, and `memory_bound_share` (steps where bytes, not FLOPs, set the time).
    """
    if min(batch, new_tokens) < 1 or prompt_tokens < 0:
        raise ValueError(
            f"batch and new_tokens must be >= 1 and prompt_tokens >= 0, got {batch, new_tokens, prompt_tokens}"
        )
    weights, kv = decode_weight_bytes(a, dtype_bytes), kv_bytes_per_token(a, dtype_bytes)
    prefill = batch * prompt_tokens * forward_flops_per_token(a, (prompt_tokens + 1) / 2) / device.bf16_flops
    total, memory_steps = prefill, 0
    for s in range(new_tokens):
        c = prompt_tokens + s + 1
        mem = (weights + batch * c * kv) / device.mem_bandwidth
        flops = batch * forward_flops_per_token(a, c) / device.bf16_flops
        total += max(mem, flops)
        memory_steps += mem >= flops
    return {
        "tokens_per_s": batch * new_tokens / total,
        "seconds": total,
        "prefill_s": prefill,
        "memory_bound_share": memory_steps / new_tokens,
        "step_bytes_first": weights + batch * (prompt_tokens + 1) * kv,
    }


def train_bound(a: Arch, device: Device, seq_len: float) -> float:
    """Best-case trained tokens/s at peak FLOPs (100% MFU)."""
    return device.bf16_flops / train_flops_per_token(a, seq_len)


def mfu(tokens_per_s: float, a: Arch, device: Device, seq_len: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's dense bf16 peak."""
    return tokens_per_s * train_flops_per_token(a, seq_len) / device.bf16_flops


def lora_params(a: Arch, r: int, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> int:
    """Trainable parameters of rank-r LoRA on the named projections of every layer: r · (in + out) each."""
    h, i, kv = a.hidden_size, a.intermediate_size, a.kv_dim
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    shapes.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; expected some of {sorted(shapes)}")
    return a.num_layers * sum(r * sum(shapes[t]) for t in targets)


def train_memory_estimate(
    a: Arch,
    seq_len: int,
    micro_batch: int,
    *,
    lora_r: int = 0,
    gradient_checkpointing: bool = False,
    shards: int = 1,
) -> dict[str, float]:
    """ESTIMATED peak bytes of one M-step process (mstep.py: fp32 weights, bf16 autocast, AdamW), by part.

    - states: full fine-tuning keeps fp32 weights, grads and two Adam moments, 16 bytes/param, divided by
      `shards` under FSDP FULL_SHARD; LoRA keeps the frozen fp32 weights (4 bytes/param, unsharded) plus
      16 bytes per adapter param.
    - activations: per token and layer about 34·h + 10·kv + 8·i bytes (fp32 residual/norm tensors, bf16
      projections, SDPA inputs/outputs, the four SwiGLU tensors); with checkpointing, 4·h per layer (the
      fp32 layer input) plus one layer's full set during recomputation.
    - logits: mstep.token_logps keeps a float32 log_softmax over the vocabulary, and the backward makes
      two more float32 vocab-wide tensors: about 12 · vocab bytes per token.
    These are estimates (a model of what autograd saves), to be replaced by measured peaks.
    """
    if min(seq_len, micro_batch, shards) < 1 or lora_r < 0:
        raise ValueError("seq_len, micro_batch and shards must be >= 1, lora_r >= 0")
    n = param_counts(a)["total"]
    states = 4.0 * n + 16.0 * lora_params(a, lora_r) if lora_r else 16.0 * n / shards
    tokens = seq_len * micro_batch
    per_layer = 34 * a.hidden_size + 10 * a.kv_dim + 8 * a.intermediate_size
    if gradient_checkpointing:
        activations = tokens * (4.0 * a.hidden_size * a.num_layers + per_layer)
    else:
        activations = float(tokens * per_layer * a.num_layers)
    logits = 12.0 * a.vocab_size * tokens
    return {"states": states, "activations": activations, "logits": logits, "total": states + activations + logits}


# --- random-weight models of these architectures and a Qwen-sized tokenizer, for the benchmarks ---

CACHE_ENV = "AUTOCODE4MATH_CACHE"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2's pre-tokenizer split (the pattern its tokenizer.json specifies): words with an optional leading mark,
# single digits, punctuation runs, newlines and spaces kept apart (digits one by one matter for math).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_TOKENIZER_SIZE = 151_646
"""Qwen2.5's 151,643 byte-level BPE tokens plus the three special tokens used here (the model's
embedding has 151,936 rows, as in the real model: the rows past the tokenizer are never produced by it)."""
CORPUS_PACKAGES = ("sympy", "transformers", "torch", "numpy")


def cache_dir() -> Path:
    """$AUTOCODE4MATH_CACHE, else ~/.cache/autocode4math."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autocode4math")


def _corpus(limit_chars: int) -> Iterator[str]:
    """Local text: the shipped benchmark questions, then the Python sources of installed packages, sorted."""
    import importlib.util

    from autocode4math.benchmarks import load_problems

    n = 0
    for name in ("gsm8k", "math500", "aime24", "amc23"):
        text = "\n".join(p.question for p in load_problems(name))
        n += len(text)
        yield text
    for package in CORPUS_PACKAGES:
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(Path(root).rglob("*.py")):
                if n >= limit_chars:
                    return
                text = path.read_text(encoding="utf-8", errors="ignore")
                n += len(text)
                yield text


def bench_tokenizer(vocab_size: int = QWEN_TOKENIZER_SIZE, cache: Path | None = None) -> Any:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens (incl. SPECIAL_TOKENS), with a ChatML template.

    Trained on local text (`_corpus`: about 600 characters per token wanted, e.g. ~90 MB and ~40 s for the
    Qwen size) on first use and cached under cache_dir()/tokenizers/bpe-<size>. If the machine's text
    runs out before `vocab_size`, the rest is padded with `<|reserved_k|>` special tokens (`n_reserved` in
    the saved MADE_BY.json says how many). The vocabulary differs between machines; its size does not.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    target = (cache or cache_dir() / "tokenizers") / f"bpe-{vocab_size}"
    if not (target / "tokenizer.json").exists():
        _train_tokenizer(vocab_size, target)
    return PreTrainedTokenizerFast.from_pretrained(target)


def _train_tokenizer(vocab_size: int, target: Path) -> None:
    import shutil
    import tempfile

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False
    )
    start = time.perf_counter()
    tok.train_from_iterator(_corpus(600 * vocab_size), trainer=trainer)
    reserved = [f"<|reserved_{k}|>" for k in range(vocab_size - tok.get_vocab_size())]
    tok.add_special_tokens(reserved)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    wrapped.chat_template = CHATML
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    wrapped.save_pretrained(tmp)
    made_by = {"vocab_size": len(wrapped), "n_reserved": len(reserved), "seconds": time.perf_counter() - start}
    (tmp / "MADE_BY.json").write_text(json.dumps({**made_by, "corpus_packages": CORPUS_PACKAGES}) + "\n")
    if target.exists():  # another process finished first
        shutil.rmtree(tmp)
        return
    tmp.rename(target)


def random_model(arch: str, *, device: str = "cpu", dtype: Any = None, seed: int = 0) -> Any:
    """A Qwen2ForCausalLM of shipped architecture `arch` with random weights, built directly on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**{k: v for k, v in arch_config(arch).items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model


def arch_tokenizer(arch: str, cache: Path | None = None) -> Any:
    """The tokenizer a benchmark uses with `arch`: a small one for `tiny`, the Qwen-sized one otherwise."""
    size = QWEN_TOKENIZER_SIZE if arch != "tiny" else int(arch_config("tiny")["vocab_size"])
    return bench_tokenizer(size, cache)


def save_random_checkpoint(arch: str, out_dir: str | Path, *, dtype: Any = None, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of `arch` with its benchmark tokenizer, loadable by `from_pretrained`.

    For plumbing runs at real size (`autocode train --model DIR`): the weights are random, so accuracy
    figures from it mean nothing; memory, throughput and wall-clock do.
    """
    tokenizer = arch_tokenizer(arch)
    model = random_model(arch, dtype=dtype, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
