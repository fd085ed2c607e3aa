"""Who runs the rollouts: one engine in this process, or a fleet of engines on Ray.

Every stage that generates trajectories (the E-step, the RL baselines' collection, dev and test
evaluation) hands its requests to a *rollouts* object with two members, `tokenizer` and
`run(requests, config, *, on_record, prompt_config, progress, stats)`. The stage keeps its own resumable
JSONL (on_record appends each record the moment it arrives) and its own math; this module decides
where trajectories are generated:

- `LocalEngines` (`fleet.workers=1`, no Ray address): one `Engine` in this process, as before Ray
  existed here. Ray need not be installed.
- `Fleet` (`fleet.workers=N` or `fleet.address=...`): N Ray actors, each owning one `Engine` (an
  in-process HF or vLLM model, or an OpenAI-compatible server it starts from `fleet.server`) and a
  sandbox pool on its own node, placed by a placement group of {CPU, GPU} bundles.

An `Engine` serves one policy at a time. Each request batch names the policy it wants, so an engine
that is handed a new checkpoint (the next EM iteration) reloads its model or restarts its server
first, and an actor that Ray restarted after a crash loads the right checkpoint by itself. Before
each M-step the training loop has every engine `release` its model or server, so the M-step gets
the accelerators; the next iteration's first shard loads the new policy.

Work is split into shards by the identity of the question (all samples of a question stay together,
so a server's prefix cache serves them). A shard's composition depends only on the request list and
`shard_size`, never on the number of workers, and each shard is one engine run: with a fixed seed
per request, one worker and two workers produce the same records under greedy decoding. Workers
stream records back as trajectories finish (no shared filesystem is needed across machines); the
driver appends each to the stage's file. When a worker dies, the shard's unfinished requests go back
to the queue for the next free worker, and a probe call (retried by Ray until the actor is back)
returns the worker to the pool once Ray has restarted it (`max_restarts`), or drops it when Ray gives
up. A record that arrives twice is kept once. Scheduling is Ray's: actors, a placement group, and `ray.wait` over the
workers' streaming generators.

Deliberately simplified: one engine per actor; a shard is not split further while it runs (the
slowest shard bounds the tail of a stage); a node that never comes back leaves its actor waiting for
resources (the placement group's own behaviour).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from autocode4math.prompts import PromptConfig
from autocode4math.rollout.engine import RolloutConfig, RolloutRequest

RecordSink = Callable[[dict[str, Any]], None]


class FleetError(RuntimeError):
    """The fleet cannot run: Ray missing, too few resources, or every worker lost."""


@dataclass
class FleetConfig:
    """Where the rollout engines run and how many there are."""

    workers: int = 1
    """Rollout engines. 1 (and no `address`) runs in this process without Ray; more start Ray actors."""
    address: str = ""
    """Ray cluster to join: "auto" for the one `ray start` set up, "ray://host:10001", or "" to start a local one."""
    gpus_per_worker: int = -1
    """GPUs per engine (2+ for tensor-parallel engines); -1: 1 when the cluster has GPUs, else 0 (CPU workers)."""
    cpus_per_worker: int = 0
    """CPUs reserved per engine, also its torch threads and sandbox workers; 0: the cluster's CPUs / workers."""
    shard_size: int = 256
    """Requests per shard (one engine run each). Smaller shards balance better and lose less to a dead worker."""
    max_restarts: int = 3
    """How often Ray restarts a dead worker before its shards go to the others only."""
    server: str = ""
    """Command template of an OpenAI-compatible server each engine starts for its policy, with {model}, {port}
    and optionally {gpus}, e.g. "vllm serve {model} --port {port} --tensor-parallel-size {gpus}" (backend openai)."""
    server_timeout_s: float = 900.0
    """How long an engine waits for its server to answer /v1/models after (re)starting it."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker < -1:
            raise ValueError(f"gpus_per_worker must be >= 0 (or -1: automatic), got {self.gpus_per_worker}")
        if self.cpus_per_worker < 0 or self.shard_size < 1 or self.max_restarts < 0:
            raise ValueError("cpus_per_worker and max_restarts must be >= 0, shard_size >= 1")
        if self.server_timeout_s <= 0:
            raise ValueError(f"server_timeout_s must be > 0, got {self.server_timeout_s}")
        if self.server:
            from autocode4math.rollout.server import check_template

            check_template(self.server)

    @property
    def distributed(self) -> bool:
        """Whether the engines run as Ray actors."""
        return self.workers > 1 or bool(self.address)


@dataclass
class EngineSpec:
    """What every engine builds: the backend and its options, the server template, threads and sandbox size."""

    backend: str = "hf"
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `rollout.make_backend` (e.g. batch_size for hf)."""
    server: str = ""
    server_timeout_s: float = 900.0
    gpus: int = 0
    threads: int = 0
    """torch threads of the engine's process (0: leave as is)."""
    sandbox_workers: int = 0
    """Sandbox pool threads unless the sandbox config sets them (0: one per CPU)."""
    sandbox: Any = None
    """A `sandbox.SandboxConfig` (None: defaults): a local pool on the engine's node, or a sandbox server by URL."""


