"""The EM loop (`autocode train`) and the baselines it is compared with, as one resumable loop.

Each iteration has three stages, each writing to its own directory under the run directory:

    iter-01/collect/   training data: E-step rollouts + subsample (em), on-policy rollouts (rl),
                       or the next slice of a fixed dataset (sft)
    iter-01/mstep/     the policy update; its model/ is the next iteration's policy
    iter-01/eval/      the dev split in all three modes (auto, cot, code)

`state.json` in the run directory lists the finished stages. Running the same command again skips
them and resumes the stage in progress: the E-step and the evaluation append their rollouts line by
line and only generate what is missing; the M-step restarts from its last training-state checkpoint.
Each stage directory records the fingerprint of what determines its output (`stage_plan`), and a
rerun whose settings, queries or starting model differ refuses before anything runs (or, with
`overwrite`, discards the stages that differ): a resumed run is the run its config.yaml describes.
`metrics.jsonl` holds one row per evaluated iteration, with the cumulative number of *generated*
tokens spent on training data (the rollout budget every method is compared under).

Methods (the paper's Fig. 4):
- `em`: guided exploration (estep.run_estep) then off-policy RL with the decision term (mstep).
- `rl`: on-policy RL, no E-step: the current policy's own auto-mode rollouts, group-normalised
  advantage, the clipped objective against the policy that generated them, no decision term.
  Started from the base model this is Base+RL; from the SFT model, SFT+RL.
- `sft`: supervised fine-tuning on a fixed dataset (for the toy world, toyworld.sft_corpus);
  it generates nothing, so its x-axis is the number of training tokens instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocode4math.benchmarks import FieldNames
from autocode4math.config import save_config
from autocode4math.estep import NOT_IN_FINGERPRINT as ESTEP_NEUTRAL
from autocode4math.estep import OUTPUTS as COLLECT_OUTPUTS
from autocode4math.estep import (
    EStepConfig,
    add_decision_tokens,
    advantages,
    backend_options,
    decision_of,
    record_key,
    run_estep,
    tokens_from_counts,
)
from autocode4math.evaluate import OUTPUTS as EVAL_OUTPUTS
from autocode4math.fingerprint import (
    SANDBOX_PLACEMENT,
    Stage,
    file_digest,
    guard,
    mismatch,
    model_identity,
    problems_digest,
    settings_of,
)
from autocode4math.fleet import FleetConfig, Rollouts, open_engines
from autocode4math.health import HealthConfig, check, reusable_records
from autocode4math.io import JsonlAppender, read_json, read_jsonl, write_json, write_jsonl
from autocode4math.launch import LaunchConfig, launch_mstep
from autocode4math.mstep import NOT_IN_FINGERPRINT as MSTEP_NEUTRAL
from autocode4math.mstep import MStepConfig, mstep_stage, run_mstep
from autocode4math.prompts import CODE_PREFIX, MODES
from autocode4math.rollout import resolve_model
from autocode4math.sandbox import SandboxConfig

METHODS = ("em", "rl", "sft")


@dataclass
class DevEval:
    """The evaluation after each iteration."""

    source: str = "toy:dev"
    """Anything `benchmarks.load_problems` reads (`toy:dev` is the toy world's dev split)."""
    modes: list[str] = field(default_factory=lambda: ["auto", "cot", "code"])
    limit: int | None = None
    """Evaluate only the first `limit` questions (None: all)."""
    max_new_tokens: int = 512
    batch_size: int = 32
    every: int = 1
    """Evaluate after every `every` iterations (and always after the last); 0 never."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0, got {self.every}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (None: all), got {self.limit}")
        if not self.modes or set(self.modes) - set(MODES):
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")


@dataclass
class TrainConfig:
    """One training run: a method, a starting model, a query set and the stage settings."""

    method: str = "em"
    """em, rl or sft."""
    model: str = "toy-base"
    """Starting checkpoint: a directory, a hub id, or a shipped toy checkpoint (toy-base, toy-sft, toy-mid-base)."""
    queries: str = "toy"
    """Training queries: anything `load_problems` reads (its train split)."""
    queries_limit: int | None = None
    """Use only the first `queries_limit` queries (None: all)."""
    fields: FieldNames = field(default_factory=FieldNames)
    """Names of the question/answer/id fields in a queries file or Hub dataset (default: detected)."""
    iterations: int = 3
    out: str = "runs/train"
    """Run directory (resumed when it already exists)."""
    rl_samples: int = 16
    """rl: auto-mode rollouts per query and iteration (2K, the E-step's count over both decisions)."""
    sft_data: str | None = None
    """sft: a JSONL of training records; None builds the toy world's fixed SFT set."""
    sft_per_iteration: int = 256
    """sft: records consumed per iteration."""
    estep: EStepConfig = field(default_factory=EStepConfig)
    mstep: MStepConfig = field(default_factory=MStepConfig)
    eval: DevEval = field(default_factory=DevEval)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    """Where rollouts run (E-step, RL collection, dev evaluation): this process, or `--workers N` Ray actors."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """How the M-step runs: in this process, or `--launch PRESET` under accelerate launch."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Where and under which limits model code runs, in every stage (e.g. `--set sandbox.url=http://host:8100`)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Tool-health alarms of every rollout stage (E-step, collection, dev evaluation)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.queries_limit is not None and self.queries_limit < 1:
            raise ValueError(f"queries_limit must be >= 1 (None: all), got {self.queries_limit}")
        if self.rl_samples < 2:
            raise ValueError("rl_samples must be >= 2 (the advantage is normalised within a query's group)")
        if self.sft_per_iteration < 1:
            raise ValueError(f"sft_per_iteration must be >= 1, got {self.sft_per_iteration}")
        if self.estep.sandbox != SandboxConfig():
            raise ValueError("set the run's sandbox with sandbox.* (it serves every stage), not estep.sandbox.*")
        if self.estep.backend == "openai" and not self.fleet.server:
            raise ValueError(
                "training with backend openai needs fleet.server, a command that serves each iteration's policy "
                "(e.g. 'vllm serve {model} --port {port}'): a server started by hand keeps the model it loaded"
            )
        if self.fleet.server and self.estep.backend != "openai":
            raise ValueError("fleet.server starts an OpenAI-compatible server: set estep.backend=openai")


class RunState:
    """The finished stages of a run, persisted in state.json after each one."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"
        self.done: dict[str, Any] = read_json(self.path) if self.path.exists() else {}

    def get(self, stage: str) -> Any:
        return self.done.get(stage)

    def finish(self, stage: str, result: Any) -> None:
        self.done[stage] = result
        write_json(self.path, self.done)

    def forget(self, stage: str) -> None:
        if self.done.pop(stage, None) is not None:
            write_json(self.path, self.done)


def train(config: TrainConfig, progress: bool = True, overwrite: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) the loop; return the per-iteration metrics rows (also in metrics.jsonl).

    Before anything runs, every stage's recorded fingerprint is checked against this config
    (`stage_plan`): results made under other settings raise ResumeError naming them, or with
    `overwrite` are discarded and redone (matching stages are kept). Only then is config.yaml written.
    """
    from autocode4math.benchmarks import load_problems

    policy = resolve_model(config.model)  # a checkpoint the M-step trains, whatever serves its rollouts
    problems = load_problems(config.queries, split="train", limit=config.queries_limit, **config.fields.as_kwargs())
    run = Path(config.out)
    plan = stage_plan(config, run, problems)
    state = RunState(run)
    for key, stage in plan.items():  # stages not started yet record theirs when they start
        if overwrite and mismatch(stage) is not None:
            state.forget(key)  # first, so a kill now leaves the stage to be redone
        if stage.directory.exists():
            guard(stage, overwrite)
    save_config(config, run / "config.yaml")
    spent = {"tokens": 0, "train_tokens": 0}
    rows = []
    with open_engines(config.fleet, config.estep.backend, backend_options(config.estep), config.sandbox) as engines:
        if "0/eval" in plan:
            rows.append(_evaluate_stage(state, plan["0/eval"], engines.rollouts(policy), config, 0, spent, progress))
        for it in range(1, config.iterations + 1):
            collected = state.get(f"{it}/collect")
            if collected is None:
                collected = collect(config, engines.rollouts(policy), problems, plan[f"{it}/collect"], it, progress)
                state.finish(f"{it}/collect", collected)
            spent = {k: spent[k] + collected[k] for k in spent}
            model = state.get(f"{it}/mstep")
            if model is None:
                engines.release()  # the M-step may need the accelerators the engines hold
                model = _update(config, policy, collected["data"], it, plan[f"{it}/mstep"], progress)
                state.finish(f"{it}/mstep", model)
            policy = model
            if f"{it}/eval" in plan:
                stage = plan[f"{it}/eval"]
                rows.append(_evaluate_stage(state, stage, engines.rollouts(policy), config, it, spent, progress))
    write_jsonl(run / "metrics.jsonl", rows)
    write_json(run / "final.json", {"model": policy, "iterations": config.iterations, **spent})
    return rows


def stage_plan(config: TrainConfig, run: Path, problems: list[Any]) -> dict[str, Stage]:
    """Every stage of the run ("0/eval", "1/collect", "1/mstep", "1/eval", ...) with its fingerprint.

    Settings are named as in TrainConfig (`estep.k`, `mstep.lr`), so a refusal names what to `--set`.
    The model a stage starts from is the starting checkpoint by content, then `iter-NN/mstep#digest`:
    the fingerprint of the M-step that produced it, which covers its data and its own starting model.
    """
    model = model_identity(resolve_model(config.model))
    queries = problems_digest(problems)
    plan = {"0/eval": _eval_stage(config, run / "iter-00" / "eval", model)} if config.eval.every else {}
    for it in range(1, config.iterations + 1):
        d = run / f"iter-{it:02d}"
        collect = Stage(
            d / "collect",
            f"{config.method} collection",
            {"method": config.method, "iteration": it, **_collect_settings(config), "queries": queries, "model": model},
            COLLECT_OUTPUTS,
        )
        mstep = mstep_stage(
            d / "mstep",
            {
                "method": config.method,
                "iteration": it,
                **settings_of(config.mstep, "mstep.", MSTEP_NEUTRAL),
                "model": model,
                "data": f"iter-{it:02d}/collect#{collect.digest}",
            },
        )
        plan[f"{it}/collect"], plan[f"{it}/mstep"] = collect, mstep
        model = f"iter-{it:02d}/mstep#{mstep.digest}"
        if config.eval.every and (it % config.eval.every == 0 or it == config.iterations):
            plan[f"{it}/eval"] = _eval_stage(config, d / "eval", model)
    return plan


RL_USES = ("rollout", "prompt", "backend", "adv_eps")
"""EStepConfig fields the rl method's collection uses."""


def _collect_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings a method's data collection depends on (besides iteration, queries and model)."""
    if config.method == "em":  # the run's engines use the top-level sandbox, not estep.sandbox
        return {**settings_of(config.estep, "estep.", (*ESTEP_NEUTRAL, "sandbox")), **_sandbox_limits(config)}
    if config.method == "rl":
        unused = [f.name for f in dataclasses.fields(EStepConfig) if f.name not in RL_USES]
        estep = settings_of(config.estep, "estep.", [*unused, *ESTEP_NEUTRAL])
        return {"rl_samples": config.rl_samples, **estep, **_sandbox_limits(config)}
    data = file_digest(config.sft_data) if config.sft_data else "toy sft corpus"
    return {"sft_data": data, "sft_per_iteration": config.sft_per_iteration}


def _sandbox_limits(config: TrainConfig) -> dict[str, Any]:
    """The run's sandbox settings that can change what a code block returns (`sandbox.timeout_s`, ...)."""
    return {k: v for k, v in settings_of(config, leave_out=SANDBOX_PLACEMENT).items() if k.startswith("sandbox.")}


def _eval_stage(config: TrainConfig, directory: Path, model: str) -> Stage:
    settings = {
        **settings_of(config.eval, "eval.", ("batch_size", "every")),
        "estep.backend": config.estep.backend,
        **settings_of(config.estep.prompt, "estep.prompt."),
        **_sandbox_limits(config),
        "model": model,
    }
    return Stage(directory, "evaluation", settings, EVAL_OUTPUTS)


def _update(config: TrainConfig, policy: str, data: str, it: int, stage: Stage, progress: bool) -> str:
    """The M-step of iteration `it`: in this process, or under accelerate launch with the configured preset."""
    mstep_config, out, fingerprint = _mstep_config(config, it), stage.directory, stage.settings
    guard(stage)  # before a launched child writes its files there
    if config.launch.preset:
        return str(launch_mstep(policy, data, mstep_config, out, config.launch, progress, fingerprint))
    return str(run_mstep(policy, data, mstep_config, out, progress=progress, fingerprint=fingerprint))


def _mstep_config(config: TrainConfig, iteration: int) -> MStepConfig:
    """Per-method M-step settings: rl has no decision term, sft the supervised objective; seeds vary by iteration."""
    changes: dict[str, Any] = {"seed": config.mstep.seed + iteration}
    if config.method == "rl":
        changes["decision_weight"] = changes["cot_anchor_weight"] = changes["cot_replay_weight"] = 0.0
    if config.method == "sft":  # the cot anchor and the cot replay are EM's terms
        changes["objective"] = "sft"
        changes["cot_anchor_weight"] = changes["cot_replay_weight"] = 0.0
    return dataclasses.replace(config.mstep, **changes)


def collect(
    config: TrainConfig, rollouts: Rollouts, problems: list[Any], stage: Stage, it: int, progress: bool
) -> dict:
    """Build one iteration's training data with the current policy's `rollouts` in the stage's directory.

    Returns {data: path, tokens: generated, train_tokens: trained}.
    """
    out = stage.directory
    guard(stage)
    if config.method == "em":
        estep = dataclasses.replace(config.estep, seed=config.estep.seed + it)
        summary = run_estep(
            rollouts, problems, estep, out, progress=progress, fingerprint=stage.settings, health=config.health
        )
        data = out / "train.jsonl"
        return {"data": str(data), "tokens": summary["generated_tokens"], "train_tokens": _train_tokens(data)}
    if config.method == "rl":
        return collect_on_policy(config, rollouts, problems, out, it, progress)
    return collect_sft(config, rollouts.policy, out, it)


def collect_on_policy(
    config: TrainConfig, rollouts: Rollouts, problems: list[Any], out: Path, it: int, progress: bool
) -> dict:
    """On-policy rollouts of the current policy in auto mode; every rollout is a training record."""
    from autocode4math.rollout import RolloutStats, make_requests

    path = out / "rollouts.jsonl"
    done = reusable_records(path, record_key)
    requests = make_requests(problems, ["auto"], config.rl_samples, config.estep.prompt)
    todo = [r for r in requests if _request_key(r) not in done]
    stats = RolloutStats()
    if todo:
        rollout = dataclasses.replace(config.estep.rollout, seed=config.estep.rollout.seed + it)
        with JsonlAppender(path) as sink:

            def keep(record: dict[str, Any]) -> None:
                sink.write(record)
                done[record_key(record)] = record

            prompt = config.estep.prompt
            rollouts.run(todo, rollout, on_record=keep, prompt_config=prompt, progress=progress, stats=stats)
    records = [done[_request_key(r)] for r in requests]
    tools = check(records, config.health, f"the rl collection in {out}")
    code_prefix = config.estep.prompt.code_prefix
    adv = advantages(records, config.estep.adv_eps)
    train = []
    for record, a in zip(records, adv, strict=True):
        row = {**record, "c": decision_of(record, code_prefix), "advantage": a, "key": record_key(record)}
        add_decision_tokens(row, rollouts.tokenizer, code_prefix + "\n", code_prefix)
        train.append(row)
    data = out / "train.jsonl"
    write_jsonl(data, train)
    tokens = sum(int(r["n_generated_tokens"]) for r in records)
    summary = {"n_rollouts": len(records), "generated_tokens": tokens, "tokens_from": tokens_from_counts(records)}
    summary["tools"] = tools
    write_json(out / "summary.json", {**summary, "rollout": stats.to_dict() if stats.trajectories else None})
    return {"data": str(data), "tokens": tokens, "train_tokens": _train_tokens(data)}


def collect_sft(config: TrainConfig, policy: str, out: Path, it: int) -> dict:
    """Records (it-1)*n .. it*n of the fixed dataset (cycling through a given file), with advantage 1."""
    n = config.sft_per_iteration
    if config.sft_data:
        rows = list(read_jsonl(config.sft_data))
        chunk = [rows[((it - 1) * n + i) % len(rows)] for i in range(n)]
    else:
        chunk = toy_sft_records(policy, it * n, code_prefix=config.estep.prompt.code_prefix)[-n:]
    data = out / "train.jsonl"
    write_jsonl(data, chunk)
    return {"data": str(data), "tokens": 0, "train_tokens": _train_tokens(data)}


def toy_sft_records(policy: str, n: int, seed: int = 1, code_prefix: str = CODE_PREFIX) -> list[dict[str, Any]]:
    """The first `n` records of the toy world's fixed SFT set, tokenized and masked as the engine records them."""
    from transformers import AutoTokenizer

    from autocode4math.rollout.engine import encode, encode_prompt, response_tokens
    from autocode4math.toyworld import held_out_questions, sft_corpus

    tokenizer = AutoTokenizer.from_pretrained(policy)
    rows = []
    for i, demo in enumerate(sft_corpus(n, seed, exclude=held_out_questions())):
        response_ids, mask, _ = response_tokens(tokenizer, demo.response, tokenizer.eos_token_id)
        row = {
            "key": f"sft/{i}",
            "prompt_ids": encode_prompt(tokenizer, demo.prompt),
            "prefix": demo.prefix,
            "prefix_ids": encode(tokenizer, demo.prefix),
            "response": demo.response,
            "response_ids": response_ids,
            "response_mask": mask,
            "advantage": 1.0,
            "correct": True,
            "used_code": "```python" in demo.response,
        }
        rows.append({**row, "c": decision_of(row, code_prefix)})
    return rows


def _train_tokens(path: Path) -> int:
    return sum(sum(r["response_mask"]) for r in read_jsonl(path))


def _request_key(request: Any) -> str:
    bench, mode, qid, sample = request.key()
    return f"{bench}/{mode}/{qid}/{sample}"


def _evaluate_stage(
    state: RunState, stage: Stage, rollouts: Rollouts, config: TrainConfig, it: int, spent: dict, progress: bool
) -> dict[str, Any]:
    """Evaluate the policy of `rollouts` on the dev set (resumable) and return this iteration's metrics row."""
    from autocode4math.evaluate import EvalConfig, run_eval

    out = stage.directory
    row = state.get(f"{it}/eval")
    if row is None:
        policy = rollouts.policy
        ev = EvalConfig(
            model=policy,
            benchmarks=[config.eval.source],
            modes=list(config.eval.modes),
            n=1,
            temperature=0.0,
            limit=config.eval.limit,
            out=str(out),
            max_new_tokens=config.eval.max_new_tokens,
            batch_size=config.eval.batch_size,
            backend=config.estep.backend,
            server=config.estep.server,
            prompt=config.estep.prompt,
            sandbox=config.sandbox,
            health=config.health,
        )
        metrics = run_eval(ev, rollouts=rollouts, progress=progress, fingerprint=stage.settings)
        row = {"iteration": it, "method": config.method, "model": policy, **spent, **flatten_metrics(metrics)}
        state.finish(f"{it}/eval", row)
    return row


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures the report plots, from an evaluation's metrics (its first benchmark)."""
    (bench, m), *_ = metrics["benchmarks"].items()
    out: dict[str, Any] = {"benchmark": bench}
    for mode, mm in m["modes"].items():
        out[f"{mode}_accuracy"] = mm["accuracy"]
        out[f"{mode}_code_use_rate"] = mm["code_use_rate"]
        out[f"{mode}_code_after_text_rate"] = mm["code_after_text_rate"]
    out["union"] = m.get("union")
    out["selection_accuracy"] = (m.get("selection") or {}).get("selection_accuracy")
    return out
