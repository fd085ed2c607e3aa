"""The OpenAI-compatible backend against a real `transformers serve` process on 127.0.0.1 (no mocks).

Misbehaving servers are tested in test_rollout_server.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from autocode4math.rollout import GenerationRequest, SamplingParams
from autocode4math.rollout.engine import encode
from autocode4math.rollout.openai import OpenAIBackend, ServerConfig

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, stop="```output")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    port = _free_port()
    cli = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen(
        [str(cli), "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                resp.read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"transformers serve did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def backend(server, tiny_model_dir):
    # not streamed: `transformers serve` streams no incomplete trailing character, and the random model ends on one
    config = ServerConfig(base_url=server, concurrency=4, first_byte_timeout_s=120, stream=False)
    return OpenAIBackend(str(tiny_model_dir), config)


def req(tokenizer, text, max_tokens=20, seed=0):
    return GenerationRequest(ids=encode(tokenizer, text), text=text, max_tokens=max_tokens, seed=seed)


@pytest.mark.slow
def test_server_greedy_matches_local_hf(backend, tiny_model_dir):
    from autocode4math.rollout.hf import HFBackend

    local = HFBackend(str(tiny_model_dir), device="cpu")
    prompt = "Question: 3 + 4 =\n"
    (remote,) = backend.generate([req(backend.tokenizer, prompt)], GREEDY)
    (mine,) = local.generate([req(local.tokenizer, prompt)], GREEDY)
    assert remote.finish == "length" == mine.finish
    assert remote.text == mine.text


@pytest.mark.slow
def test_server_stop_string_is_normalised(backend):
    prompt = "Question: 3 + 4 =\n"
    (free,) = backend.generate([req(backend.tokenizer, prompt, 30)], GREEDY)
    text = free.text
    start = next(
        i for i in range(len(text) // 3, len(text) - 3) if text[i : i + 3].isascii() and text[i : i + 3].isalpha()
    )
    stop = text[start : start + 3]
    (cut,) = backend.generate([req(backend.tokenizer, prompt, 30)], SamplingParams(0.0, 1.0, stop))
    assert cut.finish == "stop"
    assert cut.text == text[: text.index(stop) + len(stop)]
    assert cut.ids == encode(backend.tokenizer, cut.text)


@pytest.mark.slow
def test_concurrent_requests_come_back_in_order(backend):
    prompts = ["a", "Question: 1 + 1 =\n", "x = 3", "What is 9?"]
    together = backend.generate([req(backend.tokenizer, p, 8) for p in prompts], GREEDY)
    alone = [backend.generate([req(backend.tokenizer, p, 8)], GREEDY)[0] for p in prompts]
    assert [g.text for g in together] == [g.text for g in alone]
    assert len({g.text for g in together}) > 1


@pytest.mark.parametrize(
    "choice, text, finish",
    [
        # vLLM: stop string stripped, named in stop_reason
        (
            {"text": "a\n```python\nprint(1)\n```\n", "finish_reason": "stop", "stop_reason": "```output"},
            "a\n```python\nprint(1)\n```\n```output",
            "stop",
        ),
        # vLLM: EOS (stop_reason is the token id)
        ({"text": "\\boxed{1}", "finish_reason": "stop", "stop_reason": 0}, "\\boxed{1}", "eos"),
        # a server that strips the stop and says nothing: a trailing complete code block means the stop string
        (
            {"text": "```python\nprint(1)\n```\n", "finish_reason": "stop"},
            "```python\nprint(1)\n```\n```output",
            "stop",
        ),
        ({"text": "so \\boxed{1}", "finish_reason": "stop"}, "so \\boxed{1}", "eos"),
        # transformers serve: the stop string and what its last token overhangs are in the text
        ({"text": "x```outputs", "finish_reason": "stop"}, "x```output", "stop"),
        ({"text": "abc", "finish_reason": "length"}, "abc", "length"),
    ],
)
def test_normalise_server_dialects(tiny_tokenizer, choice, text, finish):
    b = OpenAIBackend("m", tokenizer=tiny_tokenizer)
    gen = b._normalise(choice, "```output", 100)
    assert (gen.text, gen.finish, gen.tokens_from) == (text, finish, "local")
    eos = [tiny_tokenizer.eos_token_id] if finish == "eos" else []
    assert gen.ids == encode(tiny_tokenizer, text) + eos


@pytest.mark.slow
def test_engine_over_the_server_matches_the_hf_backend(backend, tiny_model_dir):
    from autocode4math.benchmarks import Problem
    from autocode4math.rollout import RolloutConfig, make_requests, run_rollouts
    from autocode4math.rollout.hf import HFBackend
    from autocode4math.sandbox import SandboxPool

    problems = [Problem(id="q1", question="What is 1 + 1?", answer="2", benchmark="toy", meta={})]
    requests = make_requests(problems, ["auto", "code"], 1)
    config = RolloutConfig(max_new_tokens=12)
    with SandboxPool(workers=1) as pool:
        remote = run_rollouts(backend, requests, config, progress=False, sandbox=pool)
        local = run_rollouts(
            HFBackend(str(tiny_model_dir), device="cpu"), requests, config, progress=False, sandbox=pool
        )
    assert [r["response"] for r in remote] == [r["response"] for r in local]
    assert [r["finish_reason"] for r in remote] == [r["finish_reason"] for r in local]
    assert remote[1]["prefix"] and remote[1]["prompt_ids"] == local[1]["prompt_ids"]
