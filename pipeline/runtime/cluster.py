"""Ray orchestration: the actors of the pipeline and the handles the training loop drives.

Contract:
- `Cluster(cfg)` starts a local Ray instance (the embedded default) or joins `cluster.address`, checks that the
  run's resources exist (a clear error otherwise), and on exit stops every actor and process it started.
- `EngineActor` owns one inference server process (SGLang or the local engine), launched on the actor's node.
- `TrainerActor` is one trainer rank: process group, backend (fsdp | megatron), `TrainWorker`, and, on
  weight-sync source ranks, a `WeightSyncSender`.
- `RolloutActor` runs the asyncio `RolloutManager`, streaming groups to the driver's buffer over ZMQ.
- Start-up overlaps what takes seconds: the rollout actor loads the tokenizer and the prompts (`start_rollout`)
  while the engines start and the trainer ranks load the model (`launch`; engines first when colocated, since an
  engine on a GPU sizes its memory pool from what is free). `launch_rollout` then hands it the engines and starts it.
- On 2-core machines every actor asks for 0 CPUs (Ray hangs on fractional budgets there); threads are set per
  process from config instead.
- Placement: `placement_specs(cfg)` gives the bundles of two placement groups, created (and awaited, with
  cluster.placement_timeout_s and an error naming what was asked and what the cluster has) before any actor:
  "trainer", one bundle per rank ({GPU: trainer.gpus_per_rank}, strategy cluster.placement_strategy), and
  "engines", one bundle per engine ({GPU: engine.gpus_per_engine}: an engine's tp GPUs on one node; PACK).
  Colocated (weight_sync.mode = colocated) there is no engine group: engine i shares trainer bundle i, which
  then holds both GPU shares (e.g. 0.5 + 0.5 of one GPU). Every bundle also holds a token CPU share (Ray refuses
  all-zero bundles). Trainer rank i and engine i run in bundle i; the groups are removed at shutdown.
- Colocated engines of tp = k > 1 GPUs (`layout(cfg).engine_span` = k): every trainer bundle is one whole GPU; engine
  j serves on the GPUs of ranks j*k .. j*k+k-1. A Ray actor sees at most its own bundle's GPU, so (as slime does
  for its colocated SGLang engines) a probe task in each bundle reads the GPU id Ray gave it and its node
  (`probe_bundles`); `engine_devices` checks that each engine's k ranks share a node (a clear error otherwise) and
  gives its CUDA_VISIBLE_DEVICES. The engine actor asks for no GPU, runs in its first rank's bundle (that node)
  and launches the server with those devices; its memory is released while the trainer trains
  (weight_sync.release_memory), and the weights arrive through the node's weight_sync.disk_dir.
- Addresses across nodes: a listening host of 0.0.0.0 (engine.host, cluster.bind_host, weight_sync.master_address)
  means "every interface, advertised as the IP of the node it runs on": an engine's URL carries its node's IP, the
  trainer ranks meet at rank 0's node, the sync group at the source rank's node. The rollout actor runs on the
  driver's node, so the buffer's ZMQ socket is reached there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from pipeline.config import Config, ConfigError, engine_api_key, layout
from pipeline.runtime import wiring
from pipeline.runtime.signals import StartupInterrupted

log = logging.getLogger("dapo")

ANY_HOST = ("0.0.0.0", "")
"""Listening hosts that mean every interface: others reach such a socket at its node's IP."""


def advertised(host: str, node_ip: str) -> str:
    """The address other nodes dial for a socket that listens on `host` on the node `node_ip`."""
    return node_ip if host in ANY_HOST else host


# ----------------------------------------------------------------------------------------------- actors
_CTOR_FAILURE = """Actor constructors that can fail on the run's input (trainer ranks, rollout) catch the error and
raise it from their first method call instead: an exception in a constructor makes Ray print a ~20-line "Exception
raised in creation task" traceback from the worker besides the driver's one-line report; a method's does not."""


