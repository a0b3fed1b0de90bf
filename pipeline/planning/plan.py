"""The `Plan` record of `dapo plan`: a proposed layout with its memory check and modelled throughput.

Contract: `Plan` holds what the search chose (trainer parallelism, engines, placement) and derives the pipeline's
throughput, the waiting side and its idle fraction. It sits below both the search (which builds plans) and the
output (which prints and writes them), so that the two do not import each other's modules in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.planning.memory import EngineSetup, Feasibility, Parallel, TrainSetup
from pipeline.planning.models import GPU, ModelSpec


@dataclass
class Plan:
    model: ModelSpec
    gpu: GPU
    gpus: int
    gpu_mem: float
    seq_len: int
    prompt_len: int
    placement: str
    train_gpus: int
    parallel: Parallel
    train: TrainSetup
    engine: EngineSetup
    num_engines: int
    feasibility: Feasibility
    gen_tokens_per_s: float
    """Response tokens/s the engines generate (raw, x decode-tail occupancy)."""
    train_tokens_per_s: float
    """Trained response tokens/s (prompt tokens are trained too but not counted)."""
    engine_batch: int
    alternatives: list[tuple[float, Parallel, TrainSetup, int]] = field(default_factory=list)
    demand: float = 1.0
    """Generated response tokens per trained one (dynamic sampling, over-admission)."""
    sync_s: float = 0.0
    """One weight sync, seconds (once per trainer step)."""
    step_tokens: float = 1.0
    """Trained response tokens per trainer step."""
    notes: list[str] = field(default_factory=list)
    """Why this layout, what it needs, what the config cannot express yet."""
    config_error: str = ""
    """Non-empty: the layout cannot be written as a config that validates (and why)."""
    gpus_per_node: int = 0
    """The request's GPUs per node (written as cluster.gpus_per_node; 0: not known)."""

    @property
    def useful_gen_tokens_per_s(self) -> float:
        """Generated tokens/s that end up trained."""
        return self.gen_tokens_per_s / self.demand

    @property
    def pipeline_tokens_per_s(self) -> float:
        gen, train = max(self.useful_gen_tokens_per_s, 1e-9), max(self.train_tokens_per_s, 1e-9)
        if self.placement == "disaggregated":  # generation pauses for the sync; training overlaps it
            step = max(self.step_tokens / gen + self.sync_s, self.step_tokens / train)
        else:  # the GPUs alternate: generate, train, sync
            step = self.step_tokens / gen + self.step_tokens / train + self.sync_s
        return self.step_tokens / step

    @property
    def idle_side(self) -> str:
        """Disaggregated: which GPUs wait for the other side ("generation" or "training")."""
        gen = self.step_tokens / max(self.useful_gen_tokens_per_s, 1e-9) + self.sync_s
        return "generation" if gen < self.step_tokens / max(self.train_tokens_per_s, 1e-9) else "training"

    @property
    def idle_fraction(self) -> float:
        """Disaggregated: share of the waiting side's GPU time spent idle (0 when balanced)."""
        if self.placement != "disaggregated":
            return 0.0
        gen = self.step_tokens / max(self.useful_gen_tokens_per_s, 1e-9) + self.sync_s
        train = self.step_tokens / max(self.train_tokens_per_s, 1e-9)
        return 1 - min(gen, train) / max(gen, train)
