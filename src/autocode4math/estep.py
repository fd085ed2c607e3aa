"""E-step (guided exploration): roll out both code decisions, value them, and subsample a training set.

The paper's Eq. 5 turns rollouts into a reference strategy over the code decision c per query x:
    s*(c|x) = exp(alpha * pi(c|x) * Q(x, c)) / Z(x)
where Q(x, c) is the success rate of decision c and pi(c|x) the model's own, unprompted rate of
taking it. The training set is drawn from the rollouts with these weights, so that the M-step sees
mostly trajectories of the decision that pays off, in proportion to how much it pays off.

The pure parts (`q_values`, `code_prior`, `reference_strategy`, `advantages`, `subsample`) work on
plain records and are unit-tested on hand-built numbers; `run_estep` drives the rollout engine.

Choices (docs/method.md explains them in full):
- c=0 rollouts are plain generation: the `auto` prompt with no prefix (`c0_mode="auto"`), and the
  same rollouts estimate pi. `c0_mode="cot"` instead uses the no-code instruction and adds `n_auto`
  separate auto-mode rollouts for pi.
- A trajectory's c is what it did at its decision point: 1 if the code prefix was forced or code
  was executed, else 0. Plain generation that wrote code on its own therefore counts as c=1.
- pi(c=1|x) is smoothed with a symmetric Beta prior: (n_code + a) / (n + 2a), a = `pi_prior`.
- The advantage is the reward normalised over all of the query's rollouts (mean and std of
  `correct`), computed before subsampling so the baseline uses every rollout.
- `skip_unsolved` (off by default) draws nothing from a state no rollout solved: there s* is uniform for
  want of evidence, and the draw would train only the decision term, towards 1/2. `skip_failed_decisions`
  (off by default) goes further: no draws of a decision whose rollouts from that state all failed.
- Mid-reasoning rollouts (continuations of a partial solution y<t) are a state of their own: Q, pi,
  s*, the advantage and the subsample are per (query, y<t), not pooled with the query's (`state_of`).

Deliberately simplified: one decision per trajectory (the first); the reward is 0/1 correctness.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocode4math.fingerprint import SANDBOX_PLACEMENT, Stage, guard, model_identity, problems_digest, settings_of
from autocode4math.health import HealthConfig, check, reusable_records
from autocode4math.io import JsonlAppender, write_json, write_jsonl
from autocode4math.prompts import CODE_PREFIX, PromptConfig
from autocode4math.rollout.engine import RolloutConfig, RolloutRequest, encode
from autocode4math.rollout.openai import ServerConfig
from autocode4math.rollout.stats import RolloutStats
from autocode4math.sandbox import SandboxConfig, open_sandbox

MID_OFFSET = 10_000
"""Sample indices of mid-reasoning continuations start here, so their keys never clash with the rest."""


@dataclass
class EStepConfig:
    """How the E-step explores and subsamples."""

    k: int = 8
    """Rollouts per query and decision (the paper's K)."""
    alpha: float = 1.0
    """Inverse temperature of the reference strategy s* (0: both decisions equally likely)."""
    per_query: int = 4
    """Training trajectories drawn per query (without replacement)."""
    size: int = 0
    """If > 0, the total training set size, spread evenly over queries (overrides per_query)."""
    c0_mode: str = "auto"
    """Prompt of c=0 rollouts: `auto` (plain generation, also used for pi) or `cot`."""
    n_auto: int = 8
    """Auto-mode rollouts for pi when c0_mode is `cot` (otherwise the c=0 rollouts serve)."""
    pi_prior: float = 1.0
    """Pseudo-count a of the Beta(a, a) prior smoothing pi(c=1|x) = (n_code + a) / (n + 2a)."""
    adv_eps: float = 1e-6
    """Added to the per-query reward std before dividing."""
    skip_unsolved: bool = False
    """Draw no training records from a state that no rollout solved (Q = 0 for every decision). Their
    advantages are all 0, so the M-step's policy term ignores them and they train only the decision term,
    towards s*'s 1/2 : 1/2, which there reflects no evidence for either decision (docs/method.md). False
    keeps them, as the paper's Eq. 5 does."""
    skip_failed_decisions: bool = False
    """Draw no trajectory of a decision that none of its rollouts from that state solved (Q(x, c) = 0); the
    state's draws come from the other decision. Eq. 5 gives such a decision weight exp(0) / Z > 0, so its failed
    trajectories would train the decision term towards a choice with no success behind it (docs/method.md).
    Implies skip_unsolved. False keeps the paper's Eq. 5."""
    seed: int = 0
    """Seeds subsampling and mid-reasoning cut points."""
    mid_reasoning: bool = False
    """Also roll out from partial solutions, with and without the code prefix."""
    mid_per_query: int = 1
    """Partial solutions cut per query (from finished auto-mode trajectories without code)."""
    mid_k: int = 2
    """Continuations per partial solution and decision."""
    mid_per_state: int = 2
    """Training trajectories drawn per partial solution (each is its own state with its own Q, pi and s*)."""
    backend: str = "hf"
    """Rollout backend when `model` is a path: hf, openai or vllm."""
    batch_size: int = 16
    """Generation batch size (hf backend)."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """openai backend: server URLs, tokenizer, API key variable, concurrency, token ids, timeouts, retries."""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(temperature=1.0, top_p=0.9))
    """Sampling of the rollouts (the paper: temperature 1.0, top-p 0.9)."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt template and code prefix."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Where and under which limits model code runs (e.g. `--set sandbox.url=http://host:8100`, `sandbox.timeout_s`)."""

    def __post_init__(self) -> None:
        for name in ("k", "per_query", "n_auto", "mid_per_query", "mid_k", "mid_per_state", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.pi_prior < 0:
            raise ValueError(f"pi_prior must be >= 0, got {self.pi_prior}")
        if self.c0_mode not in ("auto", "cot"):
            raise ValueError(f"c0_mode must be 'auto' or 'cot', got {self.c0_mode!r}")


def record_key(record: dict[str, Any]) -> str:
    """A trajectory's identity in audit files: benchmark/mode/id/sample (the engine's request key)."""
    return f"{record['benchmark']}/{record['mode']}/{record['id']}/{record['sample']}"


def _code_prefixed(record: dict[str, Any], code_prefix: str) -> bool:
    return record["prefix"].rstrip().endswith(code_prefix.strip())


def decision_of(record: dict[str, Any], code_prefix: str) -> int:
    """The code decision c of a trajectory, the one definition of docs/method.md ("The code decision c").

    c = 1 when the code prefix stands at the trajectory's decision point, forced or written by the model
    as its first words, or when it executed code; else 0. The prefix decides, not what follows it: a
    prefixed trajectory that then runs no code took c = 1 and declined code afterwards.
    """
    written = record["response"].lstrip().startswith(code_prefix.strip())
    return int(_code_prefixed(record, code_prefix) or written or bool(record["used_code"]))


def state_of(record: dict[str, Any]) -> str:
    """The decision point a rollout starts from: its query id, or for a mid-reasoning rollout the query id
    and the partial solution y<t it continues (`id|y<t`). Q, pi, s* and the advantage are per state."""
    partial = record.get("partial", "")
    return f"{record['id']}|{partial}" if partial else str(record["id"])


def q_values(records: Sequence[dict[str, Any]], code_prefix: str) -> dict[str, dict[int, float | None]]:
    """Q(x, c): success rate of each decision per state (`state_of`: the query id, plus the partial solution
    for mid-reasoning rollouts); None where no rollout took that decision."""
    counts: dict[str, list[list[int]]] = defaultdict(lambda: [[0, 0], [0, 0]])
    for r in records:
        cell = counts[state_of(r)][decision_of(r, code_prefix)]
        cell[0] += int(bool(r["correct"]))
        cell[1] += 1
    return {qid: {c: (ok / n if n else None) for c, (ok, n) in enumerate(cells)} for qid, cells in counts.items()}


def code_prior(
    records: Sequence[dict[str, Any]], prior: float = 1.0, code_prefix: str = CODE_PREFIX
) -> dict[str, float]:
    """pi(c=1|x) per state (`state_of`) from its auto-mode rollouts without a forced code prefix (a mid-reasoning
    one continues its partial solution), Beta(prior, prior) smoothed.

    A rollout counts as c=1 by `decision_of`: it wrote the code prefix itself or executed code.
    """
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        if r["mode"] == "auto" and r["prefix"] == r.get("partial", ""):
            counts[state_of(r)][0] += decision_of(r, code_prefix)
            counts[state_of(r)][1] += 1
    out = {}
    for qid, (k, n) in counts.items():
        if n + 2 * prior == 0:
            raise ValueError(f"query {qid}: no auto-mode rollouts and no prior; cannot estimate pi")
        out[qid] = (k + prior) / (n + 2 * prior)
    return out


def reference_strategy(pi_code: float, q: dict[int, float | None], alpha: float) -> dict[int, float]:
    """s*(c|x) = exp(alpha * pi(c|x) * Q(x,c)) / Z(x), over the decisions that have rollouts (Q not None)."""
    if not 0 <= pi_code <= 1:
        raise ValueError(f"pi(c=1|x) must be in [0, 1], got {pi_code}")
    pi = {0: 1.0 - pi_code, 1: pi_code}
    energies = {c: alpha * pi[c] * qc for c, qc in q.items() if qc is not None}
    if not energies:
        raise ValueError("reference_strategy: no decision has any rollout")
    top = max(energies.values())
    weights = {c: math.exp(e - top) for c, e in energies.items()}
    z = sum(weights.values())
    return {c: weights.get(c, 0.0) / z for c in (0, 1)}


def advantages(records: Sequence[dict[str, Any]], eps: float = 1e-6) -> list[float]:
    """State-wise normalised reward: (r - mean_x) / (std_x + eps), r = correct in {0, 1}, over the rollouts of
    the same state (`state_of`: a query, or a query's partial solution)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        groups[state_of(r)].append(float(bool(r["correct"])))
    stats = {}
    for key, rewards in groups.items():
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards))
        stats[key] = (mean, std)
    return [(float(bool(r["correct"])) - stats[state_of(r)][0]) / (stats[state_of(r)][1] + eps) for r in records]


