"""In-process vLLM backend (optional: `pip install autocode4math[vllm]`).

Prompts go in as token ids, so vLLM continues exactly the context the engine holds; the stop
string is kept in the output (`include_stop_str_in_output`) and the ids are vLLM's own sampled
tokens. Each request carries its own seed and budget. vLLM is imported only when this backend is
built, and the error says how to install it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autocode4math.rollout.engine import Generation, GenerationRequest, SamplingParams, finish_generation


class VLLMBackend:
    """vLLM `LLM.generate` over token-id prompts; extra keyword arguments go to `vllm.LLM`."""

    def __init__(self, model: str, **llm_options: Any) -> None:
        try:
            import vllm
        except ImportError as e:
            raise ImportError("the vllm backend needs vLLM: pip install 'autocode4math[vllm]'") from e
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, **llm_options)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        params = [
            self._vllm.SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                max_tokens=r.max_tokens,
                seed=r.seed,
                stop=[sampling.stop],
                include_stop_str_in_output=True,
                skip_special_tokens=True,
            )
            for r in requests
        ]
        prompts = [{"prompt_token_ids": r.ids} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            finish_generation(list(o.outputs[0].token_ids), self.tokenizer, sampling.stop, r.max_tokens, self.eos_ids)
            for o, r in zip(outputs, requests, strict=True)
        ]
