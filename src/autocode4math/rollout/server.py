"""An OpenAI-compatible server that a rollout engine starts for its policy, waits for, and stops.

Training with a server backend needs the server to serve the policy of the current iteration, not
the one it loaded at start. The engine therefore owns its server: it fills a command template such
as `vllm serve {model} --port {port}` with the checkpoint and a free port, starts it, polls
`/v1/models` until it answers, and stops it (SIGTERM to its process group, SIGKILL after a grace
period) before serving the next checkpoint. The server dies with the engine's process
(PR_SET_PDEATHSIG), so a killed worker leaves no server behind. Its output goes to a log file whose
tail is quoted when it fails to come up.

Placeholders: {model} (the checkpoint, shell-quoted), {port} (required), {gpus} (the engine's GPU
count, for tensor parallelism). The served model name is the checkpoint path, as `vllm serve`
does by default.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import string
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

PLACEHOLDERS = ("model", "port", "gpus")
STOP_GRACE_S = 30.0


class ServerError(RuntimeError):
    """The server did not come up (it exited, or did not answer in time); the message quotes its log."""


def check_template(template: str) -> None:
    """Raise ValueError unless `template` names {model} and {port} and no other placeholder."""
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = sorted(names - set(PLACEHOLDERS))
    if unknown or not {"model", "port"} <= names:
        raise ValueError(
            f"server template {template!r} must contain {{model}} and {{port}} and may contain {{gpus}}; "
            f"unknown placeholders: {unknown}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started the server dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


class ManagedServer:
    """A server process for one checkpoint; `base_url` is its /v1 address once the constructor returns."""

    def __init__(self, template: str, model: str, *, gpus: int = 0, timeout_s: float = 900.0) -> None:
        check_template(template)
        self.port = free_port()
        self.model = model
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        argv = shlex.split(template.format(model=shlex.quote(model), port=self.port, gpus=max(gpus, 1)))
        fd, log = tempfile.mkstemp(prefix="autocode-server-", suffix=".log")
        self.log = Path(log)
        with os.fdopen(fd, "w") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
            )
        try:
            self._wait(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with code {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                why = f"did not answer {self.base_url}/models within {timeout_s:.0f} s"
                raise ServerError(f"server {why}: {self.tail()}")
            time.sleep(0.5)

    def tail(self, chars: int = 2000) -> str:
        """The end of the server's log."""
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after a grace period; remove the log."""
        if self.proc.poll() is None:
            with_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.unlink(missing_ok=True)


def with_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (the server and anything it started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
