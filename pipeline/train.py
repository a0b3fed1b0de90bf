"""The training loop: the arrow diagram of DESIGN.md, one screen.

    prompts -> RolloutManager -> engines (HTTP) -> rewards -> ZMQ -> RolloutBuffer (dynamic sampling, staleness)
            -> trainer ranks (DAPO loss) -> every `weight_sync.every` steps: broadcast -> engines report v+1

Generation never waits for training: the rollout actor streams groups into the buffer while the trainer works
on the previous batch; the staleness bound (rollout.max_staleness) decides how far ahead it may run. Nor does
training wait for a whole batch: with trainer.num_minibatches > 1 each mini-batch trains as soon as its groups are
in (pipeline.config.stream_parts), while the step's later groups are still generating.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ray

from pipeline import checkpoint
from pipeline.buffer import RolloutBuffer
from pipeline.config import Config, check_local_paths, engine_api_key, releases_engine_memory, stream_parts, to_yaml
from pipeline.hf_export import hf_due, save_run_hf
from pipeline.live_eval import live_eval_or_none
from pipeline.metrics import MetricsLogger, make_sinks
from pipeline.modeling import prepare_model_dir
from pipeline.orchestrator import Cluster
from pipeline.run_security import secure_run
from pipeline.trainer import make_step_batches, merge_metrics
from pipeline.transport import GroupReceiver
from pipeline.types import Group

log = logging.getLogger("dapo")


@dataclass
class RunResult:
    run_dir: str
    steps: int
    version: int
    history: list[dict[str, float]] = field(default_factory=list)
    accounting: dict[str, float] = field(default_factory=dict)
    engine_versions: list[str] = field(default_factory=list)
    trained_prompts: list[list[str]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


def make_run_dir(cfg: Config) -> Path:
    name = cfg.logging.run_name or time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.logging.dir) / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    return path


def train(cfg: Config) -> RunResult:
    check_local_paths(cfg)  # missing files fail here, before Ray or any engine starts
    run_dir = make_run_dir(cfg)
    t, every = cfg.trainer, cfg.weight_sync.every
    stop = _StopFlag()
    buffer = RolloutBuffer(
        GroupReceiver(
            cfg.rollout.zmq_address or f"tcp://{cfg.cluster.bind_host}:0",
            max_message_bytes=int(cfg.cluster.zmq_max_message_mb * 2**20),
        ),
        batch_size=t.batch_size,
        max_staleness=cfg.rollout.max_staleness,
        dynamic_sampling=cfg.algorithm.dynamic_sampling,
        capacity=cfg.rollout.buffer_capacity or (cfg.rollout.max_staleness + 2) * t.batch_size,
    )
    # secure_run: a random engine API key and a private 0700 staging root, set in cfg before any process starts
    with contextlib.closing(buffer), secure_run(cfg), Cluster(cfg) as cluster, stop:
        model_dir = prepare_model_dir(cfg, str(run_dir))
        cluster.start_rollout(model_dir, buffer.address)  # loads tokenizer and prompts while the rest starts
        urls, trainers = cluster.launch(model_dir, str(run_dir))
        nodes = cluster.engine_nodes()
        ray.get([a.connect_weight_sync.remote(urls, [cfg.engine.tp] * len(urls), nodes) for a in trainers])
        step, version, rollout_state = _resume(cfg, run_dir, trainers, buffer)
        stages = ray.get([a.pp_stage.remote() for a in trainers])  # each rank's pipeline stage
        parts = stream_parts(cfg)  # > 1: each mini-batch trains as soon as its groups are in
        if version > 0:  # engines start from the initial weights: bring them to the checkpoint's
            _broadcast(trainers, stages, version)
        rollout = cluster.launch_rollout(rollout_state, version)
        logger = MetricsLogger(
            str(run_dir / "tb"), t.total_steps, cfg.logging.tensorboard, cfg.logging.console, step,
            sinks=make_sinks(cfg, run_dir),  # hook: W&B (issue 18)
        )  # fmt: skip
        evaluator = live_eval_or_none(cfg, urls, model_dir)
        engines = _EngineWeights(cfg, cluster, rollout, trainers, stages, model_dir, version, evaluator)
        history: list[dict[str, float]] = []
        trained: list[list[str]] = []
        evals: list[dict[str, float]] = []

        def record_evals(*results: dict[str, float]) -> None:
            for m in filter(None, results):
                logger.log_eval(m)
                evals.append(m)

        try:
            if evaluator is not None and step == 0 and cfg.eval.before_train:
                record_evals(*evaluator.run(0, version))  # the baseline: v0, before any update
            while step < t.total_steps and not stop.requested:
                step += 1
                t0 = time.perf_counter()
                if parts == 1:
                    out = _whole_step(cfg, buffer, engines, trainers, synced=step % every == 0)
                else:
                    out = _streamed_step(cfg, buffer, engines, trainers, parts)
                groups, rank_metrics, t_wait, healed = out
                t_train = time.perf_counter() - t0 - t_wait
                metrics = step_metrics(groups, rank_metrics, engines.version, t_wait, t_train)
                metrics.update(healed)
                metrics["perf/streamed_minibatches"] = float(parts if parts > 1 else 0)
                engines.trainer_stepped()
                metrics.update(engines.update(publish=step % every == 0))
                version = engines.version
                metrics.update(buffer.metrics())
                metrics.update(ray.get(rollout.stats.remote()))
                metrics["perf/gen_tokens_per_s"] = metrics.get("rollout/tokens_per_s", 0.0)
                if evaluator is not None:
                    record_evals(evaluator.poll())
                    if step < t.total_steps or not cfg.eval.before_train:
                        evaluator.maybe_start(step, version)
                metrics["engine/restarts"] = float(sum(cluster.restarts))
                metrics["engine/alive"] = float(len(cluster.live_urls))
                metrics["time/step(s)"] = time.perf_counter() - t0
                metrics["weight_version"] = version
                logger.log(step, metrics)
                history.append(metrics)
                trained.append([g.prompt_id for g in groups])
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 or stop.requested or step == t.total_steps:
                    _save(cfg, run_dir, step, version, trainers, rollout, buffer)
                if hf_due(cfg, step, last=stop.requested or step == t.total_steps):  # hook: issue 18
                    save_run_hf(cfg, run_dir, step, trainers, model_dir)
            if evaluator is not None:  # the evaluation still running, then the final weights' own (exact)
                final = not stop.requested and cfg.eval.before_train
                record_evals(*(evaluator.run(step, version) if final else [evaluator.poll(wait=True)]))
            accounting = buffer.accounting()
            engine_versions = _engine_versions(cfg, cluster.live_urls)
        except Exception as e:
            raise RunFailed(_failure_message(cfg, run_dir, step, e)) from e
        finally:
            if evaluator is not None:
                evaluator.close()
            logger.close()
    return RunResult(str(run_dir), step, version, history, accounting, engine_versions, trained, evals)


class RunFailed(RuntimeError):
    """A run stopped by a failure (a trainer rank died, ...): says where, and how to resume."""


def _failure_message(cfg: Config, run_dir: Path, step: int, e: Exception) -> str:
    last = checkpoint.latest_checkpoint(run_dir)
    where = f"during step {step}" if step else "before the first step"
    if last is None:
        return f"run failed {where}: {type(e).__name__}: {e}; no checkpoint was saved (set checkpoint.every)"
    return (
        f"run failed {where}: {type(e).__name__}: {e}; the last checkpoint is {last}: continue with "
        f"checkpoint.resume=auto logging.dir={cfg.logging.dir} logging.run_name={run_dir.name}"
    )


def _resume(cfg: Config, run_dir: Path, trainers: list, buffer: RolloutBuffer) -> tuple[int, int, dict | None]:
    """(step, version, rollout state) of the checkpoint named by checkpoint.resume, or a fresh start."""
    found = checkpoint.open_resume(run_dir, cfg.checkpoint.resume)  # verified; auto skips corrupt ones
    if found is None:  # no resume, or auto and nothing saved yet
        return 0, 0, None
    path, state, buffered = found
    ray.get([a.load.remote(str(path / "trainer")) for a in trainers])
    buffer.restore(buffered)
    buffer.load_state_dict(state["buffer"])
    log.info("resumed from %s (step %d, weights v%d)", path, state["step"], state["version"])
    return state["step"], state["version"], state["rollout"]


def _save(cfg: Config, run_dir: Path, step: int, version: int, trainers: list, rollout, buffer: RolloutBuffer) -> None:
    rollout_state = ray.get(rollout.state_dict.remote())

    def save_trainer(path: str) -> None:
        ray.get([a.save.remote(path) for a in trainers])

    # The manager's `pushed` count is the consistent cut: groups pushed after it are regenerated on resume.
    cut = rollout_state["pushed"]
    state = {"version": version, "rollout": rollout_state, "buffer": buffer.state_dict(cut)}
    checkpoint.save(run_dir, step, state, buffer.snapshot(cut), save_trainer, cfg.checkpoint.keep_last)


def _engine_versions(cfg: Config, urls: list[str]) -> list[str]:
    from engines.client import EngineClient

    client = EngineClient(urls, api_key=engine_api_key(cfg))
    try:
        return [client.run_sync(client.get_weight_version(u), timeout=30) for u in urls]
    finally:
        client.close_sync()


class _StopFlag:
    """SIGINT/SIGTERM end the loop after the current step (then checkpoint and a clean shutdown)."""

    requested = False

    def __enter__(self) -> _StopFlag:
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("signal %d: finishing the current step, then saving and shutting down", signum)
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _EngineWeights:
    """The engines as the loop sees them: the weight version they hold, and keeping it so.

    `update(publish)` first replaces dead or hung engines (Cluster.heal_engines), then syncs: with publish, the
    trainer's weights go to every engine as the next version; otherwise only if an engine was replaced, so that it
    holds the current weights before it serves. That re-sync keeps the version when the trainer has not stepped
    since the last sync (the weights are the same), and else makes a new one (the trainer's weights have moved on).
    A replaced engine joins the rollout's (and the evaluator's) rotation only once the sync has given it the weights.
    Such an unscheduled version (only possible with weight_sync.every > 1) puts the versions one ahead of the steps
    the rollout's admission control counts on; the staleness bound still holds through the buffer's drop at
    consumption (counted, and the prompts accounted for).
    """

    def __init__(
        self, cfg: Config, cluster: Cluster, rollout, trainers: list, stages: list[int], model_dir: str, version: int,
        evaluator,
    ):  # fmt: skip
        self.cfg, self.cluster, self.rollout, self.trainers, self.stages = cfg, cluster, rollout, trainers, stages
        self.model_dir, self.version, self.evaluator = model_dir, version, evaluator
        self.stepped = False  # the trainer's weights changed since the engines' last sync
        self.joining: list[str] = []  # restarted engines waiting for the weights

    def trainer_stepped(self) -> None:
        self.stepped = True

    def update(self, publish: bool = False) -> dict[str, float]:
        replaced = self._replace_dead_engines()
        if not (publish or replaced):
            return {}
        if publish or self.stepped:
            self.version += 1
        metrics = self._sync()
        self.stepped = False
        if replaced:
            metrics.update({"engine/restarts": float(sum(self.cluster.restarts))})
        return metrics

    def _sync(self) -> dict[str, float]:
        """pause/abort in-flight work -> broadcast -> engines at `version` -> rollout resumes under it. An engine
        that dies or hangs during the sync is restarted (or dropped, after engine.max_restarts) and the broadcast
        repeated."""
        version = self.version
        ray.get(self.rollout.before_weight_update.remote())
        try:
            while True:  # ends: every repeat follows a restart or a drop, and both are bounded (engine.max_restarts)
                try:
                    metrics = _broadcast(self.trainers, self.stages, version)
                    break
                except ray.exceptions.RayTaskError:
                    if not self._replace_dead_engines():
                        raise
                    log.warning("an engine failed during the weight sync to v%d: replaced, syncing again", version)
            joining, self.joining = self.joining, []
            if joining:  # they hold the weights now
                ray.get(self.rollout.add_engines.remote(joining))
                if self.evaluator is not None:
                    self.evaluator.add_engines(joining)
            return metrics
        finally:
            ray.get(self.rollout.after_weight_update.remote(version))

    @contextlib.contextmanager
    def released(self, synced: bool) -> Iterator[None]:
        """weight_sync.release_memory (colocated): generation stops and the engines give that memory back while the
        trainer trains, and take it back after. A step followed by a sync leaves them paused (the sync continues
        them); otherwise they continue at once under the current version."""
        if not releases_engine_memory(self.cfg):
            yield
            return
        first = self.trainers[self.stages.index(0)]  # stage 0's source pauses and resumes the engines for all stages
        ray.get(self.rollout.before_weight_update.remote())
        ray.get(first.release_engine_memory.remote())
        try:
            yield
        finally:
            ray.get(first.resume_engine_memory.remote())
        if not synced:
            ray.get(first.resume_engines.remote(self.version))
            ray.get(self.rollout.after_weight_update.remote(self.version))

    def _replace_dead_engines(self) -> bool:
        """Restart dead or hung engines, route away from them, rebuild the sync group. False if all are well."""
        replaced = self.cluster.heal_engines(self.model_dir)
        if not replaced:
            return False
        if not self.cluster.live_urls:
            raise RuntimeError(
                f"every engine is dead (after engine.max_restarts={self.cfg.engine.max_restarts} restarts)"
            )
        ray.get(self.rollout.drop_engines.remote(list(replaced)))
        if self.evaluator is not None:
            self.evaluator.drop_engines(list(replaced))
        self.joining = [u for u in self.joining if u in self.cluster.live_urls]
        self.joining += [new for new in replaced.values() if new]
        urls, tp = self.cluster.live_urls, self.cfg.engine.tp
        ray.get([a.reconnect_weight_sync.remote(urls, [tp] * len(urls)) for a in self.trainers])
        return True


def _broadcast(trainers: list, stages: list[int], version: int) -> dict[str, float]:
    """One stage: its source pauses, sends and resumes the engines. Several pipeline stages (`stages`: each rank's):
    pause once, then each stage in turn (an engine receives on one group at a time), then resume once."""
    out: dict[str, float] = {}
    if max(stages) == 0:
        for stats in ray.get([a.sync_weights.remote(version) for a in trainers]):
            out.update(stats)
        return out
    first = trainers[stages.index(0)]
    ray.get(first.pause_engines.remote())
    seconds = 0.0
    for stage in range(max(stages) + 1):
        members = [a for a, s in zip(trainers, stages, strict=True) if s == stage]
        for stats in ray.get([a.sync_weights.remote(version, pause=False) for a in members]):
            seconds += stats.get("time/weight_sync(s)", 0.0)
    ray.get(first.resume_engines.remote(version))
    out["time/weight_sync(s)"] = seconds
    return out


def _whole_step(
    cfg: Config, buffer: RolloutBuffer, engines: _EngineWeights, trainers: list, synced: bool
) -> tuple[list[Group], list[dict[str, float]], float, dict[str, float]]:
    """One step on the whole batch: the groups, each rank's metrics, the time spent waiting for the batch and the
    health-check metrics. `synced`: a weight sync follows (see _EngineWeights.released)."""
    t0 = time.perf_counter()
    groups, healed = _next_batch(cfg, buffer, engines)
    t_wait = time.perf_counter() - t0
    per_rank = _shard(make_step_batches(groups, cfg, cfg.trainer.parallel.dp), cfg)
    with engines.released(synced):
        rank_metrics = ray.get([a.train_step.remote(b) for a, b in zip(trainers, per_rank, strict=True)])
    return groups, rank_metrics, t_wait, healed


def _streamed_step(
    cfg: Config, buffer: RolloutBuffer, engines: _EngineWeights, trainers: list, parts: int
) -> tuple[list[Group], list[dict[str, float]], float, dict[str, float]]:
    """One step in `parts` mini-batches: each part of B / parts groups goes to the ranks as soon as the buffer has
    it, queued behind the mini-batch they are training, so waiting for the next part overlaps training this one.
    Returns what _whole_step does, each rank's metrics merged over the mini-batches.
    Once the first part is sent, a weight sync (an engine replaced while a later part is awaited; it runs after the
    queued mini-batches) sends weights the step has moved: a new version."""
    groups: list[Group] = []
    healed: dict[str, float] = {}
    per_part: list[list] = []  # [part][rank] -> metrics ref
    t_wait = 0.0
    for _ in range(parts):
        t0 = time.perf_counter()
        part, h = _next_batch(cfg, buffer, engines, size=cfg.trainer.batch_size // parts)
        t_wait += time.perf_counter() - t0
        healed.update(h)
        groups += part
        per_rank = _shard(make_step_batches(part, cfg, cfg.trainer.parallel.dp, num_minibatches=1), cfg)
        per_part.append([a.train_minibatch.remote(b[0]) for a, b in zip(trainers, per_rank, strict=True)])
        engines.trainer_stepped()
    done = [ray.get(refs) for refs in per_part]
    return groups, [merge_metrics(list(ranks)) for ranks in zip(*done, strict=True)], t_wait, healed


def _next_batch(
    cfg: Config, buffer: RolloutBuffer, engines: _EngineWeights, size: int | None = None
) -> tuple[list[Group], dict[str, float]]:
    """Wait for the next batch (or `size` groups of it), checking engine health every few seconds (a dead or hung
    engine stalls generation)."""
    deadline = time.monotonic() + cfg.engine.request_timeout_s
    healed: dict[str, float] = {}
    while True:
        remaining = deadline - time.monotonic()
        try:
            timeout_s = max(min(5.0, remaining), 0.01)
            return buffer.get_batch(trainer_version=engines.version, timeout_s=timeout_s, size=size), healed
        except TimeoutError:
            if error := ray.get(engines.rollout.error.remote()):  # e.g. the reward function fails on every call
                raise RuntimeError(error) from None
            if remaining <= 5.0:
                raise
            healed.update(engines.update())


def _shard(minibatches: list[list[list]], cfg: Config) -> list[list[list]]:
    """[mini-batch][dp rank] -> per trainer rank: its DP shard of every mini-batch (model-parallel peers share it)."""
    p = cfg.trainer.parallel
    ranks_per_dp = p.tp * p.pp * p.cp
    return [[mb[r // ranks_per_dp] for mb in minibatches] for r in range(cfg.trainer.world_size)]


def step_metrics(
    groups: list[Group], rank_metrics: list[dict[str, float]], version: int, t_wait: float, t_train: float
) -> dict[str, float]:
    samples = [s for g in groups for s in g.samples]
    n = max(len(samples), 1)
    lens = [s.response_len for s in samples]
    stale = [version - s.min_version for s in samples]
    first = rank_metrics[0]
    train_tokens = sum(m.get("local_tokens", 0.0) for m in rank_metrics)
    m = {
        "reward/mean": sum(s.reward for s in samples) / n,
        "reward/task_mean": sum(s.task_reward for s in samples) / n,
        "reward/acc": sum(s.acc for s in samples) / n,
        "response/len_mean": sum(lens) / n,
        "response/len_max": float(max(lens, default=0)),
        "response/truncated_frac": sum(s.truncated for s in samples) / n,
        "staleness/mean": sum(stale) / n,
        "staleness/max": float(max(stale, default=0)),
        "time/wait_batch(s)": t_wait,
        "time/train(s)": t_train,
        "perf/train_tokens_per_s": train_tokens / max(t_train, 1e-9),
    }
    for k, v in first.items():
        if k not in ("local_tokens", "step_seconds"):
            m[f"train/{k}"] = v
    return m


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