def _weighted_sample(items: Sequence[int], weights: Sequence[float], n: int, rng: random.Random) -> list[int]:
    """n items without replacement, item i with probability proportional to weights[i] (Efraimidis-Spirakis)."""
    keyed = [(rng.random() ** (1.0 / w), i) for i, w in zip(items, weights, strict=True) if w > 0]
    return [i for _, i in sorted(keyed, reverse=True)[:n]]


def quotas(query_ids: Sequence[str], per_query: int, size: int, seed: int) -> dict[str, int]:
    """Training trajectories per query: per_query each, or `size` spread evenly (extras to seeded queries)."""
    if size <= 0:
        return {q: per_query for q in query_ids}
    base, extra = divmod(size, len(query_ids))
    lucky = set(random.Random(seed).sample(list(query_ids), extra))
    return {q: base + (q in lucky) for q in query_ids}


def subsample(
    records: Sequence[dict[str, Any]], config: EStepConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Draw the training set with the weights of Eq. 5; return (training records, audit rows per state).

    A trajectory y from state x (a query, or a query's partial solution) with decision c gets weight
    s*(c|x) / |D(x, c)|: choosing c by s* and then a trajectory of that decision uniformly. A query's own
    state gets `per_query` (or its share of `size`) trajectories, each mid-reasoning state `mid_per_state`.
    Training records are the rollout records plus `c`, `advantage` and `key`.
    """
    code_prefix = config.prompt.code_prefix
    q, pi = q_values(records, code_prefix), code_prior(records, config.pi_prior, code_prefix)
    adv = advantages(records, config.adv_eps)
    by_state: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_state[state_of(r)].append(i)
    starts = sorted({str(r["id"]) for r in records})
    quota = quotas(starts, config.per_query, config.size, config.seed)
    train, audit = [], []
    for state in sorted(by_state):
        idx = by_state[state]
        pi1 = pi.get(state, 0.5 if config.pi_prior > 0 else 0.0)
        s = reference_strategy(pi1, q[state], config.alpha)
        cs = {i: decision_of(records[i], code_prefix) for i in idx}
        sizes = [sum(c == d for c in cs.values()) for d in (0, 1)]
        weights = [s[cs[i]] / sizes[cs[i]] for i in idx]
        if config.skip_failed_decisions:  # an unsolved state is left with no weight at all, so no draws
            weights = [w if q[state][cs[i]] else 0.0 for w, i in zip(weights, idx, strict=True)]
        n = quota.get(state, config.mid_per_state)
        if config.skip_unsolved and not any(q[state].values()):
            n = 0
        chosen = _weighted_sample(idx, weights, n, random.Random(f"{config.seed}/{state}"))
        for i in chosen:
            train.append({**records[i], "c": cs[i], "advantage": adv[i], "key": record_key(records[i])})
        audit.append(
            {
                "id": str(records[idx[0]]["id"]),
                "partial": records[idx[0]].get("partial", ""),
                "Q": {str(c): v for c, v in q[state].items()},
                "pi_code": pi1,
                "s_star": {str(c): v for c, v in s.items()},
                "n": {str(c): n for c, n in enumerate(sizes)},
                "chosen": [record_key(records[i]) for i in chosen],
                "chosen_c": [cs[i] for i in chosen],
            }
        )
    return train, audit


def add_decision_tokens(record: dict[str, Any], tokenizer: Any, code_prefix_text: str, code_prefix: str) -> None:
    """Attach the tokens of the decision term to a training record (in place).

    `decision_context_ids` are the prompt plus any partial solution (mid-reasoning); `decision_ids` are
    the code-prefix tokens whose probability is pi_theta(c=1|x). They are empty (no decision term)
    for a c=1 trajectory whose prefix was not forced (it wrote the prefix, or code, itself): its choice
    lies in its own tokens, which the policy term trains; a decision term on them could only repeat it.
    """
    forced = _code_prefixed(record, code_prefix)
    if record["c"] == 1 and not forced:
        record["decision_context_ids"], record["decision_ids"] = [], []
        return
    partial = record.get("partial", "")
    record["decision_context_ids"] = list(record["prompt_ids"]) + encode(tokenizer, partial)
    record["decision_ids"] = encode(tokenizer, code_prefix_text)


def add_anchor_tokens(record: dict[str, Any], tokenizer: Any, prompt: PromptConfig) -> None:
    """Attach the cot anchor's tokens to a training record (in place): the question's cot prompt
    (`anchor_context_ids`) and the code-prefix tokens (`anchor_ids`), for the M-step's c=0 term under it."""
    from autocode4math.prompts import build_prompt
    from autocode4math.rollout.engine import encode_prompt

    cot = build_prompt(record["question"], "cot", tokenizer, prompt)
    record["anchor_context_ids"] = encode_prompt(tokenizer, cot.text)
    record["anchor_ids"] = encode(tokenizer, prompt.code_prefix + "\n")


def cut_point(response: str, rng: random.Random) -> int | None:
    """A seeded step boundary: just after a newline, before any code block and before the last line."""
    head = response.split("```python", 1)[0]
    body = head.rstrip("\n")
    cuts = [i + 1 for i, ch in enumerate(body) if ch == "\n"]
    return rng.choice(cuts) if cuts else None


def mid_requests(
    records: Sequence[dict[str, Any]], problems: dict[str, Any], config: EStepConfig
) -> tuple[list[RolloutRequest], dict[tuple, str]]:
    """Continuations from partial solutions: cut finished no-code auto trajectories, continue with/without prefix.

    Returns the requests and, per request key, the partial solution it continues (for the records).
    """
    code_text = config.prompt.code_prefix + "\n"
    sources: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        c = decision_of(r, config.prompt.code_prefix)
        if r["mode"] == "auto" and not r["prefix"] and not c and r["finish_reason"] == "answer":
            sources[str(r["id"])].append(r)
    requests, partials = [], {}
    for qid in sorted(sources):
        rng = random.Random(f"{config.seed}/mid/{qid}")
        picked = rng.sample(sources[qid], min(config.mid_per_query, len(sources[qid])))
        for j, src in enumerate(sorted(picked, key=lambda r: r["sample"])):
            at = cut_point(src["response"], rng)
            if at is None:
                continue
            partial = src["response"][:at]
            for s in range(config.mid_k):
                sample = MID_OFFSET + j * config.mid_k + s
                for mode, prefix in (("auto", partial), ("code", partial + code_text)):
                    req = RolloutRequest(problems[qid], mode, sample, prefix)
                    requests.append(req)
                    partials[req.key()] = partial
    return requests, partials


def main_requests(problems: Sequence[Any], config: EStepConfig) -> list[RolloutRequest]:
    """K rollouts for c=0 (plain or cot), K with the code prefix, and auto rollouts for pi if c=0 is cot."""
    from autocode4math.rollout.engine import make_requests

    reqs = make_requests(problems, [config.c0_mode, "code"], config.k, config.prompt)
    if config.c0_mode == "cot":
        reqs += make_requests(problems, ["auto"], config.n_auto, config.prompt)
    return reqs


def _key_of(record: dict[str, Any]) -> tuple:
    return (str(record["benchmark"]), record["mode"], str(record["id"]), record["sample"])


def _run_missing(rollouts, requests, config, path: Path, partials, progress: bool, stats) -> list[dict[str, Any]]:
    """Run the requests whose records are not yet in `path`; return all records of `requests`."""
    done = reusable_records(path, _key_of)
    todo = [r for r in requests if r.key() not in done]
    if todo:
        with JsonlAppender(path) as out:

            def keep(record: dict[str, Any]) -> None:
                if _key_of(record) in partials:
                    record["origin"], record["partial"] = "mid", partials[_key_of(record)]
                out.write(record)
                done[_key_of(record)] = record

            rollouts.run(todo, config.rollout, on_record=keep, prompt_config=config.prompt, progress=progress,
                         stats=stats)  # fmt: skip
    return [done[r.key()] for r in requests if r.key() in done]


NOT_IN_FINGERPRINT = ("batch_size", "rollout.max_active", *SANDBOX_PLACEMENT)
"""EStepConfig fields that cannot change the E-step's output (batching; where and how the sandbox runs)."""
OUTPUTS = ("rollouts.jsonl", "train.jsonl", "audit.jsonl", "summary.json", "estep_config.yaml", "*.tmp")
"""What the E-step (and the baselines' data collection) writes in its directory."""


def fingerprint_settings(model: Any, problems: Sequence[Any], config: EStepConfig) -> dict[str, Any]:
    """What determines a standalone E-step's output: its config, the queries and the model, by content.

    The model is a checkpoint path, or the rollouts of a fleet (by their policy's path); a ready
    Backend object (tests, custom servers) is identified by its class name only.
    """
    policy = model if isinstance(model, (str, Path)) else getattr(model, "policy", None)
    identity = model_identity(str(policy)) if policy else f"backend:{type(model).__name__}"
    return {
        **settings_of(config, leave_out=NOT_IN_FINGERPRINT),
        "queries": problems_digest(problems),
        "model": identity,
    }


def backend_options(config: EStepConfig) -> dict[str, Any]:
    """Keyword arguments of `rollout.make_backend` for the E-step's backend."""
    from autocode4math.rollout import backend_kwargs

    return backend_kwargs(config.backend, batch_size=config.batch_size, server=config.server)


def run_estep(
    model: Any,
    queries: Sequence[Any] | str,
    config: EStepConfig,
    out_dir: str | Path,
    *,
    sandbox: Any = None,
    grader: Callable | None = None,
    progress: bool = True,
    overwrite: bool = False,
    fingerprint: dict[str, Any] | None = None,
    health: HealthConfig | None = None,
) -> dict[str, Any]:
    """Roll out, value and subsample; write rollouts.jsonl, train.jsonl, audit.jsonl, summary.json under out_dir.

    `model` is a checkpoint path (loaded here with `config.backend`), a ready rollout Backend, or the
    rollouts of a fleet (`fleet.Rollouts`: anything with `run` and `tokenizer`); `queries` a list of
    Problems or a `benchmarks.load_problems` source. Rollouts are appended as they finish,
    so running again after an interruption only generates what is missing. Rollouts made under
    another fingerprint (`fingerprint_settings`, or `fingerprint` from a caller that knows its inputs'
    identities) raise ResumeError, or are discarded with `overwrite`. The summary counts code calls and
    grading by status; with `health`, a tool-health alarm raises ToolHealthError once the rollouts are
    written (a rerun redoes the failed ones). Returns the summary.
    """
    from autocode4math.benchmarks import load_problems
    from autocode4math.config import save_config
    from autocode4math.fleet import as_rollouts

    problems = load_problems(queries, split="train") if isinstance(queries, str) else list(queries)
    if not problems:
        raise ValueError("run_estep: no queries")
    out = Path(out_dir)
    guard(Stage(out, "E-step", fingerprint or fingerprint_settings(model, problems, config), OUTPUTS), overwrite)
    save_config(config, out / "estep_config.yaml")
    own_sandbox = sandbox is None and not (hasattr(model, "run") and hasattr(model, "tokenizer"))
    sandbox = open_sandbox(config.sandbox) if own_sandbox else sandbox
    try:
        rollouts = as_rollouts(model, config.backend, backend_options(config), sandbox, grader)
        path = out / "rollouts.jsonl"
        stats = RolloutStats()
        records = _run_missing(rollouts, main_requests(problems, config), config, path, {}, progress, stats)
        if config.mid_reasoning:
            by_id = {str(p.id): p for p in problems}
            reqs, partials = mid_requests(records, by_id, config)
            records += _run_missing(rollouts, reqs, config, path, partials, progress, stats)
    finally:
        if own_sandbox:
            sandbox.close()
    tools = check(records, health or HealthConfig(check=False), f"the E-step in {out}")
    train, audit = subsample(records, config)
    code_text = config.prompt.code_prefix + "\n"
    for row in train:
        add_decision_tokens(row, rollouts.tokenizer, code_text, config.prompt.code_prefix)
        add_anchor_tokens(row, rollouts.tokenizer, config.prompt)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "audit.jsonl", audit)
    summary = {**_summary(records, train), "tools": tools, "rollout": stats.to_dict() if stats.trajectories else None}
    write_json(out / "summary.json", summary)
    return summary


def _summary(records: Sequence[dict[str, Any]], train: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def rate(rows, key):
        return sum(bool(r[key]) for r in rows) / len(rows) if rows else None

    return {
        "n_rollouts": len(records),
        "n_train": len(train),
        "rollout_accuracy": rate(records, "correct"),
        "rollout_code_rate": rate(records, "used_code"),
        "train_accuracy": rate(train, "correct"),
        "train_code_rate": rate(train, "used_code"),
        "train_c1_share": sum(r["c"] for r in train) / len(train) if train else None,
        "generated_tokens": sum(int(r["n_generated_tokens"]) for r in records),
        "tokens_from": tokens_from_counts(records),
    }


def tokens_from_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many records hold the model's own tokens (model, server) and how many re-tokenized text (local)."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[str(r.get("tokens_from", "unrecorded"))] += 1
    return dict(sorted(counts.items()))


__all__ = [
    "EStepConfig",
    "add_anchor_tokens",
    "add_decision_tokens",
    "advantages",
    "code_prior",
    "cut_point",
    "decision_of",
    "mid_requests",
    "q_values",
    "record_key",
    "reference_strategy",
    "run_estep",
    "subsample",
    "tokens_from_counts",
]
