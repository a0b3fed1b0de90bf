"""The training loop: the arrow diagram of docs/DESIGN.md, one screen.

    prompts -> RolloutManager -> engines (HTTP) -> rewards -> ZMQ -> RolloutBuffer (staleness, exact batches)
            -> trainer ranks (DAPO loss) -> every `weight_sync.every` steps: pause -> send -> resume -> engines at v+1

Generation never waits for training: the rollout actor streams groups into the buffer while the trainer works
on the previous batch; the staleness bound (rollout.max_staleness) decides how far ahead it may run. Nor does
training wait for a whole batch: with trainer.num_minibatches > 1 each mini-batch trains as soon as its groups are
in (Layout.stream_parts; pipeline/runtime/steps.py), while the step's later groups are still generating.
The runtime groups (pipeline/runtime/groups.py) and the weight-sync coordinator hold the engines' health and
versions; this module only wires them in the order of the diagram.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config, check_local_paths, layout, to_yaml
from pipeline.flow.buffer import make_buffer
from pipeline.flow.transport import GroupReceiver
from pipeline.runtime import checkpoint
from pipeline.runtime.cluster import Cluster
from pipeline.runtime.groups import RolloutHandle, launch_groups
from pipeline.runtime.hf_export import hf_due, save_run_hf
from pipeline.runtime.live_eval import live_eval_or_none
from pipeline.runtime.metrics import RunRecord
from pipeline.runtime.run_security import secure_run
from pipeline.runtime.signals import StopFlag
from pipeline.runtime.steps import train_step
from pipeline.runtime.weight_sync.coordinator import WeightSyncCoordinator
from pipeline.warmstart import prepare_model_dir


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


def train(cfg: Config) -> RunResult:
    check_local_paths(cfg)  # missing files fail here, before Ray or any engine starts
    run_dir, lay = make_run_dir(cfg), layout(cfg)
    resumed = checkpoint.open_resume(run_dir, cfg.checkpoint.resume)  # a bad checkpoint fails here, in seconds
    receiver = GroupReceiver(
        cfg.rollout.zmq_address or f"tcp://{cfg.cluster.bind_host}:0",
        max_message_bytes=int(cfg.cluster.zmq_max_message_mb * 2**20),
    )
    buffer = make_buffer(lay, receiver)
    # secure_run: a random engine API key and a private 0700 staging root, set in cfg before any process starts
    # StopFlag first: a signal during start-up (Ray, engines, trainer ranks) unwinds at once, stopping what started
    with StopFlag() as stop, stop.startup(), contextlib.closing(buffer), secure_run(cfg), Cluster(cfg) as cluster:
        model_dir = prepare_model_dir(cfg, str(run_dir))
        cluster.start_rollout(model_dir, buffer.address)  # loads tokenizer and prompts while the rest starts
        engines, trainers = launch_groups(cfg, cluster, model_dir, str(run_dir))
        step, version, rollout_state = checkpoint.resume_run(cfg, run_dir, trainers, buffer, resumed)
        if version > 0:  # engines start from the initial weights: bring them to the checkpoint's
            trainers.sync(version)
        rollout = RolloutHandle(cluster.launch_rollout(rollout_state, version))
        record = RunRecord(cfg, str(run_dir), step, live_eval_or_none(cfg, engines.live_urls, model_dir))
        engines.subscribe(rollout, record.evaluator)
        weights = WeightSyncCoordinator(cfg, engines, trainers, rollout, version)
        stop.started()  # from here a signal finishes the current step, saves and stops
        try:
            record.baseline(step, weights.version)
            while step < cfg.trainer.total_steps and not stop.requested:
                step, t0 = step + 1, time.perf_counter()
                groups, metrics = train_step(cfg, lay, buffer, weights, trainers, step)  # buffer -> trainer ranks
                metrics.update(weights.update(publish=step % lay.sync_every == 0))  # -> engines at v+1
                metrics.update(buffer.metrics())
                metrics.update(rollout.stats())
                record.step(step, weights.version, [g.prompt_id for g in groups], metrics, engines, t0)
                if checkpoint.due(cfg, step, stop.requested):
                    checkpoint.save_run(cfg, run_dir, step, weights.version, trainers, rollout, buffer)
                if hf_due(cfg, step, last=stop.requested or step == cfg.trainer.total_steps):
                    save_run_hf(cfg, run_dir, step, trainers.actors, model_dir)
            record.finish(step, weights.version, stop.requested)
            accounting, engine_versions = buffer.accounting(), engines.versions()
        except Exception as e:
            raise RunFailed(_failure_message(cfg, run_dir, step, e)) from e
        finally:
            record.close()
    history, trained, evals = record.history, record.trained, record.evals
    return RunResult(str(run_dir), step, weights.version, history, accounting, engine_versions, trained, evals)


def make_run_dir(cfg: Config) -> Path:
    name = cfg.logging.run_name or time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.logging.dir) / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    return path


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
