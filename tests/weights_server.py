"""A tiny OpenAI-compatible server for tests: it answers every completion with a digest of the weights it loaded.

Started by the rollout engine from a command template (`fleet.server`), it proves which checkpoint a
run sampled from: the digest covers the tensors read from the checkpoint's safetensors files at
start, so a record's response names the weights that produced it. Like `vllm serve`, it serves the
model under the path it was given and refuses requests for any other model name (HTTP 404).
Standard library plus safetensors/numpy only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def weights_digest(model_dir: str) -> str:
    """sha256 over every tensor's name and bytes, files and names in sorted order (first 16 hex digits)."""
    from safetensors.numpy import load_file

    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors = load_file(str(path))
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    digest = weights_digest(args.model)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": args.model, "object": "model"}]})
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("model") != args.model:
                self._send(404, {"error": f"model {body.get('model')!r} does not exist"})
                return
            text = f"These are the weights {digest}. The answer is \\boxed{{0}}."
            self._send(200, {"choices": [{"text": text, "finish_reason": "stop", "index": 0}]})

        def log_message(self, *_: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
