"""Shared fixtures: a tiny random Qwen2 model with a locally trained byte-level BPE tokenizer.

The tokenizer is trained here (no downloads) on a small corpus of math prose, Python code and the
rollout markers, so "```python", "```output", digits and \\boxed{} tokenize compactly; byte-level
BPE can represent any text. The model has random weights: it is for plumbing, not for answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Question: What is 12 + 30?\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "Let's first analyze the problem, then consider if python code could help.",
    "```python\nx = 12 + 30\nprint(x)\n```\n```output\n42\n```\nThe answer is \\boxed{42}.",
    "We compute 3 * 7 = 21, so the result is \\boxed{21}. 0123456789 + - * / = ( ) [ ] { }",
    "def f(n):\n    return sum(range(n))\nprint(f(10))\nTraceback (most recent call last):\nNameError",
    "Please reason step by step without writing code, and put your final answer within \\boxed{}.",
]


def build_tokenizer(vocab_size: int = 400, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on CORPUS, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
    )
    if chat_template:
        wrapped.chat_template = chat_template
    return wrapped


def build_tiny_model(directory: Path, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """Save a 2-layer random Qwen2 causal LM and its tokenizer under `directory`; return it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(chat_template=chat_template)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """`make(chat_template=CHAT_TEMPLATE, seed=0) -> Path`: tiny models on demand, built once per setting."""
    cache: dict[tuple, Path] = {}

    def make(chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
        key = (chat_template, seed)
        if key not in cache:
            cache[key] = build_tiny_model(tmp_path_factory.mktemp("tiny_model"), chat_template, seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory) -> Path:
    """Path of a tiny random Qwen2 model + BPE tokenizer (with a ChatML-style chat template)."""
    return tiny_model_factory()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    """The tokenizer saved in `tiny_model_dir`, loaded once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster (2 CPUs, no dashboard) shared by every test that needs one; skipped without Ray."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
