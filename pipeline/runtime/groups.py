"""The runtime groups the loop drives: the engines, the trainer ranks, the rollout actor, each behind one handle.

Contract:
- `EngineGroup` is the inference engines as the run sees them. The live list is `Cluster.urls` (the one place it is
  kept; `live_urls` reads it). `heal()` restarts dead or hung engines (Cluster.heal_engines), then tells every
  subscriber: the rollout and the evaluator stop routing to the replaced engines, the trainer group rebuilds its
  weight-sync group over the live ones. A restarted engine joins the rollout's and the evaluator's rotation only
  at `welcome()`, which the weight-sync coordinator calls once a sync has given it the current weights.
- `TrainerGroup` is the trainer ranks (Ray handles) with each rank's pipeline stage, read once at start. Stage 0's
  weight-sync source pauses and resumes the engines for every stage; `sync(version)` sends one stage at a time
  (an engine receives on one group at a time).
- `RolloutHandle` is the rollout actor's calls the loop and the coordinator make (pause/resume around a weight
  update, engines leaving and joining, stats, checkpoint state).
- `launch_groups(cfg, cluster, model_dir, log_dir)` starts the engines and the trainer ranks (Cluster.launch) and
  connects the ranks' weight-sync senders to the engines.
Only this module and `cluster` speak raw Ray to these actors.
"""

from __future__ import annotations

from typing import Any

import ray

from pipeline.config import Config


class RolloutHandle:
    def __init__(self, actor: Any):
        self.actor = actor

    def pause(self) -> None:
        ray.get(self.actor.before_weight_update.remote())

    def resume(self, version: int) -> None:
        ray.get(self.actor.after_weight_update.remote(version))

    def add_engines(self, urls: list[str]) -> None:
        ray.get(self.actor.add_engines.remote(urls))

    def drop_engines(self, urls: list[str]) -> None:
        ray.get(self.actor.drop_engines.remote(urls))

    def error(self) -> str:
        """Why the rollout cannot go on ("" while it can): its manager crashed, or the reward function fails."""
        return ray.get(self.actor.error.remote())

    def stats(self) -> dict[str, float]:
        return ray.get(self.actor.stats.remote())

    def progress(self) -> dict:
        """Groups generated / kept / filtered by reason / requeued, reward failures: totals, nothing reset."""
        return ray.get(self.actor.progress.remote())

    def state_dict(self) -> dict:
        return ray.get(self.actor.state_dict.remote())


class TrainerGroup:
    def __init__(self, actors: list[Any], stages: list[int]):
        self.actors, self.stages = actors, stages
        self.source = actors[stages.index(0)]  # stage 0's sync source pauses and resumes the engines for all stages

    @classmethod
    def of(cls, actors: list[Any]) -> TrainerGroup:
        return cls(actors, ray.get([a.pp_stage.remote() for a in actors]))

    def train_step(self, per_rank: list) -> list[dict[str, float]]:
        return ray.get([a.train_step.remote(b) for a, b in zip(self.actors, per_rank, strict=True)])

    def train_minibatch(self, per_rank: list) -> list[Any]:
        """Queue one mini-batch on every rank; returns the refs of their metrics (not waited for)."""
        return [a.train_minibatch.remote(b[0]) for a, b in zip(self.actors, per_rank, strict=True)]

    def connect(self, urls: list[str], engine_tp: list[int], nodes: list[str]) -> None:
        ray.get([a.connect_weight_sync.remote(urls, engine_tp, nodes) for a in self.actors])

    def reconnect(self, urls: list[str], engine_tp: list[int]) -> None:
        ray.get([a.reconnect_weight_sync.remote(urls, engine_tp) for a in self.actors])

    def sync(self, version: int) -> dict[str, float]:
        """Send the weights as `version`. One stage: its source pauses, sends and resumes the engines. Several:
        pause once, then each stage in turn, then resume once."""
        out: dict[str, float] = {}
        if max(self.stages) == 0:
            for stats in ray.get([a.sync_weights.remote(version) for a in self.actors]):
                out.update(stats)
            return out
        self.pause_engines()
        seconds = 0.0
        for stage in range(max(self.stages) + 1):
            members = [a for a, s in zip(self.actors, self.stages, strict=True) if s == stage]
            for stats in ray.get([a.sync_weights.remote(version, pause=False) for a in members]):
                seconds += stats.get("time/weight_sync(s)", 0.0)
        self.resume_engines(version)
        out["time/weight_sync(s)"] = seconds
        return out

    def pause_engines(self) -> None:
        ray.get(self.source.pause_engines.remote())

    def resume_engines(self, version: int) -> None:
        ray.get(self.source.resume_engines.remote(version))

    def release_engine_memory(self) -> None:
        ray.get(self.source.release_engine_memory.remote())

    def resume_engine_memory(self) -> None:
        ray.get(self.source.resume_engine_memory.remote())

    def save(self, path: str) -> None:
        ray.get([a.save.remote(path) for a in self.actors])

    def load(self, path: str) -> None:
        ray.get([a.load.remote(path) for a in self.actors])


class EngineGroup:
    def __init__(self, cfg: Config, cluster: Any, model_dir: str, trainers: TrainerGroup):
        self.cfg, self.cluster, self.model_dir, self.trainers = cfg, cluster, model_dir, trainers
        self.rollout: RolloutHandle | None = None
        self.evaluator: Any = None  # LiveEval: drop_engines / add_engines
        self.joining: list[str] = []  # restarted engines waiting for the weights

    def subscribe(self, rollout: RolloutHandle, evaluator: Any = None) -> None:
        self.rollout, self.evaluator = rollout, evaluator

    @property
    def live_urls(self) -> list[str]:
        return self.cluster.live_urls

    @property
    def restarts(self) -> int:
        return sum(self.cluster.restarts)

    def heal(self) -> bool:
        """Restart dead or hung engines, route away from them, rebuild the sync group. False if all are well."""
        replaced = self.cluster.heal_engines(self.model_dir)
        if not replaced:
            return False
        if not self.live_urls:
            raise RuntimeError(
                f"every engine is dead (after engine.max_restarts={self.cfg.engine.max_restarts} restarts)"
            )
        if self.rollout is not None:
            self.rollout.drop_engines(list(replaced))
        if self.evaluator is not None:
            self.evaluator.drop_engines(list(replaced))
        self.joining = [u for u in self.joining if u in self.live_urls]
        self.joining += [new for new in replaced.values() if new]
        self.trainers.reconnect(self.live_urls, [self.cfg.engine.tp] * len(self.live_urls))
        return True

    def welcome(self) -> None:
        """The restarted engines hold the current weights now: they join the rotation."""
        joining, self.joining = self.joining, []
        if not joining:
            return
        if self.rollout is not None:
            self.rollout.add_engines(joining)
        if self.evaluator is not None:
            self.evaluator.add_engines(joining)

    def versions(self) -> list[str]:
        return self.cluster.engine_versions()


def launch_groups(cfg: Config, cluster: Any, model_dir: str, log_dir: str) -> tuple[EngineGroup, TrainerGroup]:
    urls, actors = cluster.launch(model_dir, log_dir)
    trainers = TrainerGroup.of(actors)
    trainers.connect(urls, [cfg.engine.tp] * len(urls), cluster.engine_nodes())
    return EngineGroup(cfg, cluster, model_dir, trainers), trainers
