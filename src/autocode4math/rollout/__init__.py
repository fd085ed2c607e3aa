"""Tool-integrated rollouts: the engine (code rounds, segments, masks) and its backends.

- engine.py: `RolloutConfig`, `RolloutRequest`, `make_requests`, `run_rollouts`, the Backend protocol.
- hf.py: transformers `generate`, batched (the default).
- openai.py: any OpenAI-compatible /v1/completions server (vLLM, SGLang, `transformers serve`).
- vllm.py: in-process vLLM (optional extra).
- scripted.py: a deterministic stand-in model for tests.
"""

from __future__ import annotations

from typing import Any

from autocode4math.rollout.engine import (
    STOP,
    Backend,
    Generation,
    GenerationRequest,
    RolloutConfig,
    RolloutRequest,
    SamplingParams,
    make_requests,
    run_rollouts,
)

BACKENDS = ("hf", "openai", "vllm")

__all__ = [
    "BACKENDS",
    "STOP",
    "Backend",
    "Generation",
    "GenerationRequest",
    "RolloutConfig",
    "RolloutRequest",
    "SamplingParams",
    "make_backend",
    "make_requests",
    "run_rollouts",
]


def make_backend(name: str, model: str, **options: Any) -> Backend:
    """Build backend `name` for `model` (a path or hub id; for openai also the served model name).

    Options go to the backend's constructor (e.g. batch_size for hf, base_url for openai).
    """
    if name == "hf":
        from autocode4math.rollout.hf import HFBackend

        return HFBackend(model, **options)
    if name == "openai":
        from autocode4math.rollout.openai import OpenAIBackend

        return OpenAIBackend(model, **options)
    if name == "vllm":
        from autocode4math.rollout.vllm import VLLMBackend

        return VLLMBackend(model, **options)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
