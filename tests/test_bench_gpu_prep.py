"""The GPU benchmarks at tiny size on CPU: the HF static-cache option, `bench rollout`, `bench train`, the CLI.

These check logic and plumbing (same greedy outputs, token accounting, expected keys), never speed.
"""

from __future__ import annotations

import json

import pytest
import torch

from autocode4math import bench, perf
from autocode4math.benchmarks import Problem
from autocode4math.rollout import GenerationRequest, RolloutConfig, SamplingParams, make_requests, run_rollouts
from autocode4math.rollout.engine import encode
from autocode4math.rollout.hf import HFBackend
from autocode4math.sandbox import SandboxPool

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, stop="```output")


@pytest.fixture(autouse=True)
def one_thread_and_own_cache(tmp_path_factory, monkeypatch):
    """A loaded 2-core machine runs tiny models far faster on one thread; tokenizers go to a test cache."""
    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "ac4m-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_static_cache_option_gives_the_same_greedy_outputs(tiny_model_dir):
    dynamic = HFBackend(str(tiny_model_dir), device="cpu", batch_size=4)
    static = HFBackend(dynamic.model, dynamic.tokenizer, device="cpu", batch_size=4, cache_implementation="static")
    prompts = ["Question: 1 + 1 =", "Question: what is 12 * 30 + 7, exactly?", "x"]
    reqs = [GenerationRequest(encode(dynamic.tokenizer, p), p, 20, 0) for p in prompts]
    want, got = dynamic.generate(reqs, GREEDY), static.generate(reqs, GREEDY)
    assert [g.ids for g in got] == [g.ids for g in want]
    assert [g.finish for g in got] == [g.finish for g in want]
    assert HFBackend(dynamic.model, dynamic.tokenizer, device="cpu").cache_implementation is None  # default unchanged


def test_bench_problems_have_the_requested_prompt_length():
    tok = bench.arch_tokenizer("tiny")
    problems = bench.bench_problems(tok, 5, 96)
    assert len({p.question for p in problems}) == 5
    from autocode4math.prompts import build_prompt
    from autocode4math.rollout.engine import encode_prompt

    lengths = [len(encode_prompt(tok, build_prompt(p.question, "auto", tok).text)) for p in problems]
    assert all(abs(n - 96) <= 4 for n in lengths), lengths
    with pytest.raises(ValueError, match="no room"):
        bench.bench_problems(tok, 1, 5)


def test_code_every_backend_forces_sandbox_rounds(tiny_model_dir):
    inner = HFBackend(str(tiny_model_dir), device="cpu", batch_size=4)
    wrapped = bench.CodeEveryBackend(inner, every=6, rounds=2)
    problems = [Problem(id=f"q{i}", question=f"What is {i}?", answer="0", benchmark="toy", meta={}) for i in range(3)]
    with SandboxPool(workers=1) as pool:
        records = run_rollouts(wrapped, make_requests(problems, ["auto"], 1), RolloutConfig(max_new_tokens=120),
                               progress=False, sandbox=pool)  # fmt: skip
    for r in records:
        assert r["n_code_calls"] == 2 and [b["status"] for b in r["code_blocks"]] == ["ok", "ok"]
        assert r["code_blocks"][0]["output"].strip().isdigit()
        assert [s["kind"] for s in r["segments"]][:4] == ["model", "tool", "model", "tool"]
    # the model wrote 6 tokens in each of the two code rounds and the rest of the budget after them
    assert wrapped.model_tokens >= 3 * 12


def test_bench_rollout_end_to_end_at_tiny_size():
    cfg = bench.RolloutBenchConfig(arch="tiny", batch=3, prompt_tokens=64, max_new_tokens=90, static_cache=True,
                                   code_rounds=1, device="cpu")  # fmt: skip
    out = bench.bench_rollout(cfg)
    assert out["device"] == "cpu" and out["bound"] is None  # no GPU: no bound is printed as if it were one
    assert out["reference"]["tokens"] <= 3 * 90 and out["reference"]["tokens_per_s"] > 0
    for name in ("engine", "engine_static", "engine_code"):
        r = out[name]
        assert set(r) >= {"tokens", "seconds", "tokens_per_s", "first_s", "speedup_vs_reference", "code_calls"}
        assert abs(r["mean_prompt_tokens"] - 64) <= 4
    assert out["engine"]["code_calls"] == 0 and out["engine_code"]["code_calls"] == 3
    # greedy and the same model: the engine generates what plain generate does (no stop, no EOS reached)
    assert out["engine"]["tokens"] == out["engine_static"]["tokens"] == out["reference"]["tokens"]


def test_synthetic_samples_look_like_rollouts():
    samples = bench.synthetic_samples(400, 2048, 1000, seed=1)
    lengths = [len(s.ids) for s in samples]
    assert max(lengths) <= 2048 and min(lengths) >= 64 + 16
    at_cap = sum(n == 2048 for n in lengths) / len(lengths)
    assert 0.07 < at_cap < 0.2  # 10% forced to the budget, a few more by the long tail
    assert all(len(s.mask) == len(s.ids) - s.start for s in samples)
    coded = [s for s in samples if s.used_code]
    assert 0.25 < len(coded) / len(samples) < 0.5 and all(0 in s.mask for s in coded)