@ray.remote(num_cpus=0, max_concurrency=2)  # stop() runs while start() waits for a server (shutdown in start-up)
class EngineActor:
    def __init__(self, cfg: Config, index: int, log_dir: str, devices: str = ""):
        self.cfg, self.index, self.log_dir, self.devices = cfg, index, log_dir, devices
        self.proc = None

    def launch_env(self) -> dict[str, str]:
        """What the server's environment sets beyond this actor's: CUDA_VISIBLE_DEVICES of a multi-GPU colocated
        engine (its trainer ranks' GPUs), else nothing."""
        return wiring.engine_env({}, self.devices)

    def start(self, model_dir: str) -> str:
        from pipeline.runtime.weight_sync.colocated import engine_args

        e = self.cfg.engine
        port = e.base_port + self.index if e.base_port else wiring.free_port(e.host)
        log_path = os.path.join(self.log_dir, f"engine{self.index}.log")
        self.proc = wiring.launch_engine(e, model_dir, port, log_path, engine_args(self.cfg), devices=self.devices)
        if e.host not in ANY_HOST:
            return self.proc.url
        return f"http://{advertised(e.host, ray.util.get_node_ip_address())}:{port}"  # proc.url is the loopback

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def health(self, timeout_s: float) -> str:
        """ok | dead | hung (see EngineProcess.health); probed on the loopback of the engine's own node."""
        return self.proc.health(timeout_s) if self.proc is not None else "dead"

    def restart(self, model_dir: str) -> str:
        """A fresh server (new port) from the initial weights; the caller sends it the current ones."""
        self.stop()
        return self.start(model_dir)

    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        else:  # a server still starting: its handle comes only once healthy, so find it as our child
            _kill_starting_servers()