class Engine:
    """One rollout engine serving one policy at a time, with its own sandbox pool: what a worker owns."""

    def __init__(self, spec: EngineSpec) -> None:
        from autocode4math.sandbox import SandboxConfig, open_sandbox

        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.policy: str | None = None
        self.backend: Any = None
        self.server: Any = None
        sandbox = spec.sandbox or SandboxConfig()
        self.pool = open_sandbox(dataclasses.replace(sandbox, workers=sandbox.workers or spec.sandbox_workers))

    def pid(self) -> int:
        return os.getpid()

    def serve(self, policy: str) -> None:
        """Serve `policy`: load its weights, or restart the server on it; nothing when it is served already."""
        if policy == self.policy:
            return
        self.release()
        from autocode4math.rollout import make_backend

        if self.spec.server:
            from autocode4math.rollout.server import ManagedServer

            spec = self.spec
            self.server = ManagedServer(spec.server, policy, gpus=spec.gpus, timeout_s=spec.server_timeout_s)
            from autocode4math.rollout import ServerConfig

            configured = self.spec.options.get("server") or ServerConfig()
            server = dataclasses.replace(configured, base_url=self.server.base_url)
            self.backend = make_backend("openai", policy, **{**self.spec.options, "server": server})
        else:
            self.backend = make_backend(self.spec.backend, policy, **self.spec.options)
        self.policy = policy

    def run(
        self,
        policy: str,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        prompt_config: PromptConfig | None,
        on_record: RecordSink,
        progress: bool,
        stats: Any = None,
    ) -> None:
        self.serve(policy)
        self._generate(requests, config, prompt_config, on_record, progress, stats)

    def stream(
        self, policy: str, requests: Sequence[RolloutRequest], config: RolloutConfig, prompt_config: PromptConfig | None
    ) -> Iterator[dict[str, Any]]:
        """Yield records as trajectories finish (what a Ray streaming generator reads).

        The policy is served from the calling thread (a worker's main thread: a server started here
        gets its parent-death signal tied to the worker, not to a short-lived thread); the engine then
        runs in a thread that hands records over through a queue.
        """
        self.serve(policy)
        items: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                self._generate(requests, config, prompt_config, lambda r: items.put(("record", r)), False)
                items.put(("done", None))
            except BaseException as e:  # handed to the reader, which raises it in the caller
                items.put(("error", e))

        threading.Thread(target=work, daemon=True).start()
        while True:
            kind, item = items.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item

    def _generate(self, requests, config, prompt_config, on_record: RecordSink, progress: bool, stats=None) -> None:
        from autocode4math.rollout import run_rollouts

        run_rollouts(
            self.backend, requests, config, on_record=on_record, progress=progress, sandbox=self.pool,
            prompt_config=prompt_config, stats=stats,
        )  # fmt: skip

    def release(self) -> None:
        """Free the accelerator for the M-step: drop the model (or stop the server); the next run serves again."""
        self.backend = None
        self.policy = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        import gc

        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()

    def close(self) -> None:
        self.release()
        self.pool.close()


