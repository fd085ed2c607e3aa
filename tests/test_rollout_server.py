"""The openai backend against local servers that misbehave (rollout/loadserver.py): refusals, silence, 500s,
slowness, several URLs, token ids in and out."""

from __future__ import annotations

import socket
import time

import pytest

from autocode4math.benchmarks import Problem
from autocode4math.rollout import GenerationRequest, RolloutConfig, RolloutRequest, SamplingParams, run_rollouts
from autocode4math.rollout.engine import encode
from autocode4math.rollout.loadserver import LoadModel, LoadServer
from autocode4math.rollout.openai import OpenAIBackend, ServerConfig, ServerError
from autocode4math.rollout.scripted import ScriptedBackend, by_rounds
from autocode4math.sandbox import SandboxPool

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, stop="```output")
FAST = {"connect_timeout_s": 2.0, "first_byte_timeout_s": 2.0, "read_timeout_s": 5.0, "retries": 2, "backoff_s": 0.01}
CODE_TURN = "Compute it.\n```python\nprint(6 * 7)\n```\n```output"
ANSWER_TURN = "So the answer is \\boxed{42}."


def backend_for(tokenizer, *urls: str, **options) -> OpenAIBackend:
    return OpenAIBackend("m", ServerConfig(base_url=",".join(urls), **{**FAST, **options}), tokenizer=tokenizer)


