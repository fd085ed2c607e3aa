"""perf.py: parameter counts against real models, FLOP and byte counts against hand computations, bounds."""

from __future__ import annotations

import json

import pytest
import torch

from autocode4math import perf
from autocode4math.perf import Arch

# A hand-sized config: h=8, i=16, L=2, H=2 (head_dim 4), 1 KV head (kv_dim 4), V=10, untied.
HAND = Arch(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
            tie_word_embeddings=False)  # fmt: skip


def test_param_counts_by_hand():
    # per layer: q 8*8+8, k 8*4+4, v 8*4+4, o 8*8, MLP 3*8*16, norms 2*8 = 72+36+36+64+384+16 = 608
    c = perf.param_counts(HAND)
    assert c["layers"] == 2 * 608
    assert c["embedding"] == c["lm_head"] == 80
    assert c["total"] == 80 + 1216 + 8 + 80


def test_flops_by_hand():
    # matmuls per token per layer: 2*(q 64 + k 32 + v 32 + o 64 + mlp 384) = 1152; lm_head 2*8*10 = 160
    assert perf.matmul_flops_per_token(HAND) == 2 * 1152 + 160
    # attention at 5 keys: 4 * L * H * head_dim * keys = 4 * 2 * 2 * 4 * 5 = 320
    assert perf.attention_flops_per_token(HAND, 5) == 320
    # training at T=9: mean keys (9+1)/2 = 5, so 3 * (2464 + 320)
    assert perf.train_flops_per_token(HAND, 9) == 3 * (2464 + 320)


def test_bytes_by_hand():
    # K and V, 2 layers, kv_dim 4, bf16: 2*2*4*2 = 32 bytes per token
    assert perf.kv_bytes_per_token(HAND) == 32
    # non-embedding (1216 + 8) plus one vocab x hidden matrix (80), in bf16
    assert perf.decode_weight_bytes(HAND) == (1224 + 80) * 2


def _numel(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
def test_param_count_matches_the_real_model(name):
    from transformers import Qwen2Config

    cfg = {k: v for k, v in perf.arch_config(name).items() if k not in ("architectures", "torch_dtype")}
    assert perf.param_counts(perf.load_arch(name))["total"] == _numel(Qwen2Config(**cfg))


def test_param_counts_agree_with_the_model_cards():
    # Qwen2.5 model cards: 0.49B (0.36B non-embedding), 1.54B (1.31B), 7.61B (6.53B)
    cards = {"qwen2.5-0.5b": (0.49, 0.36), "qwen2.5-1.5b": (1.54, 1.31), "qwen2.5-7b": (7.61, 6.53)}
    for name, (total, non_embedding) in cards.items():
        c = perf.param_counts(perf.load_arch(name))
        assert c["total"] / 1e9 == pytest.approx(total, abs=0.01)  # the cards round some figures, truncate others
        assert c["non_embedding"] / 1e9 == pytest.approx(non_embedding, abs=0.01)


def test_tiny_param_count_matches_a_built_model():
    model = perf.random_model("tiny")
    assert sum(p.numel() for p in model.parameters()) == perf.param_counts(perf.load_arch("tiny"))["total"]


def test_decode_bound_is_memory_bound_at_batch_one_and_grows_with_batch():
    a, h100 = perf.load_arch("qwen2.5-0.5b"), perf.DEVICES["h100-sxm"]
    one = perf.decode_bound(a, h100, 1, 128, 512)
    assert one["memory_bound_share"] == 1.0
    # batch 1 is weight-read bound: about bandwidth / weight bytes steps per second
    assert one["tokens_per_s"] == pytest.approx(h100.mem_bandwidth / perf.decode_weight_bytes(a), rel=0.05)
    big = perf.decode_bound(a, h100, 256, 128, 512)
    assert big["tokens_per_s"] > 50 * one["tokens_per_s"]
    assert perf.decode_bound(a, perf.DEVICES["h200"], 256, 128, 512)["tokens_per_s"] > big["tokens_per_s"]


def test_mfu_of_the_bound_is_one_and_train_bound_inverts_it():
    a, h100 = perf.load_arch("qwen2.5-1.5b"), perf.DEVICES["h100-sxm"]
    best = perf.train_bound(a, h100, 2048)
    assert perf.mfu(best, a, h100, 2048) == pytest.approx(1.0)
    assert perf.mfu(best / 4, a, h100, 2048) == pytest.approx(0.25)


def test_detect_device_names():
    assert perf.detect_device("NVIDIA H100 80GB HBM3") is perf.DEVICES["h100-sxm"]
    assert perf.detect_device("NVIDIA H100 PCIe") is perf.DEVICES["h100-pcie"]
    assert perf.detect_device("NVIDIA H200") is perf.DEVICES["h200"]
    assert perf.detect_device("Tesla T4") is None


def test_memory_estimate_parts():
    a = perf.load_arch("qwen2.5-7b")
    n = perf.param_counts(a)["total"]
    full = perf.train_memory_estimate(a, 2048, 1)
    assert full["states"] == 16 * n and full["states"] > 80e9  # full fine-tuning of 7B does not fit one 80 GB GPU
    assert perf.train_memory_estimate(a, 2048, 1, shards=8)["states"] == 2 * n
    lora = perf.train_memory_estimate(a, 2048, 1, lora_r=16)
    assert lora["states"] == 4 * n + 16 * perf.lora_params(a, 16)
    ckpt = perf.train_memory_estimate(a, 2048, 1, gradient_checkpointing=True)
    assert ckpt["activations"] < full["activations"] / 5
    assert full["logits"] == 12 * a.vocab_size * 2048


def test_lora_params_by_hand():
    # rank 2 on q (8+8) and k (8+4): 2 * (16 + 12) per layer, 2 layers
    assert perf.lora_params(HAND, 2, ("q_proj", "k_proj")) == 112
    with pytest.raises(ValueError, match="lm_head"):
        perf.lora_params(HAND, 2, ("lm_head",))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="unknown architecture"):
        perf.arch_config("qwen9")
    with pytest.raises(ValueError, match="num_heads"):
        Arch(10, 8, 16, 2, 3, 1, False)
    with pytest.raises(ValueError, match="seq_len"):
        perf.train_flops_per_token(HAND, 0)


def test_tokenizer_has_the_requested_size_and_is_cached(tmp_path):
    tok = perf.bench_tokenizer(400, cache=tmp_path)
    assert len(tok) == 400
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template
    text = "Compute 12 * 30 = 360.\n```python\nprint(12 * 30)\n```"
    assert tok.decode(tok(text)["input_ids"]) == text
    made = (tmp_path / "bpe-400" / "tokenizer.json").stat().st_mtime
    assert len(perf.bench_tokenizer(400, cache=tmp_path)) == 400
    assert (tmp_path / "bpe-400" / "tokenizer.json").stat().st_mtime == made


def test_tokenizer_is_padded_with_reserved_tokens_when_text_runs_out(tmp_path, monkeypatch):
    monkeypatch.setattr(perf, "_corpus", lambda limit: iter(["a tiny corpus, a tiny corpus"]))
    tok = perf.bench_tokenizer(500, cache=tmp_path)
    assert len(tok) == 500
    made_by = json.loads((tmp_path / "bpe-500" / "MADE_BY.json").read_text())
    assert made_by["n_reserved"] > 200  # 256 bytes + 3 specials + a few merges: the rest is reserved
    assert "<|reserved_0|>" in tok.get_vocab()