@ray.remote(num_cpus=0)
class TrainerActor:
    def __init__(self, cfg: Config, rank: int, world_size: int, master_addr: str, master_port: int):
        self.sender, self.model_dir, self.failed = None, "", None
        try:
            self._build(cfg, rank, world_size, master_addr, master_port)
        except Exception as e:  # raised by setup(): see _CTOR_FAILURE
            self.failed = e

    def _build(self, cfg: Config, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        import torch

        torch.set_num_threads(cfg.trainer.threads)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank))
        os.environ.update(WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        if world_size > 1 or cfg.trainer.backend == "megatron":
            import torch.distributed as dist

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(
                backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size
            )
        from pipeline.flow.trainer import TrainWorker

        self.cfg = cfg
        self.worker = TrainWorker(cfg, wiring.build_backend(cfg, rank, world_size))

    def setup(self, model_dir: str) -> None:
        if self.failed is not None:
            raise self.failed
        self.worker.backend.setup(model_dir)
        self.model_dir = model_dir  # its config files go with a staged checkpoint (colocated_transport=disk)

    def train_step(self, minibatches: list) -> dict[str, float]:
        return self.worker.train_step(minibatches)

    def train_minibatch(self, mbs: list) -> dict[str, float]:
        return self.worker.train_minibatch(mbs)

    def is_sync_source(self) -> bool:
        return self.worker.backend.is_sync_source

    def pp_stage(self) -> int:
        return getattr(self.worker.backend, "pp_rank", 0)

    def connect_weight_sync(self, urls: list[str], engine_tp: list[int], engine_nodes: list[str] | None = None) -> None:
        """Join the engines' sync group as this stage's source; engine_nodes (Ray node ids, one per URL) let a disk
        transport check that every engine can read what it stages."""
        if not self.worker.backend.is_sync_source:
            return
        from pipeline.runtime.weight_sync import WeightSyncSender

        if self.sender is not None:
            self.sender.close()
        ws = self.cfg.weight_sync
        ws = dataclasses.replace(ws, master_address=advertised(ws.master_address, ray.util.get_node_ip_address()))
        self.sender = WeightSyncSender(
            urls, ws, api_key=engine_api_key(self.cfg), engine_tp=engine_tp, stage=self.pp_stage(),
            model_dir=self.model_dir, admin_api_key=self.cfg.engine.admin_api_key,
        )  # fmt: skip
        if self.sender.transport == "disk" and engine_nodes:
            from pipeline.runtime.weight_sync.disk import check_engines_see

            here = ray.get_runtime_context().get_node_id()
            check_engines_see(ws.disk_dir, here, dict(zip(urls, engine_nodes, strict=True)))
        self.sender.connect()

    def reconnect_weight_sync(self, urls: list[str], engine_tp: list[int]) -> None:
        """Rebuild the sync group after an engine restart (a process group's membership is fixed)."""
        if self.sender is not None:
            self.sender.reconnect(urls, engine_tp)

    def sync_weights(self, version: int, pause: bool = True) -> dict[str, float]:
        """Every rank of a stage calls this together (the HF tensors are gathered across TP); the stage's source
        sends them. With several stages the driver pauses once, syncs stage by stage, then resumes."""
        tensors = self.worker.backend.named_hf_weights()
        if self.sender is None:
            for _ in tensors:
                pass
            return {}
        stats = self.sender.sync(tensors, version, pause=pause)
        return {"time/weight_sync(s)": stats.seconds, "perf/weight_sync_gbps": stats.gbps}

    def pause_engines(self) -> None:
        if self.sender is not None:
            self.sender.pause()

    def resume_engines(self, version: int) -> None:
        if self.sender is not None:
            self.sender.resume(version)

    def release_engine_memory(self) -> None:
        """weight_sync.release_memory: the engines pause and give back that memory while the trainer trains."""
        if self.sender is not None:
            self.sender.release_memory(self.cfg.weight_sync.release_memory)

    def resume_engine_memory(self) -> None:
        if self.sender is not None:
            self.sender.resume_memory(self.cfg.weight_sync.release_memory)

    def save(self, path: str) -> None:
        self.worker.backend.save(path)

    def load(self, path: str) -> None:
        self.worker.backend.load(path)

    def write_hf_shards(self, out_dir: str) -> dict[str, str]:  # hook: pipeline/runtime/hf_export.py (issue 18)
        from pipeline.runtime.hf_export import export_dtype, write_backend_shards

        return write_backend_shards(self.worker.backend, self.model_dir, out_dir, export_dtype(self.cfg))

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


@ray.remote(num_cpus=0)
class RolloutActor:
    def __init__(self, cfg: Config, urls: list[str], model_dir: str, push_address: str):
        self.manager: Any = None
        self.task: asyncio.Task | None = None
        self.failed: Exception | None = None
        try:
            self._build(cfg, urls, model_dir, push_address)
        except Exception as e:  # raised by ready(): see _CTOR_FAILURE
            self.failed = e

    def _build(self, cfg: Config, urls: list[str], model_dir: str, push_address: str) -> None:
        import torch

        from pipeline.flow.data import load_prompts
        from pipeline.flow.rewards import RewardRunner
        from pipeline.flow.rollout import RolloutManager
        from pipeline.tokenizer import load_tokenizer

        torch.set_num_threads(1)
        tokenizer = load_tokenizer(cfg.model.tokenizer if not cfg.model.path else cfg.model.path, model_dir)
        prompts = load_prompts(cfg.data, tokenizer, seed=cfg.trainer.seed)
        e = cfg.engine
        client = wiring.engine_client(
            urls, api_key=engine_api_key(cfg), timeout_s=e.request_timeout_s, max_retries=e.max_retries,
            admin_api_key=e.admin_api_key,
        )  # fmt: skip
        a = cfg.algorithm
        rewards = RewardRunner(a.reward_fn, a.reward_timeout_s, a.reward_workers)
        self.manager = RolloutManager(cfg, client, tokenizer, prompts, push_address, rewards)

    async def ready(self) -> None:
        """Raises what the constructor raised (a bad data file, a tokenizer that does not load)."""
        if self.failed is not None:
            raise self.failed

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.manager.run())

    async def error(self) -> str:
        """The manager's crash, if it crashed (it must not; the driver checks), or why the reward function's
        failures must stop the run (pipeline/flow/rewards.py `RewardRunner.fatal`)."""
        if self.task is not None and self.task.done() and not self.task.cancelled() and self.task.exception():
            return repr(self.task.exception())
        refused = getattr(self.manager, "fatal", None)  # an engine's 4xx: a request error, fatal to the run
        if refused is not None and (why := refused()):
            return why
        fatal = getattr(self.manager.rewards, "fatal", None)
        return fatal() if fatal is not None else ""

    async def set_version(self, version: int) -> None:
        self.manager.set_version(version)

    async def before_weight_update(self) -> None:
        await self.manager.before_weight_update()

    async def after_weight_update(self, version: int) -> None:
        await self.manager.after_weight_update(version)

    async def drop_engines(self, urls: list[str]) -> None:
        """Route away from dead or hung engines (their requests fail and are re-queued)."""
        for url in urls:
            self.manager.client.mark_dead(url)

    async def add_engines(self, urls: list[str]) -> None:
        """Engines join the rotation: the first ones at launch (`Cluster.launch_rollout`), restarted ones once they
        hold the current weights."""
        for url in urls:
            self.manager.client.add_url(url)

    async def stats(self) -> dict[str, Any]:
        return self.manager.stats()

    async def progress(self) -> dict[str, Any]:
        return self.manager.progress()

    async def state_dict(self) -> dict[str, Any]:
        return self.manager.state_dict()

    async def load_state_dict(self, state: dict[str, Any]) -> None:
        self.manager.load_state_dict(state)

    async def stop(self) -> None:
        if self.manager is None:  # its constructor failed
            return
        await self.manager.stop()
        if self.task is not None:
            self.task.cancel()


