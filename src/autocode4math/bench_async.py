"""`autocode bench async`: asynchronous trajectories against rounds, on the same requests, through a server backend.

Both schedules run the same toy questions through `OpenAIBackend` against a local `LoadServer`
(rollout/loadserver.py) and the real sandbox pool; the figures are wall time, the backend's
occupancy as the engine sees it (requests in flight over `max_active`) and the server's slot
occupancy (busy slots over slots), and whether both schedules produced the same records.

This is a load model, not a GPU server: a 2-core machine cannot run an engine whose throughput
would show the effect, so the server answers with scripted text after the latency of
`rollout.loadserver.LoadModel` (a fixed cost plus per-token prefill and decode costs, `slots`
requests at a time). The scripted trajectories are what makes rounds slow in practice: long-tailed
answer lengths (a round waits for its longest answer) and 0-2 code blocks each, whose code also
sleeps `code_s` seconds to stand for model code heavier than the toy arithmetic (sympy, loops).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import asdict, dataclass
from typing import Any

FILLER = "Let us work through this carefully, one step at a time. "


@dataclass
class AsyncBenchConfig:
    """The workload and load model of `autocode bench async`."""

    n: int = 48
    """Trajectories (toy dev questions, auto mode)."""
    max_active: int = 16
    """Trajectories in flight; also the client's concurrency."""
    slots: int = 16
    """Requests the load-model server serves at once."""
    base_s: float = 0.02
    """Load model: fixed seconds per request."""
    prefill_s: float = 0.0001
    """Load model: seconds per prompt token."""
    decode_s: float = 0.004
    """Load model: seconds per generated token (one sequence's decode step at the server's batch size)."""
    code_s: float = 0.2
    """Seconds each scripted code block sleeps in the sandbox (stands for heavier model code)."""
    seed: int = 0
    """Seeds the scripted answer lengths and code rounds."""

    def __post_init__(self) -> None:
        for name in ("n", "max_active", "slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("base_s", "prefill_s", "decode_s", "code_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def scripted_turns(question: str, answer: Any, cfg: AsyncBenchConfig) -> list[str]:
    """The scripted model's turns for one question: 0-2 code rounds, then an answer; long-tailed lengths."""
    rng = random.Random(zlib.crc32(f"{cfg.seed}/{question}".encode()))
    turns = []
    for k in range(rng.choice([0, 1, 1, 2])):
        sleep = f"import time\ntime.sleep({cfg.code_s})\n" if cfg.code_s else ""
        words = FILLER * int(2 ** rng.uniform(0, 4))
        turns.append(f"{words}\n```python\n{sleep}print({k} + {rng.randint(1, 99)})\n```\n```output")
    words = FILLER * int(2 ** rng.uniform(0, 5.5))  # 1 to 45 sentences: a few answers are far longer than most
    return [*turns, f"{words}So the answer is \\boxed{{{answer}}}."]


def _responder(problems: list[Any], cfg: AsyncBenchConfig) -> Any:
    from autocode4math.rollout.scripted import by_rounds

    scripts = {p.question: by_rounds(scripted_turns(p.question, p.answer, cfg)) for p in problems}

    def respond(context: str) -> str:
        """The question's script; nothing for a context without a benchmark question (the client's probe)."""
        question = next((q for q in scripts if q in context), None)
        return scripts[question](context) if question else ""

    return respond


def bench_async(cfg: AsyncBenchConfig) -> dict[str, Any]:
    """Run rounds, then async, on the same requests; the figures of each and their comparison."""
    from autocode4math.benchmarks import load_problems
    from autocode4math.prompts import PromptConfig
    from autocode4math.rollout import RolloutConfig, RolloutStats, make_requests, run_rollouts
    from autocode4math.rollout.loadserver import LoadModel, LoadServer
    from autocode4math.rollout.openai import OpenAIBackend, ServerConfig
    from autocode4math.sandbox import SandboxPool
    from autocode4math.toymodel import CHECKPOINT_DIR

    tokenizer = _tokenizer(CHECKPOINT_DIR / "toy-base")
    problems = load_problems("toy", split="dev", limit=cfg.n)
    prompt = PromptConfig(use_chat_template=False)  # the toy tokenizer has none: the plain template, as intended
    requests = make_requests(problems, ["auto"], 1, prompt)
    load = LoadModel(cfg.slots, cfg.base_s, cfg.prefill_s, cfg.decode_s)
    out: dict[str, Any] = {"schedules": ["rounds", "async"], "config": asdict(cfg)}
    records = {}
    with SandboxPool() as pool:
        for schedule in ("rounds", "async"):
            with LoadServer(tokenizer, _responder(problems, cfg), load=load) as server:
                server_config = ServerConfig(base_url=server.url, concurrency=cfg.max_active)
                backend = OpenAIBackend("toy", server_config, tokenizer=tokenizer)
                stats = RolloutStats()
                config = RolloutConfig(max_new_tokens=2048, max_active=cfg.max_active, schedule=schedule)
                records[schedule] = run_rollouts(
                    backend, requests, config, progress=False, sandbox=pool, prompt_config=prompt, stats=stats
                )
                backend.close()
                out.setdefault("wall_s", []).append(round(stats.wall_s, 3))
                out.setdefault("occupancy", []).append(round(stats.occupancy, 4))
                out.setdefault("slot_occupancy", []).append(round(server.slot_occupancy(), 4))
                out.setdefault("generation_requests", []).append(stats.generation_requests)
                out.setdefault("code_calls", []).append(stats.code_calls)
    out["speedup"] = round(out["wall_s"][0] / out["wall_s"][1], 3) if out["wall_s"][1] > 0 else None
    out["same_records"] = [_stable(r) for r in records["rounds"]] == [_stable(r) for r in records["async"]]
    out["generated_tokens"] = sum(r["n_generated_tokens"] for r in records["async"])
    out["note"] = "load-model server (scripted text, latency from LoadModel), not a GPU server"
    return out


def _tokenizer(path: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _stable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without timings (code blocks may carry their sandbox seconds)."""
    blocks = [{k: v for k, v in b.items() if k != "duration_s"} for b in record["code_blocks"]]
    return {**record, "code_blocks": blocks}


def print_async_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = result["config"]
    table = Table(title=f"async vs rounds: {cfg['n']} trajectories, max_active {cfg['max_active']}")
    for h in ("schedule", "wall s", "backend occupancy", "server slots busy", "requests", "code calls"):
        table.add_column(h, justify="left" if h == "schedule" else "right")
    for i, name in enumerate(result["schedules"]):
        table.add_row(
            name,
            f"{result['wall_s'][i]:.2f}",
            f"{100 * result['occupancy'][i]:.0f}%",
            f"{100 * result['slot_occupancy'][i]:.0f}%",
            str(result["generation_requests"][i]),
            str(result["code_calls"][i]),
        )
    console = Console()
    console.print(table)
    console.print(
        f"speedup {result['speedup']}x, same records: {result['same_records']}. Load model, not a GPU server:"
        f" {cfg['slots']} slots, {cfg['base_s']} s + {cfg['prefill_s']} s/prompt token + {cfg['decode_s']} s/output"
        f" token per request; code blocks sleep {cfg['code_s']} s."
    )
