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

from pathlib import Path
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
SHIPPED_CHECKPOINTS = Path(__file__).parent.parent / "checkpoints"
"""The toy checkpoints shipped with the package, addressable by name (toy-base, toy-sft, toy-mid-base)."""

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
    "resolve_model",
    "run_rollouts",
]


def shipped_checkpoints() -> list[str]:
    """Names of the shipped toy checkpoints."""
    return sorted(p.parent.name for p in SHIPPED_CHECKPOINTS.glob("*/config.json"))


def _path_like(model: str) -> bool:
    """True when `model` can only be meant as a local path: a hub id is `name` or `org/name`."""
    if model.startswith(("/", ".", "~")) or model.endswith("/") or "\\" in model or model.count("/") > 1:
        return True
    return "/" in model and Path(model.split("/")[0]).is_dir()


def resolve_model(model: str, backend: str = "hf") -> str:
    """The checkpoint `model` names: a local directory, a shipped toy checkpoint (toy-base, toy-sft, ...), or a hub id.

    Checked before anything loads: an empty name, or a path that does not exist, is a ConfigError, so a
    mistyped directory never turns into a Hugging Face Hub lookup. For the openai backend `model` is the
    served model's name and is returned as it is.
    """
    from autocode4math.config import ConfigError

    if not model:
        raise ConfigError(
            "no model given: pass --model with a checkpoint directory, a hub id or a shipped toy checkpoint"
            f" ({', '.join(shipped_checkpoints())})"
        )
    if backend == "openai":
        return model
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model {model!r}: is a file, not a checkpoint directory")
        return model
    if (SHIPPED_CHECKPOINTS / model / "config.json").exists():
        return str(SHIPPED_CHECKPOINTS / model)
    if _path_like(model):
        raise ConfigError(
            f"model {model!r}: directory does not exist (shipped checkpoints: {', '.join(shipped_checkpoints())})"
        )
    return model


def make_backend(name: str, model: str, **options: Any) -> Backend:
    """Build backend `name` for `model` (a path or hub id; for openai also the served model name).

    Options go to the backend's constructor (e.g. batch_size for hf, server=ServerConfig(...) for openai). A
    model that transformers cannot load (not on the Hub, no network, not a checkpoint) is a ConfigError naming it.
    """
    if name == "hf":
        from autocode4math.config import ConfigError
        from autocode4math.rollout.hf import HFBackend

        try:
            return HFBackend(resolve_model(model), **options)
        except OSError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"model {model!r}: cannot be loaded ({reason})") from None
    if name == "openai":
        from autocode4math.rollout.openai import OpenAIBackend

        return OpenAIBackend(model, **options)
    if name == "vllm":
        from autocode4math.rollout.vllm import VLLMBackend

        return VLLMBackend(resolve_model(model, name), **options)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backend_kwargs(name: str, *, batch_size: int, server: ServerConfig) -> dict[str, Any]:
    """The constructor options of backend `name` from the settings eval and train share."""
    if name == "hf":
        return {"batch_size": batch_size}
    return {"server": server} if name == "openai" else {}