# ----------------------------------------------------------------------------------------------- cluster
BUNDLE_CPU = 0.01
"""The token CPU share in every bundle (actors ask for 0 CPUs; see the module docstring)."""


def placement_specs(cfg: Config) -> dict[str, tuple[list[dict[str, float]], str]]:
    """{"trainer": (bundles, strategy), "engines": (bundles, strategy)}; no engine group for external engines."""
    t, e = cfg.trainer, cfg.engine

    def bundle(gpus: float) -> dict[str, float]:
        return {"CPU": BUNDLE_CPU, **({"GPU": float(gpus)} if gpus else {})}

    engines = 0 if e.backend == "external" else e.num_engines
    lay = layout(cfg)
    if lay.colocated and lay.engine_span > 1:
        # a whole GPU per rank: the rank's share and the multi-GPU engine that serves on it (see engine_devices)
        return {"trainer": ([bundle(1.0) for _ in range(t.world_size)], cfg.cluster.placement_strategy)}
    if lay.colocated:
        shares = [t.gpus_per_rank + (e.gpus_per_engine if i < engines else 0) for i in range(t.world_size)]
        return {"trainer": ([bundle(g) for g in shares], cfg.cluster.placement_strategy)}
    specs = {"trainer": ([bundle(t.gpus_per_rank) for _ in range(t.world_size)], cfg.cluster.placement_strategy)}
    if engines:
        specs["engines"] = ([bundle(e.gpus_per_engine) for _ in range(engines)], "PACK")
    return specs


PROBE_GPU = 0.01
"""The GPU share the bundle probe asks for (any share makes Ray name the bundle's GPU; gone when it returns)."""


@ray.remote(num_cpus=0, num_gpus=PROBE_GPU)
def _bundle_gpu() -> tuple[str, list[str]]:
    """(Ray node id, the GPU ids Ray assigned) of the bundle this task runs in."""
    return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]


def probe_bundles(pg: Any, count: int) -> list[tuple[str, list[str]]]:
    """Node and GPU ids of bundles 0..count-1 of `pg` (before any actor holds them)."""
    return ray.get([
        _bundle_gpu.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
        ).remote()
        for i in range(count)
    ])  # fmt: skip


def engine_devices(bundles: list[tuple[str, list[str]]], span: int, num_engines: int) -> list[tuple[str, str]]:
    """(node id, CUDA_VISIBLE_DEVICES) of each colocated engine of `span` GPUs: engine j serves on the GPUs of
    trainer ranks j*span .. j*span+span-1, which must be on one node (an engine's tensor parallelism is local)."""
    out = []
    for j in range(num_engines):
        ranks = range(j * span, (j + 1) * span)
        nodes = {bundles[r][0] for r in ranks}
        if len(nodes) > 1:
            where = ", ".join(f"rank {r} on node {bundles[r][0][:12]}" for r in ranks)
            raise ConfigError(
                f"cluster.placement_strategy: colocated engine {j} (engine.tp = {span}) spans trainer ranks "
                f"{ranks.start}..{ranks.stop - 1}, which Ray placed on different nodes ({where}); use "
                "STRICT_PACK (one node) or set cluster.gpus_per_node so that engine.tp divides it and whole nodes fill"
            )
        gpus = [g for r in ranks for g in bundles[r][1]]
        if len(gpus) != span or len(set(gpus)) != span:
            raise ConfigError(
                f"engine.tp: colocated engine {j} needs {span} distinct GPUs from trainer ranks "
                f"{ranks.start}..{ranks.stop - 1}; Ray gave them {gpus}"
            )
        out.append((nodes.pop(), ",".join(gpus)))
    return out