@dataclass
class Rollouts:
    """The rollouts of one policy: `run` generates on the engines, `tokenizer` is the policy's."""

    engines: Any
    policy: str

    @property
    def tokenizer(self) -> Any:
        return self.engines.tokenizer(self.policy)

    def run(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        *,
        on_record: RecordSink,
        prompt_config: PromptConfig | None = None,
        progress: bool = True,
        stats: Any = None,
    ) -> None:
        """Run every request to completion, calling `on_record` once per request as its trajectory finishes.

        `stats` (a `rollout.RolloutStats`) gets the engine's figures in this process; a Ray fleet leaves it as is.
        """
        if requests:
            self.engines.run(self.policy, list(requests), config, prompt_config, on_record, progress, stats=stats)


@dataclass
class LocalRollouts:
    """A ready backend run by the engine in this process (tests, scripted models, a backend built by hand)."""

    backend: Any
    sandbox: Any = None
    grader: Callable | None = None

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    def run(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        *,
        on_record: RecordSink,
        prompt_config: PromptConfig | None = None,
        progress: bool = True,
        stats: Any = None,
    ) -> None:
        from autocode4math.rollout import run_rollouts

        run_rollouts(
            self.backend, requests, config, on_record=on_record, progress=progress, sandbox=self.sandbox,
            grader=self.grader, prompt_config=prompt_config, stats=stats,
        )  # fmt: skip


def as_rollouts(model: Any, backend: str, options: dict[str, Any], sandbox: Any = None, grader: Any = None) -> Any:
    """Rollouts from what a stage was given: rollouts as they are, a Backend, or a checkpoint to load here."""
    if hasattr(model, "run") and hasattr(model, "tokenizer"):
        return model
    if hasattr(model, "generate"):
        return LocalRollouts(model, sandbox, grader)
    from autocode4math.rollout import make_backend

    return LocalRollouts(make_backend(backend, str(model), **options), sandbox, grader)


class LocalEngines:
    """One engine in this process (no Ray); started on first use, so a finished run loads nothing.

    It runs the same shards as a fleet, one after another, so one engine here and N workers produce
    the same batches (and, with per-request seeds, the same records).
    """

    def __init__(self, spec: EngineSpec, shard_size: int) -> None:
        self.spec, self.shard_size = spec, shard_size
        self.engine: Engine | None = None

    def rollouts(self, policy: str) -> Rollouts:
        return Rollouts(self, policy)

    def tokenizer(self, policy: str) -> Any:
        self.serve(policy)
        return self._engine().backend.tokenizer

    def serve(self, policy: str) -> None:
        """Load `policy` now (a run would load it on arrival)."""
        self._engine().serve(policy)

    def run(self, policy, requests, config, prompt_config, on_record, progress, stats=None) -> None:
        from autocode4math.rollout.progress import fleet_progress

        engine = self._engine()
        with fleet_progress(len(requests), 1, enabled=progress) as advance:

            def keep(record: dict[str, Any]) -> None:
                on_record(record)
                advance(record)

            for shard in shards(requests, self.shard_size):
                engine.run(policy, shard, config, prompt_config, keep, False, stats)

    def release(self) -> None:
        """Free the accelerator (before an M-step); the next run loads its policy again."""
        if self.engine is not None:
            self.engine.release()

    def _engine(self) -> Engine:
        if self.engine is None:
            self.engine = Engine(self.spec)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> LocalEngines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def question_of(request: RolloutRequest) -> str:
    """The identity a request is sharded by: its question (benchmark/id), shared by all its samples and modes."""
    bench, _, qid, _ = request.key()
    return f"{bench}/{qid}"


