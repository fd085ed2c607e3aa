"""What the rollout fleet buys, measured (`autocode bench fleet`), and what the paper's setting costs, estimated.

`bench_fleet` runs the same E-step requests on the toy world (the shipped toy-sft model, the E-step's
own sampling) once per worker count, in one process: 1 worker is the in-process engine that
`--workers 1` uses, N > 1 a Ray fleet of N CPU workers with cores / N torch threads and sandbox
workers each. Engines are loaded before the clock starts; the clock covers generation, code
execution, grading and the records' trip to the driver. It reports trajectories/s, generated
tokens/s and code calls/s per worker count, the speedup of the last count over the first, and
whether every count produced the same records (same keys, same response tokens).

`paper_iteration` is arithmetic, not a measurement: one EM iteration of the paper's setting from
perf.py's bounds and stated efficiencies (docs/scaling.md prints and explains it).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

from autocode4math.estep import EStepConfig, main_requests


@dataclass
class FleetBenchConfig:
    """One `autocode bench fleet` run."""

    workers: list[int] = field(default_factory=lambda: [1, 2])
    """Worker counts to measure, in order (the speedup is the last over the first)."""
    queries: int = 32
    """Toy train questions; each gets K rollouts per code decision."""
    k: int = 4
    """Rollouts per question and decision (the E-step's K)."""
    max_new_tokens: int = 256
    shard_size: int = 32
    batch_size: int = 16
    """hf backend: rows per generate call."""
    model: str = "toy-sft"
    temperature: float = 1.0
    """The E-step's sampling (1.0, top-p 0.9); 0 measures greedy decoding."""

    def __post_init__(self) -> None:
        if not self.workers or min(self.workers) < 1:
            raise ValueError(f"workers must be a non-empty list of counts >= 1, got {self.workers}")
        for name in ("queries", "k", "max_new_tokens", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def bench_fleet(config: FleetBenchConfig, progress: bool = False) -> dict[str, Any]:
    """Time the same E-step requests on each worker count; see the module docstring for what is measured."""
    from autocode4math.benchmarks import load_problems
    from autocode4math.em import resolve_model
    from autocode4math.fleet import FleetConfig, open_engines

    estep = EStepConfig(k=config.k, batch_size=config.batch_size)
    sampling = dataclasses.replace(estep.rollout, max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    requests = main_requests(load_problems("toy", split="train", limit=config.queries), estep)
    model = resolve_model(config.model)
    runs, outputs = [], []
    for n in config.workers:
        fleet = FleetConfig(workers=n, shard_size=config.shard_size)
        with open_engines(fleet, "hf", {"batch_size": config.batch_size}) as engines:
            engines.serve(model)  # loading is not part of the figure
            got: list[dict] = []
            load_before, start = os.getloadavg()[0], time.perf_counter()
            engines.rollouts(model).run(requests, sampling, on_record=got.append, progress=progress)
            seconds = time.perf_counter() - start
        outputs.append({_key(r): r["response_ids"] for r in got})
        tokens = sum(int(r["n_generated_tokens"]) for r in got)
        calls = sum(int(r["n_code_calls"]) for r in got)
        runs.append(
            {"workers": n, "trajectories": len(got), "seconds": seconds, "trajectories_per_s": len(got) / seconds,
             "tokens": tokens, "tokens_per_s": tokens / seconds, "code_calls_per_s": calls / seconds,
             "load_before": load_before, "load_after": os.getloadavg()[0]}
        )  # fmt: skip
    return {
        "workers": [r["workers"] for r in runs],
        "trajectories_per_s": [r["trajectories_per_s"] for r in runs],
        "tokens_per_s": [r["tokens_per_s"] for r in runs],
        "speedup": runs[-1]["tokens_per_s"] / runs[0]["tokens_per_s"],
        "same_records": all(o == outputs[0] for o in outputs) and len(outputs[0]) == len(requests),
        "runs": runs,
        "cpus": os.cpu_count(),
        "requests": len(requests),
    }


def _key(record: dict[str, Any]) -> tuple:
    return (str(record["benchmark"]), record["mode"], str(record["id"]), int(record["sample"]))


def print_fleet_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"E-step on the toy world: {result['requests']} trajectories, {result['cpus']} CPUs")
    for name in ("workers", "seconds", "trajectories/s", "tokens/s", "code calls/s", "load 1-min before/after"):
        table.add_column(name, justify="right")
    for r in result["runs"]:
        table.add_row(
            str(r["workers"]), f"{r['seconds']:.1f}", f"{r['trajectories_per_s']:.2f}", f"{r['tokens_per_s']:.0f}",
            f"{r['code_calls_per_s']:.2f}", f"{r['load_before']:.1f} / {r['load_after']:.1f}",
        )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(f"speedup {result['speedup']:.2f}x; same records: {result['same_records']}")


@dataclass
class PaperSetting:
    """One EM iteration of the paper's experiment, with the assumptions the estimate rests on."""

    arch: str = "qwen2.5-7b"
    device: str = "h100-sxm"
    gpus: int = 8
    queries: int = 7000
    k: int = 8
    """Rollouts per query and decision: 2K trajectories per query."""
    per_query: int = 4
    """Training trajectories kept per query by the subsample."""
    prompt_tokens: int = 200
    response_tokens: int = 600
    """Mean generated tokens per trajectory (an assumption: the paper reports no mean)."""
    batch: int = 256
    """Sequences each engine decodes at once."""
    decode_efficiency: float = 0.5
    """Share of the decode bound a serving engine reaches (vLLM-class engines: roughly 0.4-0.7)."""
    mfu: float = 0.4
    """Model FLOPs utilisation of the M-step (FSDP, bf16)."""
    reload_s: float = 120.0
    """Restarting a 7B server on a new checkpoint (load + warm-up), per iteration."""


def paper_iteration(s: PaperSetting) -> dict[str, float]:
    """Seconds per stage of one iteration (an ESTIMATE from perf.py's bounds and the setting's efficiencies)."""
    from autocode4math import perf

    a, device = perf.load_arch(s.arch), perf.DEVICES[s.device]
    trajectories = s.queries * 2 * s.k
    generated = trajectories * s.response_tokens
    bound = perf.decode_bound(a, device, s.batch, s.prompt_tokens, s.response_tokens)["tokens_per_s"]
    rollout_s = generated / (bound * s.decode_efficiency * s.gpus)
    seq = s.prompt_tokens + s.response_tokens
    trained = s.queries * s.per_query * seq
    train_s = trained / (perf.train_bound(a, device, seq) * s.mfu * s.gpus)
    ref_s = train_s / 3  # the pi_ref pass: one forward of the three passes' worth of FLOPs
    return {
        "trajectories": trajectories,
        "generated_tokens": generated,
        "decode_bound_per_gpu": bound,
        "rollout_s": rollout_s,
        "mstep_tokens": trained,
        "mstep_s": train_s,
        "ref_s": ref_s,
        "reload_s": s.reload_s,
        "total_s": rollout_s + train_s + ref_s + s.reload_s,
    }