class Cluster:
    """Ray connection plus every actor the run started (stopped on exit, in reverse order)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.actors: list[Any] = []
        self.engines: list[Any] = []
        self.urls: list[str] = []
        self.trainers: list[Any] = []
        self.rollout: Any = None
        self.restarts: list[int] = []
        self.groups: dict[str, Any] = {}
        self.engine_placement: list[tuple[str, str]] = []  # (node id, CUDA_VISIBLE_DEVICES) of multi-GPU engines
        self._started_ray = False

    def __enter__(self) -> Cluster:
        if not ray.is_initialized():
            self._init_ray()
        try:
            check_resources(self.cfg, ray.cluster_resources())
            self._reserve()
        except BaseException:
            self.shutdown()  # a failed start leaves neither groups nor a Ray instance of ours behind
            raise
        return self

    def _init_ray(self) -> None:
        """Start (or join) Ray. ray.init replaces the process's SIGTERM handler with its own (sys.exit): the run's
        (pipeline/runtime/signals.py) is put back, and a SIGTERM during ray.init stops what it had started."""
        main = threading.current_thread() is threading.main_thread()
        old = signal.getsignal(signal.SIGTERM) if main else None
        try:
            self._ray_init()
        except BaseException as e:
            _quiet(ray.shutdown)  # Ray's services started so far
            if isinstance(e, SystemExit):  # Ray's handler: a SIGTERM while Ray started
                raise StartupInterrupted(f"signal {signal.SIGTERM.value} during start-up (ray.init)") from None
            raise
        finally:
            if main and old is not None:
                signal.signal(signal.SIGTERM, old)
        self._started_ray = True

    def _ray_init(self) -> None:
        """ray.init as cluster.address says."""
        c = self.cfg.cluster
        if c.address == "local":
            # address="local": always a fresh instance of our own, never one another session left running
            # (plain ray.init() attaches to the cluster named in /tmp/ray/ray_current_cluster if it is up)
            ray.init(
                address="local",
                num_cpus=c.num_cpus or None,
                num_gpus=c.num_gpus or None,
                include_dashboard=False,
                namespace=c.namespace,
                configure_logging=False,
                log_to_driver=True,
                _node_ip_address=None if c.bind_host in ANY_HOST else c.bind_host,
            )
        else:
            ray.init(address=c.address, namespace=c.namespace, configure_logging=False)

    def _reserve(self) -> None:
        """Create the placement groups and wait until Ray has placed every bundle."""
        timeout = self.cfg.cluster.placement_timeout_s
        for name, (bundles, strategy) in placement_specs(self.cfg).items():
            if not bundles:
                continue
            pg = placement_group(bundles, strategy=strategy, name=f"{self.cfg.cluster.namespace}-{name}")
            self.groups[name] = pg
            try:
                ray.get(pg.ready(), timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                gpus = bundles[0].get("GPU", 0)
                raise ConfigError(
                    f"cluster: placement group '{name}' ({len(bundles)} bundles x {gpus:g} GPU, {strategy}) not "
                    f"satisfiable within cluster.placement_timeout_s={timeout:g}s; the cluster has "
                    f"{ray.available_resources()} available of {ray.cluster_resources()}"
                ) from None
        self._place_engines()

    def _place_engines(self) -> None:
        """Colocated engines of tp > 1: where each serves and on which GPUs (see `engine_devices`)."""
        lay, e = layout(self.cfg), self.cfg.engine
        if not (lay.colocated and lay.engine_span > 1) or e.backend == "external":
            return
        bundles = probe_bundles(self.groups["trainer"], self.cfg.trainer.world_size)
        self.engine_placement = engine_devices(bundles, lay.engine_span, e.num_engines)

    def _in_bundle(self, group: str, index: int) -> dict[str, Any]:
        if group == "engines" and layout(self.cfg).colocated:
            group = "trainer"  # engine i shares trainer rank i's bundle; of tp = k > 1, rank i*k's
            index *= layout(self.cfg).engine_span
        pg = self.groups.get(group)
        if pg is None:
            return {}
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=index
            )
        }

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        if self.rollout is not None:
            _quiet(lambda: ray.get(self.rollout.stop.remote(), timeout=30))
        for t in self.trainers:
            _quiet(lambda t=t: ray.get(t.close.remote(), timeout=30))
        for e in self.engines:
            _quiet(lambda e=e: ray.get(e.stop.remote(), timeout=60))
        for a in reversed(self.actors):
            _quiet(lambda a=a: ray.kill(a))
        self.actors.clear()
        for pg in self.groups.values():
            _quiet(lambda pg=pg: remove_placement_group(pg))
        self.groups.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _track(self, actor: Any) -> Any:
        self.actors.append(actor)
        return actor

    def launch(self, model_dir: str, log_dir: str) -> tuple[list[str], list[Any]]:
        """The engines and the trainer ranks: (engine URLs, trainer actors). Each loads a model for seconds, so the
        ranks set up while the engines start -- unless colocated, where an engine on a GPU sizes its memory pool
        from what the trainer has not taken yet: then the engines first."""
        if self.cfg.weight_sync.colocated:
            return self.launch_engines(model_dir, log_dir), self.launch_trainer(model_dir)
        starting = self._start_engines(model_dir, log_dir)
        trainers = self.launch_trainer(model_dir)
        return self._engines_up(starting), trainers

    def launch_engines(self, model_dir: str, log_dir: str) -> list[str]:
        return self._engines_up(self._start_engines(model_dir, log_dir))

    def _start_engines(self, model_dir: str, log_dir: str) -> list[Any]:
        """Start every engine; returns the refs of their URLs (none for external engines)."""
        e = self.cfg.engine
        if e.backend == "external":
            return []
        self.engines = self.create_engines(log_dir)
        return [a.start.remote(model_dir) for a in self.engines]

    def create_engines(self, log_dir: str) -> list[Any]:
        """The engine actors, placed (not started). A multi-GPU colocated engine asks Ray for no GPU: its GPUs
        are its trainer ranks' (self.engine_placement), handed to the server as CUDA_VISIBLE_DEVICES."""
        e = self.cfg.engine
        devices = [d for _, d in self.engine_placement] or [""] * e.num_engines
        opts = {"num_gpus": e.gpus_per_engine} if e.gpus_per_engine and not self.engine_placement else {}
        return [
            self._track(
                EngineActor.options(**opts, **self._in_bundle("engines", i)).remote(self.cfg, i, log_dir, devices[i])
            )
            for i in range(e.num_engines)
        ]

    def _engines_up(self, starting: list[Any]) -> list[str]:
        if self.cfg.engine.backend == "external":
            self.urls = list(self.cfg.engine.urls)
            return self.urls
        self.urls = ray.get(starting)
        self.restarts = [0] * len(self.engines)
        return self.urls

    def heal_engines(self, model_dir: str) -> dict[str, str | None]:
        """Restart engines whose process died or hangs (no /health answer within engine.health_timeout_s), dropping
        one after engine.max_restarts. Returns old url -> new url (None: dropped). The caller rebuilds the
        weight-sync group and sends the current weights."""
        replaced: dict[str, str | None] = {}
        timeout = self.cfg.engine.health_timeout_s
        states = ray.get([a.health.remote(timeout) for a in self.engines]) if self.engines else []
        for i, state in enumerate(states):
            if state == "ok" or self.urls[i] is None:
                continue
            old, what = self.urls[i], "died" if state == "dead" else f"hung (no /health answer within {timeout:g}s)"
            if self.restarts[i] >= self.cfg.engine.max_restarts:
                log.error("engine %s %s after %d restarts: dropped", old, what, self.restarts[i])
                ray.get(self.engines[i].stop.remote())
                self.urls[i] = None
                replaced[old] = None
                continue
            self.restarts[i] += 1
            self.urls[i] = ray.get(self.engines[i].restart.remote(model_dir))
            log.warning("engine %s %s: restarted as %s (restart %d)", old, what, self.urls[i], self.restarts[i])
            replaced[old] = self.urls[i]
        return replaced

    def engine_nodes(self) -> list[str]:
        """The Ray node id of every engine we launched (empty for external engines)."""
        return ray.get([a.node_id.remote() for a in self.engines])

    @property
    def live_urls(self) -> list[str]:
        return [u for u in self.urls if u]

    def engine_versions(self) -> list[str]:
        """The weight version each live engine reports (GET /weight_version)."""

        urls = self.live_urls
        client = wiring.engine_client(urls, api_key=engine_api_key(self.cfg))
        try:
            return [client.run_sync(client.get_weight_version(u), timeout=30) for u in urls]
        finally:
            client.close_sync()

    def rendezvous(self) -> tuple[str, int]:
        """(address, port) where the trainer ranks form their process group: rank 0's node when it listens on every
        interface (cluster.bind_host=0.0.0.0, for ranks on several nodes), else cluster.bind_host on this node."""
        host = self.cfg.cluster.bind_host
        if host not in ANY_HOST:
            return host, wiring.free_port(host)
        return ray.get(_free_endpoint.options(**self._in_bundle("trainer", 0)).remote())

    def launch_trainer(self, model_dir: str) -> list[Any]:
        t = self.cfg.trainer
        addr, port = self.rendezvous()
        opts = {"num_gpus": t.gpus_per_rank} if t.gpus_per_rank else {}
        self.trainers = [
            self._track(
                TrainerActor.options(**opts, **self._in_bundle("trainer", r)).remote(
                    self.cfg, r, t.world_size, addr, port
                )
            )
            for r in range(t.world_size)
        ]
        ray.get([a.setup.remote(model_dir) for a in self.trainers])
        return self.trainers

    def start_rollout(self, model_dir: str, push_address: str) -> Any:
        """Create the rollout actor, which loads the tokenizer and the prompts while engines and trainer start;
        `launch_rollout` gives it the engines, its state and the version, and starts it."""
        # On the driver's node: the buffer's socket (push_address) is bound here, possibly on the loopback.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.rollout = self._track(
            RolloutActor.options(scheduling_strategy=here).remote(self.cfg, [], model_dir, push_address)
        )
        return self.rollout

    def launch_rollout(self, state: dict | None, version: int) -> Any:
        ray.get(self.rollout.ready.remote())
        ray.get(self.rollout.add_engines.remote(self.live_urls))
        if state is not None:
            ray.get(self.rollout.load_state_dict.remote(state))
        ray.get(self.rollout.set_version.remote(version))
        ray.get(self.rollout.start.remote())
        return self.rollout


