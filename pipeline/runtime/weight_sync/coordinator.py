"""The weight-sync coordinator: pause -> send the stages -> resume -> the engines hold version v.

Contract (the loop's view of the engines' weights):
- `version` is the weight version the engines hold. `trainer_stepped()` marks the trainer's weights as moved.
- `update(publish)` first heals the engine group (dead or hung engines replaced), then syncs: with publish, the
  trainer's weights go to every engine as the next version; otherwise only if an engine was replaced, so that it
  holds the current weights before it serves. That re-sync keeps the version when the trainer has not stepped
  since the last sync (the weights are the same), and else makes a new one (the weights have moved on). Such an
  unscheduled version (only possible with weight_sync.every > 1) puts the versions one ahead of the steps the
  rollout's admission control counts on; the staleness bound still holds through the buffer's drop at consumption.
- A sync: the rollout pauses (in-flight work aborted or retracted), the trainer group sends every stage, replaced
  engines join the rotation (EngineGroup.welcome), and the rollout resumes under the version, whatever happened.
  An engine that dies or hangs during the sync is replaced (or dropped, after engine.max_restarts) and the send
  repeated; a failure no health check explains stops the run.
- `released(synced)`: with weight_sync.release_memory (colocated) generation stops and the engines give that memory
  back while the trainer trains, and take it back after. A step followed by a sync leaves them paused (the sync
  continues them); otherwise they continue at once under the current version.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import ray

from pipeline.config import Config, layout
from pipeline.runtime.groups import EngineGroup, RolloutHandle, TrainerGroup

log = logging.getLogger("dapo")


class WeightSyncCoordinator:
    def __init__(
        self, cfg: Config, engines: EngineGroup, trainers: TrainerGroup, rollout: RolloutHandle, version: int
    ):  # fmt: skip
        self.engines, self.trainers, self.rollout, self.version = engines, trainers, rollout, version
        self.releases_memory = layout(cfg).releases_memory
        self.stepped = False  # the trainer's weights changed since the engines' last sync

    def trainer_stepped(self) -> None:
        self.stepped = True

    def update(self, publish: bool = False) -> dict[str, float]:
        replaced = self.engines.heal()
        if not (publish or replaced):
            return {}
        if publish or self.stepped:
            self.version += 1
        metrics = self._sync()
        self.stepped = False
        if replaced:
            metrics.update({"engine/restarts": float(self.engines.restarts)})
        return metrics

    def _sync(self) -> dict[str, float]:
        version = self.version
        self.rollout.pause()
        try:
            while True:  # ends: every repeat follows a restart or a drop, and both are bounded (engine.max_restarts)
                try:
                    metrics = self.trainers.sync(version)
                    break
                except ray.exceptions.RayTaskError:
                    if not self.engines.heal():
                        raise
                    log.warning("an engine failed during the weight sync to v%d: replaced, syncing again", version)
            self.engines.welcome()
            return metrics
        finally:
            self.rollout.resume(version)

    @contextlib.contextmanager
    def released(self, synced: bool) -> Iterator[None]:
        if not self.releases_memory:
            yield
            return
        self.rollout.pause()
        self.trainers.release_engine_memory()
        try:
            yield
        finally:
            self.trainers.resume_engine_memory()
        if not synced:
            self.trainers.resume_engines(self.version)
            self.rollout.resume(self.version)
