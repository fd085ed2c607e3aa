"""Backend for any OpenAI-compatible /v1/completions server (vLLM, SGLang, `transformers serve`).

The server gets the context as text; token ids come from the local tokenizer (the same one the
server uses, by default loaded from `tokenizer` or the model name). Requests run in a thread pool,
each with a timeout and retries with exponential backoff. Only the standard library is used.

Servers differ in what they return at a stop string: vLLM and SGLang strip it and say which stop
matched (`stop_reason` / `matched_stop`), `transformers serve` keeps it in the text. Both are
normalised to "text ends with the stop string". A server that strips it without saying why it
stopped is read as stopping at the stop string when the text since the last output block ends
with a complete ```python block, and as EOS otherwise.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from autocode4math.rollout.engine import CODE_RE, Generation, GenerationRequest, SamplingParams, encode


class OpenAIBackend:
    """Completions over HTTP with `concurrency` requests in flight."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "http://127.0.0.1:8000/v1",
        tokenizer: Any = None,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        if concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("concurrency must be >= 1, retries >= 0 and timeout_s > 0")
        if tokenizer is None or isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.model, self.tokenizer = model, tokenizer
        self.url = base_url.rstrip("/") + "/completions"
        self.api_key, self.concurrency = api_key, concurrency
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(requests)))) as pool:
            return list(pool.map(lambda r: self._one(r, sampling), requests))

    def _one(self, request: GenerationRequest, sampling: SamplingParams) -> Generation:
        body = {
            "model": self.model,
            "prompt": request.text,
            "max_tokens": request.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p if sampling.temperature > 0 else 1.0,
            "seed": request.seed,
            "stop": [sampling.stop],
            "n": 1,
        }
        choice = self._post(body)["choices"][0]
        return self._normalise(choice, sampling.stop, request.max_tokens)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:
                    raise RuntimeError(f"{self.url}: HTTP {e.code}: {e.read()[:500]!r}") from None
                error: Exception = e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error = e
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise RuntimeError(f"{self.url}: no answer after {self.retries + 1} attempts: {error}")

    def _normalise(self, choice: dict[str, Any], stop: str, max_tokens: int) -> Generation:
        text = choice.get("text") or ""
        reason = choice.get("finish_reason")
        matched = choice.get("stop_reason", choice.get("matched_stop"))
        if stop in text:
            text, finish = text[: text.index(stop) + len(stop)], "stop"
        elif reason == "length":
            finish = "length"
        elif matched == stop or (matched is None and _ends_with_code(text, stop)):
            text, finish = text + stop, "stop"
        else:
            finish = "eos"
        ids = encode(self.tokenizer, text)
        if finish == "eos" and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if len(ids) > max_tokens:
            ids, finish = ids[:max_tokens], "length"
        return Generation(ids=ids, text=text, finish=finish)


def _ends_with_code(text: str, stop: str) -> bool:
    tail = text.rsplit(stop, 1)[-1]
    blocks = list(CODE_RE.finditer(tail))
    return bool(blocks) and not tail[blocks[-1].end() :].strip()
