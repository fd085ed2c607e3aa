"""The in-process vLLM backend: skipped without vLLM (and without a GPU); the error without it is clear."""

from __future__ import annotations

import importlib.util

import pytest

from autocode4math.rollout import GenerationRequest, SamplingParams, make_backend
from autocode4math.rollout.engine import encode

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_missing_vllm_says_how_to_install():
    with pytest.raises(ImportError, match=r"autocode4math\[vllm\]"):
        make_backend("vllm", "any-model")


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        make_backend("nope", "m")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
def test_vllm_matches_hf_greedy(tiny_model_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from autocode4math.rollout.hf import HFBackend

    vllm_backend = make_backend("vllm", str(tiny_model_dir), dtype="float32", gpu_memory_utilization=0.2)
    hf = HFBackend(str(tiny_model_dir), dtype="float32")
    sampling = SamplingParams(0.0, 1.0, "```output")
    text = "Question: 3 + 4 =\n"
    request = GenerationRequest(encode(hf.tokenizer, text), text, 16, 0)
    (ours,) = hf.generate([request], sampling)
    (theirs,) = vllm_backend.generate([request], sampling)
    assert theirs.finish == ours.finish == "length"
    assert theirs.ids[:8] == ours.ids[:8]