@pytest.mark.parametrize("options", [{}, {"lora_r": 4, "gradient_checkpointing": True}])
def test_bench_train_end_to_end_at_tiny_size(options):
    cfg = bench.TrainBenchConfig(
        arch="tiny", seq_len=128, micro_batch_size=2, steps=2, warmup=1, device="cpu", **options
    )
    out = bench.bench_train(cfg)
    assert out["tokens"] > 0 and out["tokens_per_s"] > 0 and 0 <= out["padding_share"] < 1
    assert out["mfu"] is None and out["peak_memory_bytes"] is None  # CPU: nothing to report
    assert set(out["memory_estimate_bytes"]) == {"states", "activations", "logits", "total"}


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="unknown arch"):
        bench.RolloutBenchConfig(arch="llama")
    with pytest.raises(ValueError, match="seq_len"):
        bench.TrainBenchConfig(arch="tiny", seq_len=8)


def test_cli_bench_rollout_and_train_print_json_last():
    from typer.testing import CliRunner

    from autocode4math.cli import app

    runner = CliRunner()
    args = ["bench", "rollout", "--arch", "tiny", "--batch", "2", "--prompt-tokens", "48", "--max-new-tokens", "8"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["reference"]["tokens"] == 16 and "Rollout throughput" in result.output
    args = ["bench", "train", "--arch", "tiny", "--seq-len", "96", "--steps", "1", "--warmup", "0", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["config"]["seq_len"] == 96
    bad = runner.invoke(app, ["bench", "train", "--arch", "nope"])
    assert bad.exit_code != 0 and "unknown arch" in bad.output


def test_random_checkpoint_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = perf.save_random_checkpoint("tiny", tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == perf.param_counts(perf.load_arch("tiny"))["total"]
    assert len(tok) <= model.config.vocab_size and model.generation_config.eos_token_id == tok.eos_token_id


def test_train_stage_seconds_from_stage_directories(tmp_path):
    import os

    ends = {"iter-00/eval": 110.0, "iter-01/collect": 150.0, "iter-01/mstep": 190.0, "iter-01/eval": 195.0}
    for stage, end in ends.items():
        (tmp_path / stage / "sub").mkdir(parents=True)
        for name, t in (("a.json", end - 5), ("sub/b.json", end)):
            (tmp_path / stage / name).write_text("{}")
            os.utime(tmp_path / stage / name, (t, t))
    got = bench.train_stage_seconds(tmp_path, started=100.0)
    assert list(got) == list(ends) and got == {"iter-00/eval": 10, "iter-01/collect": 40, "iter-01/mstep": 40,
                                               "iter-01/eval": 5}  # fmt: skip


def test_gpu_only_paths_bound_and_tables(capsys):
    # on a GPU the run gets a bound and the tables print it with MFU and peak memory: exercised here by name
    cfg = bench.RolloutBenchConfig(arch="qwen2.5-0.5b", batch=64)
    bound = bench.rollout_bound(cfg, "NVIDIA H100 80GB HBM3")
    assert bound["device"] == "NVIDIA H100 SXM 80GB"
    a = perf.load_arch("qwen2.5-0.5b")
    assert bound["tokens_per_s"] == perf.decode_bound(a, perf.DEVICES["h100-sxm"], 64, 128, 512)["tokens_per_s"]
    assert bench.rollout_bound(cfg, "cpu") is None
    run = {"tokens": 1000, "seconds": 2.0, "tokens_per_s": 500.0, "first_s": 9.0, "speedup_vs_reference": 5.0}
    result = {"config": bench.asdict(cfg), "device_name": "NVIDIA H100 80GB HBM3", "bound": bound,
              "reference": {"tokens": 1000, "seconds": 10.0, "tokens_per_s": 100.0}, "engine": run}  # fmt: skip
    bench.print_rollout_table(result)
    printed = capsys.readouterr().out
    assert f"{bound['tokens_per_s']:,.0f} tokens/s" in printed and "5.00x" in printed
    estimate = perf.train_memory_estimate(a, 2048, 4)
    train = {"config": bench.asdict(bench.TrainBenchConfig()), "device_name": "NVIDIA H100 80GB HBM3", "tokens": 10,
             "seconds": 1.0, "tokens_per_s": 10.0, "padding_share": 0.1, "model_tflops_per_s": 400.0, "mfu": 0.404,
             "peak_memory_bytes": 30 * 2**30, "memory_estimate_bytes": estimate}  # fmt: skip
    bench.print_train_table(train)
    printed = capsys.readouterr().out
    # by hand for qwen2.5-0.5b (h 896, kv 128, i 4864, 24 layers, V 151936, tied), 2048 x 4 tokens:
    # params = embeddings 151936*896 + 24 * (q 896*896+896, k and v 896*128+128, o 896*896, MLP 3*896*4864, 2 norms
    # 2*896) + final norm 896; states 16 bytes/param, activations 34h+10kv+8i per token and layer, logits 12V/token
    params = 151_936 * 896 + 24 * (803_712 + 2 * 114_816 + 802_816 + 13_074_432 + 1_792) + 896
    total = 16 * params + 8192 * 24 * (34 * 896 + 10 * 128 + 8 * 4864) + 12 * 151_936 * 8192
    assert "MFU: 40.4%" in printed and "measured: 30.0 GiB" in printed
    assert f"ESTIMATE {total / 2**30:.1f} GiB" in printed and estimate["total"] == total


def test_gpu_bench_script_skips_what_does_not_fit_its_budget(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "gpu_bench.sh"
    env = dict(os.environ, OUT=str(tmp_path), BUDGET_S="0", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(script), "train"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for name in ("train_05b", "train_15b", "train_15b_ckpt", "train_7b_lora"):
        assert f"SKIPPED {name}" in summary
    assert "torch" in summary and "total" in summary
    bad = subprocess.run(["bash", str(script), "nope"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