@ray.remote(num_cpus=0)
def _free_endpoint() -> tuple[str, int]:
    """This node's IP and a port free on it."""
    ip = ray.util.get_node_ip_address()
    return ip, wiring.free_port(ip)


def _kill_starting_servers() -> None:
    """SIGKILL the process group of each child of this worker that leads its own session (engines/process.py starts
    every server so); start() then sees its server gone and fails, which a shutdown ignores."""
    import psutil

    for child in psutil.Process().children():
        try:
            if os.getpgid(child.pid) == child.pid:
                os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _quiet(fn: Any) -> None:
    try:
        fn()
    except Exception as e:  # shutdown must reach every actor even when one is already gone
        log.debug("shutdown step failed: %r", e)


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Fail before starting anything when the cluster cannot hold the run."""
    t, e = cfg.trainer, cfg.engine
    gpus = sum(b.get("GPU", 0.0) for bundles, _ in placement_specs(cfg).values() for b in bundles)
    have = available.get("GPU", 0.0)
    if gpus > have and layout(cfg).engine_span > 1:
        raise ConfigError(
            f"cluster: the run needs {gpus:g} GPUs (trainer.world_size={t.world_size} whole GPUs, each shared with "
            f"an engine of engine.tp={e.tp}), the Ray cluster has {have:g}"
        )
    if gpus > have:
        raise ConfigError(
            f"cluster: the run needs {gpus:g} GPUs (trainer.world_size={t.world_size} x trainer.gpus_per_rank="
            f"{t.gpus_per_rank:g} + engine.num_engines={e.num_engines} x engine.gpus_per_engine="
            f"{e.gpus_per_engine:g}), the Ray cluster has {have:g}"
        )
