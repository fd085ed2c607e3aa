"""The default backend: transformers `generate`, batched with left padding, on CPU or GPU.

Stop strings use transformers' own `stop_strings` criterion (it needs the tokenizer passed to
`generate`); a row that stopped keeps being padded while its neighbours run, so each row is cut
afterwards at the token that completed the stop string or at its first EOS (`finish_generation`).
transformers matches stop strings across the whole sequence, context included; a row it stopped on
a match that started in the context (so the generated text alone lacks the stop string) ends as EOS.

Sampling is seeded per row, so a row's tokens never depend on its batch neighbours, the batch size
or the order in which requests arrive (a resumed run draws what an uninterrupted one drew, and one
worker draws what two do). `generate` decodes greedily over scores that `RowSeededSampler` has
turned into a sample: temperature and top-p (transformers' own warpers, applied per row), plus
Gumbel noise drawn from a generator of the row's own, seeded with the request's seed. The argmax of
log-probabilities plus independent Gumbel noise is a draw from those probabilities (the Gumbel-max
trick), and the t-th generated token of a row always uses the t-th draw of its generator.

What remains batch dependent is float rounding: a padded batch computes a row's logits with other
matrix shapes than the row alone, which moves them by about 1e-6. A token flips only where two
candidates' noisy scores tie that closely (see docs/rollout.md for what the tiny test models show).

A request whose budget goes past the model's context (`max_position_embeddings`) is cut to fit, with a
warning: positions the model was never trained on only produce garbage, slowly.

Simplification: one `max_new_tokens` per batch (the largest remaining budget in it; rows are cut
to their own budget afterwards).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from autocode4math.rollout.engine import Generation, GenerationRequest, SamplingParams, finish_generation


class RowSeededSampler:
    """A logits processor whose argmax is a sample from softmax(scores / temperature) within top-p.

    Each row has its own `torch.Generator` seeded with `seeds[row]`; every call draws one vector of
    Gumbel noise per row, so row r's t-th token depends only on its own context and seed.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        if temperature <= 0:
            raise ValueError(f"RowSeededSampler needs temperature > 0, got {temperature}")
        warpers: list[Any] = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.seeds = list(seeds)
        self.generators: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """scores: (batch, vocab) float logits -> (batch, vocab) warped log-weights plus Gumbel noise."""
        import torch

        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        scores = self.warpers(input_ids, scores)
        tiny = torch.finfo(scores.dtype).tiny
        exp = torch.empty_like(scores)
        for row, generator in enumerate(self.generators):
            exp[row].exponential_(generator=generator)
        # -log(E) with E ~ Exp(1) is standard Gumbel noise
        return scores - exp.clamp_min_(tiny).log_()


class HFBackend:
    """Batched generation with a transformers causal LM.

    `model` is a path / hub id or an already loaded model (then `tokenizer` is required).
    bf16 on GPU, float32 on CPU unless `dtype` says otherwise.
    `cache_implementation` is passed to `generate` (None: transformers' default dynamic cache); "static"
    preallocates the KV cache, and on CUDA transformers then compiles the decoding step with torch.compile
    (the cache keeps the longest length seen, so only a new batch size recompiles; see docs/performance.md).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 16,
        cache_implementation: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, str):
            torch_dtype = (
                getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device != "cpu" else torch.float32)
            )
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        elif tokenizer is None:
            raise ValueError("HFBackend: pass a tokenizer together with a loaded model")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.cache_implementation = cache_implementation
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        self.context: int | None = getattr(self.model.config, "max_position_embeddings", None)
        """Positions the model was built for (None: unknown, no cap)."""
        self._capped = False

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        requests = [self._within_context(r) for r in requests]
        out: list[Generation] = []
        for start in range(0, len(requests), self.batch_size):
            out += self._batch(requests[start : start + self.batch_size], sampling)
        return out

    def _within_context(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with its budget cut so that context + new tokens fit the model's positions (warned once)."""
        if self.context is None or len(request.ids) + request.max_tokens <= self.context:
            return request
        if not self._capped:
            self._capped = True
            warnings.warn(
                f"a budget of {request.max_tokens} new tokens after {len(request.ids)} context tokens goes past the "
                f"model's {self.context} positions: generation is capped at position {self.context} "
                "(lower max_new_tokens to silence this)",
                stacklevel=3,
            )
        return dataclasses.replace(request, max_tokens=max(1, self.context - len(request.ids)))

    def _batch(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        import torch
        from transformers import LogitsProcessorList

        width = max(len(r.ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, width - len(r.ids) :] = torch.tensor(r.ids, dtype=torch.long)
            attention[row, width - len(r.ids) :] = 1
        kwargs: dict[str, Any] = {}
        if sampling.temperature > 0:
            sampler = RowSeededSampler([r.seed for r in requests], sampling.temperature, sampling.top_p)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        if self.cache_implementation is not None:
            kwargs["cache_implementation"] = self.cache_implementation
        with torch.no_grad():
            sequences = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max(r.max_tokens for r in requests),
                stop_strings=[sampling.stop],
                tokenizer=self.tokenizer,
                pad_token_id=self.pad_id,
                do_sample=False,
                top_k=None,
                **kwargs,
            )
        new = sequences[:, width:].tolist()
        return [
            finish_generation(row, self.tokenizer, sampling.stop, r.max_tokens, self.eos_ids)
            for row, r in zip(new, requests, strict=True)
        ]
