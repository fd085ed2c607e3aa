import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autocode4math import toymodel, toyworld
from autocode4math.prompts import CODE_PREFIX, build_prompt


@pytest.fixture(scope="module")
def corpus():
    return toyworld.base_corpus(400, seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return toymodel.train_tokenizer([d.prompt + d.prefix + d.response for d in corpus], vocab_size=400)


def test_tokenizer_splits_digits_and_round_trips_code(tokenizer):
    item = toyworld.generate("story", 3, random.Random(0))
    text = toyworld.write_code(item)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for number in ("299114", "1024"):
        assert tokenizer.convert_ids_to_tokens(tokenizer(number, add_special_tokens=False)["input_ids"]) == list(number)
    assert tokenizer.eos_token == toymodel.EOS and tokenizer.pad_token == toymodel.PAD
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


def test_encode_demo_trains_only_on_model_written_tokens(tokenizer):
    item = toyworld.ToyItem("mul", 1, "What is 12 * 3?", 36, {"a": 12, "b": 3})
    demo = toyworld.demo(item, "code", use_code=True)
    ids, labels = toymodel.encode_demo(tokenizer, demo)
    whole = tokenizer(demo.prompt + demo.prefix + demo.response, add_special_tokens=False)["input_ids"]
    assert ids[:-1] == whole and ids[-1] == tokenizer.eos_token_id
    trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    # prompt, forced prefix and the tool's "\n36\n```\n" are off the loss; the rest is on it
    assert trained == "```python\nprint(12 * 3)\n```\n```outputThe answer is \\boxed{36}." + toymodel.EOS
    assert all(lab in (-100, i) for i, lab in zip(ids, labels, strict=True))


def test_default_model_is_tiny_and_standard(tokenizer):
    model = toymodel.build_model(toymodel.ToyModelConfig(), tokenizer)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 5_000_000
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="stage"):
        toymodel.PretrainConfig(stage="rl")
    with pytest.raises(ValueError, match="lr"):
        toymodel.PretrainConfig(lr=2.0)
    with pytest.raises(ValueError, match="divisible"):
        toymodel.ToyModelConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        toymodel.train_tokenizer(["abc"], vocab_size=100)


def _tiny(stage: str, out, **kw) -> toymodel.PretrainConfig:
    model = toymodel.ToyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    return toymodel.PretrainConfig(
        stage=stage, out_dir=str(out), n_examples=64, steps=3, batch_size=4, vocab_size=320, model=model, **kw
    )


def test_pretrain_base_then_sft_saves_loadable_checkpoints(tmp_path):
    lines: list[str] = []
    base = toymodel.pretrain(_tiny("base", tmp_path / "base"), log=lines.append)
    assert any(line.startswith("step 3/3") for line in lines)
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    assert (base / "MADE_BY.md").read_text().count("seed: 0") == 1
    assert (base / "train_log.jsonl").exists()
    sft = toymodel.pretrain(_tiny("sft", tmp_path / "sft", init_from=str(base), lr=1e-3), log=lines.append)
    tuned = AutoModelForCausalLM.from_pretrained(sft)
    assert AutoTokenizer.from_pretrained(sft).get_vocab() == tok.get_vocab()
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), tuned.parameters(), strict=True)]
    assert any(changed)
    more = toymodel.pretrain(_tiny("base", tmp_path / "more", init_from=str(base)), log=lines.append)
    assert AutoTokenizer.from_pretrained(more).get_vocab() == tok.get_vocab()  # continued, not rebuilt


def _greedy(model, tok, text: str, n: int = 12) -> str:
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :])


@pytest.mark.parametrize("name", ["toy-base", "toy-sft", "toy-mid-base"])
def test_shipped_checkpoints_load_and_follow_the_code_prefix(name):
    path = toymodel.CHECKPOINT_DIR / name
    if not (path / "config.json").exists():
        pytest.skip(f"{name} is not shipped yet (see docs/toyworld.md)")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 5_000_000
    assert "seed:" in (path / "MADE_BY.md").read_text()
    prompt = build_prompt("A crate holds 347 bottles. How many bottles are in 862 crates?", "code")
    assert _greedy(model, tok, prompt.text + prompt.prefix).startswith("```python\nprint(")
    if name == "toy-base":  # the SFT set has auto prompts only, so only the base is held to the cot instruction
        cot = build_prompt("Compute 23 + 45.", "cot")
        assert "```" not in _greedy(model, tok, cot.text, n=20)


def test_toy_mid_base_copies_the_count_after_a_forced_switch_and_rarely_switches_alone():
    """The mid study's starting model has the pieces (story in text; after the story's text and the code
    prefix, a program of the product) but does not choose the switch on its own (docs/toyworld.md)."""
    path = toymodel.CHECKPOINT_DIR / "toy-mid-base"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    items = toyworld.make_split("test", source="toy-mid")[:8]
    programs, switched = 0, 0
    for item in items:
        head = toyworld.switch_text(item) + CODE_PREFIX + "\n"
        prompt = build_prompt(item.question, "code")
        programs += _greedy(model, tok, prompt.text + head, n=16).startswith(
            f"```python\nprint({item.spec['count']} * {item.spec['per']})\n```"
        )
        auto = _greedy(model, tok, build_prompt(item.question, "auto").text, n=60)
        switched += "```" in auto or CODE_PREFIX in auto
    assert programs >= 6, f"the forced switch wrote the product's program for {programs} of {len(items)}"
    assert switched <= 1, f"{switched} of {len(items)} auto answers switched to code unprompted"