def shards(requests: Sequence[RolloutRequest], shard_size: int) -> list[list[RolloutRequest]]:
    """Group whole questions into shards of about `shard_size` requests, in an order hashed from their ids.

    The split depends only on the requests and `shard_size` (not on the number of workers), so every
    engine run sees the same batches however many workers share them. Hashed order spreads hard and
    easy questions (sources sorted by difficulty) over the shards; inside a shard, requests keep
    their order in `requests`.
    """
    by_question: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        by_question.setdefault(question_of(r), []).append(i)
    order = sorted(by_question, key=lambda q: (zlib.crc32(q.encode()), q))
    out: list[list[int]] = [[]]
    for q in order:
        if out[-1] and len(out[-1]) + len(by_question[q]) > shard_size:
            out.append([])
        out[-1] += by_question[q]
    return [[requests[i] for i in sorted(s)] for s in out if s]


PLACE_TIMEOUT_S = 120.0
"""How long the fleet waits for the cluster to place all its workers before it says what is missing."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FleetError("more than one rollout worker needs Ray: pip install 'autocode4math[fleet]'") from None
    return ray


def _record_key(record: dict[str, Any]) -> tuple[str, str, str, int]:
    return (str(record["benchmark"]), record["mode"], str(record["id"]), int(record["sample"]))


class Fleet:
    """Rollout engines as Ray actors, one per worker, each in its own {CPU, GPU} bundle of a placement group.

    Started on first use. If Ray is already initialised in this process the fleet joins that session
    and leaves it running on close; otherwise it connects to `address` (or starts a local cluster)
    and shuts Ray down on close.
    """

    def __init__(self, config: FleetConfig, spec: EngineSpec) -> None:
        self.config, self.spec = config, spec
        self.workers: list[Any] = []
        self.deaths: list[int] = []
        self.lost: set[int] = set()
        """Workers Ray gave up on (restarts used up, or their engine cannot start)."""
        self._group: Any = None
        self._own_ray = False
        self._tokenizers: dict[str, Any] = {}

    def rollouts(self, policy: str) -> Rollouts:
        return Rollouts(self, policy)

    def tokenizer(self, policy: str) -> Any:
        if policy not in self._tokenizers:
            from transformers import AutoTokenizer

            server = self.spec.options.get("server")
            self._tokenizers[policy] = AutoTokenizer.from_pretrained((server.tokenizer if server else "") or policy)
        return self._tokenizers[policy]

    def _alive(self) -> list[Any]:
        return [w for i, w in enumerate(self._start()) if i not in self.lost]

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests and operators)."""
        return _ray().get([w.pid.remote() for w in self._alive()])

    def serve(self, policy: str) -> None:
        """Have every worker load `policy` now (shards would also load it on arrival)."""
        _ray().get([w.serve.remote(policy) for w in self._alive()])

    def release(self) -> None:
        """Free every worker's accelerator (before an M-step that needs the GPUs); the next run loads again."""
        if self.workers:
            _ray().get([w.release.remote() for w in self._alive()])

    def run(
        self,
        policy: str,
        requests: list[RolloutRequest],
        config: RolloutConfig,
        prompt_config: PromptConfig | None,
        on_record: RecordSink,
        progress: bool,
        stats: Any = None,
    ) -> None:
        """Shard the requests, keep every worker busy with one shard, and pass each record on as it arrives.

        `stats` is left as is: the engines' occupancy is not gathered from the Ray workers.
        """
        from autocode4math.rollout.progress import fleet_progress

        ray = _ray()
        workers = self._start()
        todo = deque(shards(requests, self.config.shard_size))
        seen: set[tuple] = set()
        idle = [w for w in range(len(workers)) if w not in self.lost]
        running: dict[Any, tuple[int, list[RolloutRequest] | None]] = {}  # a shard's stream, or None: a probe
        why = ""
        with fleet_progress(len(requests), len(idle), enabled=progress) as advance:
            while todo or running:
                while todo and idle:
                    w, shard = idle.pop(0), todo.popleft()
                    call = workers[w].stream.options(num_returns="streaming")
                    running[call.remote(policy, shard, config, prompt_config)] = (w, shard)
                if not running:
                    raise FleetError(f"every rollout worker died ({why}); {len(seen)} records kept: rerun to resume")
                (ref,), _ = ray.wait(list(running), num_returns=1)
                w, shard = running[ref]
                if shard is None:  # a dead worker's probe answered: Ray restarted it, or gave it up
                    del running[ref]
                    try:
                        ray.get(ref)
                        idle.append(w)
                    except ray.exceptions.RayActorError as e:
                        self.lost.add(w)
                        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    continue
                try:
                    record = ray.get(next(ref))
                except StopIteration:
                    del running[ref]
                    idle.append(w)
                    continue
                except ray.exceptions.RayActorError:
                    del running[ref]
                    self.deaths[w] += 1
                    running[workers[w].pid.options(max_task_retries=-1).remote()] = (w, None)
                    left = [r for r in shard if r.key() not in seen]
                    if left:
                        todo.appendleft(left)
                    continue
                key = _record_key(record)
                if key not in seen:
                    seen.add(key)
                    on_record(record)
                    advance(record)

    def _start(self) -> list[Any]:
        if self.workers:
            return self.workers
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.config.address or None, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {self.config.address!r}" if self.config.address else "a local Ray cluster"
                raise FleetError(f"cannot start or join {where}: {e} (a cluster: `ray start --head`)") from None
            self._own_ray = True
        gpus, cpus = self._shape(ray.cluster_resources())
        self._group = self._place(ray, {"CPU": cpus, **({"GPU": gpus} if gpus else {})})
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options = dict(self.spec.options)
        if self.spec.backend == "vllm" and gpus > 1:
            options["tensor_parallel_size"] = gpus
        spec = dataclasses.replace(self.spec, options=options, gpus=gpus, threads=cpus, sandbox_workers=cpus)
        actor = ray.remote(Engine)
        for i in range(self.config.workers):
            place = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=i)
            self.workers.append(
                actor.options(
                    num_cpus=cpus, num_gpus=gpus, max_restarts=self.config.max_restarts, max_task_retries=0,
                    scheduling_strategy=place,
                ).remote(spec)
            )  # fmt: skip
        self.deaths = [0] * len(self.workers)
        return self.workers

    def _shape(self, resources: dict[str, float]) -> tuple[int, int]:
        """(GPUs, CPUs) per worker: the configured ones, or the cluster's shared out evenly."""
        gpus = self.config.gpus_per_worker
        if gpus < 0:
            gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        cpus = self.config.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // self.config.workers)
        return gpus, cpus

    def _place(self, ray: Any, bundle: dict[str, float]) -> Any:
        from ray.util.placement_group import placement_group, remove_placement_group

        group = placement_group([dict(bundle) for _ in range(self.config.workers)], strategy="PACK")
        ready, _ = ray.wait([group.ready()], timeout=PLACE_TIMEOUT_S)
        if not ready:
            remove_placement_group(group)
            raise FleetError(
                f"the Ray cluster cannot place {self.config.workers} workers of {bundle} within "
                f"{PLACE_TIMEOUT_S:.0f} s (it has {ray.cluster_resources()}); "
                "lower --workers or set fleet.cpus_per_worker / fleet.gpus_per_worker"
            )
        return group

    def close(self) -> None:
        """Stop every engine (servers included), release the placement group, and Ray if the fleet started it."""
        if not self.workers:
            return
        ray = _ray()
        from ray.util.placement_group import remove_placement_group

        closing = [w.close.remote() for w in self.workers]
        ray.wait(closing, num_returns=len(closing), timeout=60)
        for w in self.workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(self._group)
        self.workers, self._group = [], None
        if self._own_ray:
            ray.shutdown()
            self._own_ray = False

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_engines(
    config: FleetConfig, backend: str, options: dict[str, Any], sandbox: Any = None
) -> LocalEngines | Fleet:
    """The engines a stage's rollouts run on: a Ray fleet when `config` asks for one, else this process.

    `sandbox` is the `SandboxConfig` every engine opens its sandbox with (`sandbox.open_sandbox`).
    """
    spec = EngineSpec(backend, dict(options), config.server, config.server_timeout_s, sandbox=sandbox)
    if config.server and backend != "openai":
        raise FleetError(f"fleet.server starts an OpenAI-compatible server: use it with backend openai, not {backend}")
    return Fleet(config, spec) if config.distributed else LocalEngines(spec, config.shard_size)