def req(tokenizer, text: str, max_tokens: int = 30, seed: int = 0) -> GenerationRequest:
    return GenerationRequest(ids=encode(tokenizer, text), text=text, max_tokens=max_tokens, seed=seed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CharTokenizer:
    """The tiny tokenizer, but encoding one character per token: a tokenization the local tokenizer never makes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.eos_token_id = inner.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [i for ch in text for i in self.inner(ch, add_special_tokens=False)["input_ids"]]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def problems(*names: str) -> list[RolloutRequest]:
    return [RolloutRequest(Problem(n, f"[{n}] What is 6 times 7?", "42", "toy", {}), "auto", 0, "") for n in names]


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


def test_token_ids_in_and_out_where_the_server_offers_them(tiny_tokenizer):
    with LoadServer(CharTokenizer(tiny_tokenizer), lambda ctx: "abc abc \\boxed{42}") as server:
        backend = backend_for(tiny_tokenizer, server.url)
        request = req(tiny_tokenizer, "Question: 6 x 7?\n")
        (gen,) = backend.generate([request], GREEDY)
        sent = server.seen[-1]["body"]
    chars = [i for ch in "abc abc \\boxed{42}" for i in encode(tiny_tokenizer, ch)]
    assert chars != encode(tiny_tokenizer, "abc abc \\boxed{42}")  # the two tokenizations really differ
    assert gen.ids == [*chars, tiny_tokenizer.eos_token_id] and gen.tokens_from == "server"
    assert (gen.text, gen.finish) == ("abc abc \\boxed{42}", "eos")
    assert sent["prompt"] == request.ids and sent["return_token_ids"] is True


@pytest.mark.parametrize("stream", [True, False])
def test_text_server_falls_back_to_local_tokens_and_says_so(tiny_tokenizer, stream):
    with LoadServer(CharTokenizer(tiny_tokenizer), lambda ctx: CODE_TURN + "\nnever seen", token_ids=False) as server:
        backend = backend_for(tiny_tokenizer, server.url, stream=stream)
        (gen,) = backend.generate([req(tiny_tokenizer, "Question: 6 x 7?\n", max_tokens=200)], GREEDY)
        assert isinstance(server.seen[-1]["body"]["prompt"], str)
    assert (gen.text, gen.finish, gen.tokens_from) == (CODE_TURN, "stop", "local")
    assert gen.ids == encode(tiny_tokenizer, CODE_TURN)
    with (
        LoadServer(tiny_tokenizer, lambda ctx: "x", token_ids=False) as server,
        pytest.raises(ServerError, match="does not take and return token ids"),
    ):
        backend_for(tiny_tokenizer, server.url, token_ids="server").generate([req(tiny_tokenizer, "q")], GREEDY)


@pytest.mark.parametrize("token_ids", ["auto", "local"])
def test_engine_over_a_server_gives_the_scripted_records(tiny_tokenizer, pool, token_ids):
    """Asynchronous over HTTP, the records are those of the in-process scripted model, token for token."""
    respond = by_rounds([CODE_TURN, ANSWER_TURN])
    requests = problems("a", "b", "c")
    config = RolloutConfig(max_new_tokens=200, max_active=2)
    expected = run_rollouts(ScriptedBackend(tiny_tokenizer, respond), requests, config, progress=False, sandbox=pool)
    with LoadServer(tiny_tokenizer, respond) as server:
        records = run_rollouts(
            backend_for(tiny_tokenizer, server.url, token_ids=token_ids), requests, config, progress=False, sandbox=pool
        )
    source = "server" if token_ids == "auto" else "local"
    assert [r["tokens_from"] for r in records] == [source] * 3
    strip = ("tokens_from", "code_blocks")
    assert [{k: v for k, v in r.items() if k not in strip} for r in records] == [
        {k: v for k, v in r.items() if k not in strip} for r in expected
    ]
    assert all(r["used_code"] and r["correct"] for r in records)


@pytest.mark.parametrize("token_ids", ["auto", "local"])
def test_a_refused_request_fails_only_its_trajectory(tiny_tokenizer, pool, token_ids):
    def refuse(text: str):
        return (400, "unsupported character in prompt") if "[bad]" in text else None

    requests = problems("ok", "bad", "long")
    requests[2].problem.question += " and then" * 60  # prompt + max_tokens over the 200-token context
    with LoadServer(tiny_tokenizer, by_rounds([ANSWER_TURN]), refuse=refuse, max_model_len=200) as server:
        backend = backend_for(tiny_tokenizer, server.url, token_ids=token_ids)
        config = RolloutConfig(max_new_tokens=60)
        ok, bad, long = run_rollouts(backend, requests, config, progress=False, sandbox=pool)
    assert (ok["finish_reason"], ok["correct"], ok["error"]) == ("answer", True, "")
    assert (bad["finish_reason"], bad["correct"], bad["response_ids"]) == ("error", False, [])
    assert "HTTP 400: unsupported character" in bad["error"] and server.url in bad["error"]
    assert (long["finish_reason"], long["correct"]) == ("length", False)
    assert "maximum context length is 200" in long["error"]


def test_a_server_that_never_answers_stops_the_run_quickly(tiny_tokenizer):
    with LoadServer(tiny_tokenizer, lambda ctx: "x", hang=True) as server:
        backend = backend_for(tiny_tokenizer, server.url, first_byte_timeout_s=0.5, retries=1)
        start = time.monotonic()
        with pytest.raises(ServerError, match="no answer after 2 attempts.*timed out"):
            backend.generate([req(tiny_tokenizer, "hi")], GREEDY)
        assert time.monotonic() - start < backend.server.give_up_s + 5
    assert ServerConfig().give_up_s <= 60  # the defaults give up on a dead server within a minute
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerError, match="no answer after 3 attempts.*Connection refused"):
        backend_for(tiny_tokenizer, nobody).generate([req(tiny_tokenizer, "hi")], GREEDY)


def test_errors_are_retried_then_answered(tiny_tokenizer):
    with LoadServer(tiny_tokenizer, lambda ctx: ANSWER_TURN, fail_first=2) as server:
        (gen,) = backend_for(tiny_tokenizer, server.url, token_ids="local").generate([req(tiny_tokenizer, "q")], GREEDY)
        assert server.requests == 3 and server.served == 1
    assert gen.text == ANSWER_TURN
    with (
        LoadServer(tiny_tokenizer, lambda ctx: ANSWER_TURN, fail_first=10) as server,
        pytest.raises(ServerError, match="HTTP 500: injected server error"),
    ):
        backend_for(tiny_tokenizer, server.url, token_ids="local").generate([req(tiny_tokenizer, "q")], GREEDY)


def test_wrong_key_or_model_stops_at_once_and_the_key_is_sent(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekrit")
    with LoadServer(tiny_tokenizer, lambda ctx: "x", refuse=lambda text: (401, "invalid API key")) as server:
        backend = backend_for(tiny_tokenizer, server.url, token_ids="local", api_key_env="MY_KEY")
        with pytest.raises(ServerError, match="HTTP 401: invalid API key.*API key"):
            backend.generate([req(tiny_tokenizer, "q")], GREEDY)
        assert server.requests == 1 and server.seen[0]["authorization"] == "Bearer sekrit"


def test_a_slow_server_is_fine_when_streaming(tiny_tokenizer):
    """Headers come at once and the answer after a second: only the non-streamed request runs into the timeout."""
    with LoadServer(tiny_tokenizer, lambda ctx: ANSWER_TURN, load=LoadModel(base_s=1.0)) as server:
        (gen,) = backend_for(tiny_tokenizer, server.url, first_byte_timeout_s=0.5).generate(
            [req(tiny_tokenizer, "q")], GREEDY
        )
        assert gen.text == ANSWER_TURN
        blocking = backend_for(tiny_tokenizer, server.url, first_byte_timeout_s=0.5, stream=False, retries=0)
        with pytest.raises(ServerError, match="timed out"):
            blocking.generate([req(tiny_tokenizer, "q")], GREEDY)


def test_a_server_that_ignores_stream_is_read_as_json(tiny_tokenizer):
    with LoadServer(tiny_tokenizer, lambda ctx: CODE_TURN, streams=False) as server:
        (gen,) = backend_for(tiny_tokenizer, server.url).generate([req(tiny_tokenizer, "q", 100)], GREEDY)
        assert server.seen[-1]["body"]["stream"] is True
    assert (gen.text, gen.finish, gen.tokens_from) == (CODE_TURN, "stop", "server")


def test_requests_go_to_the_least_loaded_server(tiny_tokenizer):
    with (
        LoadServer(tiny_tokenizer, lambda ctx: ANSWER_TURN, load=LoadModel(base_s=0.02)) as fast,
        LoadServer(tiny_tokenizer, lambda ctx: ANSWER_TURN, load=LoadModel(base_s=0.6)) as slow,
    ):
        backend = backend_for(tiny_tokenizer, slow.url, fast.url, concurrency=2)
        gens = backend.generate([req(tiny_tokenizer, f"q{i}") for i in range(16)], GREEDY)
        assert all(g.text == ANSWER_TURN for g in gens)
        assert fast.served > 2 * slow.served >= 2  # both serve; the one that frees its slots sooner serves more
        assert fast.max_busy <= 2 and slow.max_busy <= 2  # never more than `concurrency` per server


def test_a_dead_url_next_to_a_live_one(tiny_tokenizer):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with LoadServer(tiny_tokenizer, lambda ctx: ANSWER_TURN) as live:
        gens = backend_for(tiny_tokenizer, dead, live.url, retries=1).generate(
            [req(tiny_tokenizer, f"q{i}") for i in range(6)], GREEDY
        )
    assert [g.text for g in gens] == [ANSWER_TURN] * 6


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"retries": -1}, "retries"),
        ({"base_url": " , "}, "base_url"),
        ({"token_ids": "sometimes"}, "token_ids"),
        ({"first_byte_timeout_s": 0}, "timeouts"),
    ],
)
def test_bad_server_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        ServerConfig(**options)


SERVER_OVERRIDES = [
    "server.base_url=http://a:1/v1,http://b:2/v1",
    "server.tokenizer=tok",
    "server.api_key_env=MY_KEY",
    "server.concurrency=3",
    "server.token_ids=local",
    "server.stream=false",
    "server.connect_timeout_s=2",
    "server.first_byte_timeout_s=5",
    "server.read_timeout_s=9",
    "server.retries=1",
    "server.backoff_s=0.5",
]
EXPECTED = ServerConfig("http://a:1/v1,http://b:2/v1", "tok", "MY_KEY", 3, "local", False, 2.0, 5.0, 9.0, 1, 0.5)


def test_every_server_option_is_settable_from_eval_and_train_configs():
    from autocode4math.config import load_config
    from autocode4math.em import TrainConfig
    from autocode4math.estep import backend_options
    from autocode4math.evaluate import EvalConfig

    ev = load_config(EvalConfig, overrides=SERVER_OVERRIDES)
    served = ["estep.backend=openai", "fleet.server=vllm serve {model} --port {port}"]
    train = load_config(TrainConfig, overrides=[*served, *(f"estep.{o}" for o in SERVER_OVERRIDES)])
    assert ev.server == EXPECTED and train.estep.server == EXPECTED
    assert backend_options(train.estep) == {"server": EXPECTED}
    assert EXPECTED.urls == ["http://a:1/v1", "http://b:2/v1"]


def test_eval_and_estep_over_a_server_report_occupancy_and_token_source(tmp_path, pool):
    from autocode4math.estep import EStepConfig, run_estep
    from autocode4math.evaluate import EvalConfig, run_eval
    from autocode4math.io import read_json, read_jsonl
    from autocode4math.prompts import PromptConfig
    from autocode4math.toymodel import CHECKPOINT_DIR

    model = str(CHECKPOINT_DIR / "toy-base")
    with LoadServer(_toy_tokenizer(model), lambda ctx: "So \\boxed{3}.") as server:
        options, plain = ServerConfig(base_url=server.url), PromptConfig(use_chat_template=False)
        config = EvalConfig(model=model, benchmarks=["toy"], modes=["cot"], limit=2, backend="openai",
                            server=options, prompt=plain, out=str(tmp_path / "eval"))  # fmt: skip
        metrics = run_eval(config, sandbox=pool, progress=False)
        estep = EStepConfig(k=1, per_query=1, backend="openai", server=options, prompt=plain)
        problems = [Problem("q", "What is 1 + 2?", "3", "toy", {})]
        summary = run_estep(model, problems, estep, tmp_path / "estep", sandbox=pool, progress=False)
    assert metrics["rollout"]["schedule"] == "async" and metrics["rollout"]["trajectories"] == 2
    assert 0 < metrics["rollout"]["occupancy"] <= 1
    assert "backend occupancy" in (tmp_path / "eval" / "report.md").read_text()
    assert {r["tokens_from"] for r in read_jsonl(tmp_path / "eval" / "samples.jsonl")} == {"server"}
    assert summary["tokens_from"] == {"server": 2} and summary["rollout"]["trajectories"] == 2
    assert read_json(tmp_path / "estep" / "summary.json")["rollout"]["schedule"] == "async"


def _toy_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
