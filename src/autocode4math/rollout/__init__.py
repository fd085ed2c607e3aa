"""Tool-integrated rollouts: the engine (code rounds, segments, masks) and its backends.

- engine.py: `RolloutConfig`, `RolloutRequest`, `make_requests`, `run_rollouts`, the Backend protocol.
- hf.py: transformers `generate`, batched (the default).
- openai.py: OpenAI-compatible /v1/completions servers (vLLM, SGLang, `transformers serve`); `ServerConfig`.
- vllm.py: in-process vLLM (optional extra).
- scripted.py: a deterministic stand-in model for tests.
- loadserver.py: a local completions server with a load model, for benchmarks and tests.
- stats.py: `RolloutStats` (wall time, requests, code calls, backend occupancy).
"""

from __future__ import annotations

from typing import Any

from autocode4math.rollout.engine import (
    STOP,
    AsyncBackend,
    Backend,
    Generation,
    GenerationRequest,
    RolloutConfig,
    RolloutRequest,
    RolloutStats,
    SamplingParams,
    make_requests,
    run_rollouts,
)
from autocode4math.rollout.openai import ServerConfig

BACKENDS = ("hf", "openai", "vllm")

__all__ = [
    "BACKENDS",
    "STOP",
    "AsyncBackend",
    "Backend",
    "Generation",
    "GenerationRequest",
    "RolloutConfig",
    "RolloutRequest",
    "RolloutStats",
    "SamplingParams",
    "ServerConfig",
    "backend_kwargs",
    "make_backend",
    "make_requests",
    "run_rollouts",
]


def make_backend(name: str, model: str, **options: Any) -> Backend:
    """Build backend `name` for `model` (a path or hub id; for openai also the served model name).

    Options go to the backend's constructor (e.g. batch_size for hf, server=ServerConfig(...) for openai).
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


def backend_kwargs(name: str, *, batch_size: int, server: ServerConfig) -> dict[str, Any]:
    """The constructor options of backend `name` from the settings eval and train share."""
    if name == "hf":
        return {"batch_size": batch_size}
    return {"server": server} if name == "openai" else {}
