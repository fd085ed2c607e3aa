"""The sandbox over HTTP: SandboxFusion's /run_code, stateful sessions, bad requests, concurrent clients,
the remote client behind `sandbox.url`, and the `sandbox` section of every command's config."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace

import pytest

from autocode4math.config import ConfigError, load_config
from autocode4math.demo import DemoConfig, train_config
from autocode4math.em import TrainConfig
from autocode4math.estep import EStepConfig
from autocode4math.evaluate import EvalConfig
from autocode4math.sandbox import SandboxConfig, SandboxPool, open_sandbox
from autocode4math.sandbox_service import RemoteSandbox, ServeConfig, start_server, stop_server

LIMITS = SandboxConfig(timeout_s=3, memory_mb=256, workers=2)


@pytest.fixture(scope="module")
def server():
    srv, _thread = start_server(ServeConfig(port=0, max_body_mb=0.25, max_timeout_s=5, sandbox=LIMITS))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def url(server):
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON) of one raw HTTP request."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def run_code(server, **body):
    return request(server, "POST", "/run_code", json.dumps(body).encode())


# ---------------------------------------------------------------- SandboxFusion's /run_code


def test_run_code_answers_in_the_sandboxfusion_shape(server):
    status, r = run_code(server, code="x = 6 * 7\nprint(x)\nx", language="python")
    assert status == 200 and r["status"] == "Success" and r["compile_result"] is None and r["files"] == {}
    run = r["run_result"]
    assert (run["status"], run["return_code"], run["stdout"], run["stderr"]) == ("Finished", 0, "42\n", "")
    assert run["execution_time"] >= 0  # a script: the last expression is not echoed, unlike a notebook block


@pytest.mark.parametrize(
    "body,status,run_status,code,stdout,stderr_has",
    [
        ({"code": "print(input()[::-1])", "stdin": "abc\n"}, "Success", "Finished", 0, "cba\n", ""),
        ({"code": "print(open('data/in.txt').read())", "files": {"data/in.txt": base64.b64encode(b"hi").decode()}},
         "Success", "Finished", 0, "hi\n", ""),
        ({"code": "import sys\nsys.exit(3)"}, "Failed", "Finished", 3, "", ""),
        ({"code": "import sys\nsys.exit('bye')"}, "Failed", "Finished", 1, "", "bye"),
        ({"code": "print('a')\n1 / 0"}, "Failed", "Finished", 1, "a\n", "ZeroDivisionError"),
        ({"code": "while True:\n    pass", "run_timeout": 0.5}, "Failed", "TimeLimitExceeded", None, "", "Timeout"),
        ({"code": "x = bytearray(2**34)"}, "Failed", "Finished", 1, "", "MemoryError"),
    ],
)  # fmt: skip
def test_run_code_outcomes(server, body, status, run_status, code, stdout, stderr_has):
    got, r = run_code(server, language="python", **body)
    assert got == 200 and r["status"] == status, r
    run = r["run_result"]
    assert (run["status"], run["return_code"], run["stdout"]) == (run_status, code, stdout)
    assert stderr_has in run["stderr"]


BAD = {
    "malformed JSON": (b'{"code": "print(1)", ', {}, 400, "not valid JSON"),
    "deep JSON": (b"[" * 100_000 + b"]" * 100_000, {}, 400, "not valid JSON"),
    "not an object": (b'["print(1)"]', {}, 400, "JSON object"),
    "no code": (b'{"language": "python"}', {}, 400, "missing field 'code'"),
    "code of the wrong type": (b'{"code": 5, "language": "python"}', {}, 400, "wrong type"),
    "unknown language": (b'{"code": "x", "language": "cpp"}', {}, 400, "unsupported language"),
    "bad timeout": (b'{"code": "x", "language": "python", "run_timeout": -1}', {}, 400, "run_timeout"),
    "escaping file": (b'{"code": "x", "files": {"../etc/x": ""}}', {}, 400, "relative path"),
    "bad base64": (b'{"code": "x", "files": {"a": "%%%"}}', {}, 400, "base64"),
    "fetch_files": (b'{"code": "x", "fetch_files": ["a"]}', {}, 400, "fetch_files"),
    "huge body": (b'{"code": "' + b"x" * 400_000 + b'"}', {}, 413, "limit"),
    "chunked": (b"", {"Transfer-Encoding": "chunked"}, 411, "Content-Length"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_a_clear_4xx_and_the_server_lives_on(server, name):
    body, headers, code, message = BAD[name]
    if name == "chunked":
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        conn.putrequest("POST", "/run_code")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
        conn.close()
    else:
        status, answer = request(server, "POST", "/run_code", body, headers)
    assert status == code and message in answer["error"], answer
    assert run_code(server, code="print('ok')", language="python")[1]["run_result"]["stdout"] == "ok\n"


def test_unknown_endpoints_are_404(server):
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "POST", "/sessions/a/b", b"{}")[0] == 404
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and "rlimits" in health["layers"]


# ---------------------------------------------------------------- stateful sessions and the remote client


def test_remote_sandbox_has_the_pool_interface(url):
    with RemoteSandbox(replace(LIMITS, url=url)) as remote:
        a, b = remote.open_session(), remote.open_session()
        first = remote.run(a, "x = 6\nprint('set')\nx * 7")
        assert (first.status, first.stdout) == ("ok", "set\n42\n")  # notebook semantics, as in a local pool
        results = remote.run_many([(a, "y = x + 1"), (b, "y = 'b'"), (a, "y"), (b, "y"), (a, "1/0")])
        assert [r.stdout for r in results[:4]] == ["", "", "7\n", "'b'\n"] and results[4].status == "error"
        assert remote.run(a, "import sys\nprint('x' * 10, file=sys.stderr)").stderr == "x" * 10 + "\n"
        assert remote.run(a, "while True: pass", timeout_s=0.5).status == "timeout"
        assert remote.run(a, "1").status == "dead"
        remote.close_session(b)
        with pytest.raises(KeyError, match="unknown sandbox session"):
            remote.run(b, "1")
        assert "uid" in remote.layers or os.getuid() != 0


def test_a_closed_session_id_is_dead_on_the_server_not_reopened(server, url):
    remote = RemoteSandbox(replace(LIMITS, url=url))
    s = remote.open_session()
    assert remote.run(s, "z = 1").status == "ok"
    remote.close_session(s)
    status, answer = request(server, "POST", f"/sessions/{s}/run", b'{"code": "z"}')
    assert status == 200 and answer["status"] == "dead"
    assert request(server, "POST", "/sessions/bad%20id!/run", b'{"code": "1"}')[0] == 400


def test_run_code_can_use_a_stateful_session(server):
    assert run_code(server, code="total = 40", language="python", session="fusion-1")[1]["status"] == "Success"
    _, r = run_code(server, code="print(total + 2)", language="python", session="fusion-1")
    assert r["run_result"]["stdout"] == "42\n"
    assert request(server, "DELETE", "/sessions/fusion-1")[1] == {"closed": "fusion-1"}


def test_concurrent_clients_get_their_own_results(server, url):
    failures: list[str] = []

    def client(k: int) -> None:
        remote = RemoteSandbox(replace(LIMITS, url=url))
        s = remote.open_session()
        for j in range(4):
            r = remote.run(s, f"v = {k} * 100 + {j}\nv")
            if r.stdout != f"{k * 100 + j}\n":
                failures.append(f"client {k}: {r}")
            _, fusion = run_code(server, code=f"print({k} + {j})", language="python")
            if fusion["run_result"]["stdout"] != f"{k + j}\n":
                failures.append(f"client {k}: {fusion}")
        remote.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_an_unreachable_server_is_a_sandbox_error_not_an_exception():
    remote = RemoteSandbox(SandboxConfig(url="http://127.0.0.1:9", timeout_s=1))
    s = remote.open_session()
    r = remote.run(s, "1")
    assert r.status == "sandbox_error" and "remote sandbox failed" in r.error
    assert [x.status for x in remote.run_many([(s, "1"), (s, "2")])] == ["sandbox_error"] * 2
    assert remote.layers == []
    remote.close()


def test_the_rollout_engine_runs_code_on_a_remote_sandbox(tiny_tokenizer, url):
    from autocode4math.benchmarks import Problem
    from autocode4math.rollout import RolloutConfig, RolloutRequest, run_rollouts
    from autocode4math.rollout.scripted import ScriptedBackend, by_rounds

    problem = Problem(id="q1", question="What is 6 times 7?", answer="42", benchmark="toy", meta={})
    backend = ScriptedBackend(tiny_tokenizer, by_rounds(["```python\nprint(6 * 7)\n```\n```output", "\\boxed{42}"]))
    with open_sandbox(replace(LIMITS, url=url)) as remote:
        assert isinstance(remote, RemoteSandbox)
        (record,) = run_rollouts(backend, [RolloutRequest(problem, "auto", 0, "")], RolloutConfig(), progress=False,
                                 sandbox=remote)  # fmt: skip
    assert record["code_blocks"][0]["status"] == "ok" and record["code_blocks"][0]["output"] == "42\n"
    assert record["correct"] is True


def test_serve_command_starts_and_stops(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", "from autocode4math.cli import app; app()", "sandbox", "serve", "--port", "0",
           "--set", "sandbox.timeout_s=2", "--set", "sandbox.prefork=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("sandbox server listening on http://127.0.0.1:"), line + proc.stderr.read()
        port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/run_code", json.dumps({"code": "print(2 ** 10)", "language": "python"}))
        assert json.loads(conn.getresponse().read())["run_result"]["stdout"] == "1024\n"
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    bad = subprocess.run(cmd[:5] + ["--set", "sandbox.timeout_s=-1"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "timeout_s" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------- the `sandbox` section of every command


@pytest.mark.parametrize("cls", [EvalConfig, EStepConfig, TrainConfig, DemoConfig])
def test_every_command_that_runs_code_takes_sandbox_settings(cls):
    overrides = ["sandbox.url=http://10.0.0.5:8100", "sandbox.timeout_s=4", "sandbox.memory_mb=512",
                 "sandbox.max_output_chars=2000", "sandbox.workers=3"]  # fmt: skip
    config = load_config(cls, overrides=overrides)
    expected = SandboxConfig(url="http://10.0.0.5:8100", timeout_s=4, memory_mb=512, max_output_chars=2000, workers=3)
    assert config.sandbox == expected
    with pytest.raises(ConfigError, match="timeout_s"):
        load_config(cls, overrides=["sandbox.timeout_s=0"])
    with pytest.raises(ConfigError, match="url"):
        load_config(cls, overrides=["sandbox.url=ftp://x"])


def test_train_and_demo_hand_their_sandbox_to_every_stage():
    sandbox = SandboxConfig(url="http://10.0.0.5:8100", timeout_s=4)
    demo = DemoConfig(sandbox=sandbox)
    assert train_config(demo, "em").sandbox == sandbox
    with pytest.raises(ConfigError, match="not estep.sandbox"):
        load_config(TrainConfig, overrides=["estep.sandbox.timeout_s=3"])


def test_open_sandbox_picks_local_or_remote():
    remote = open_sandbox(SandboxConfig(url="http://127.0.0.1:9"))
    assert isinstance(remote, RemoteSandbox)
    with open_sandbox(SandboxConfig(workers=1, prefork=0)) as local:
        assert isinstance(local, SandboxPool) and local.workers == 1
        s = local.open_session()
        assert local.run(s, "3 * 3").stdout == "9\n"
