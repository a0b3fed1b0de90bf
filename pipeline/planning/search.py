"""Layout search of `dapo plan`: the trainer parallelism and engine layout with the best modelled throughput.

Contract:
- `propose(model, gpus, ...)` -> `Plan`, or `PlanError` naming what does not fit. Modes:
  * disaggregated: trainer and engines on separate GPUs; the split (any number of trainer GPUs whose data-parallel
    size divides the mini-batch, not only powers of two) balances generated and trained tokens/s; the idle
    fraction of the side that waits is reported.
  * colocated: the better of space-shared (every GPU holds a trainer rank and a resident tp=1 engine, both
    running) and time-shared (engines of tp up to a node's GPUs on the trainer's GPUs, their memory released while
    training: weight_sync.release_memory, as slime's --colocate and verl's hybrid engine do); the time-shared
    layout is what fits 32B / 30B-A3B on one 8-GPU node.
- Candidates obey the backends' rules (`structure_problems`: tp divides KV heads, CP needs transformer-engine,
  engine and trainer tp within a node, ...), dp divides the samples of a mini-batch, and the proposal's config
  passes `pipeline.config.validate` (`plan.config_error` says why a layout cannot be written as a config yet).
- Throughput: generated tokens are divided by DAPO's generation demand (keep rate, over-admission) and scaled by
  the decode-tail occupancy; one weight sync per step is added (see throughput.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pipeline.planning.memory import (
    ENGINE_RELEASED_GB,
    ENGINE_RUNTIME_GB,
    HEADROOM,
    RUNTIME_GB,
    EngineSetup,
    Parallel,
    TrainSetup,
    check_feasible,
    engine_memory,
    structure_problems,
    train_memory,
)
from pipeline.planning.models import GPU, GPUS, GiB, ModelSpec, PlanError, load_model
from pipeline.planning.output import validated_config
from pipeline.planning.plan import Plan
from pipeline.planning.throughput import (
    DEFAULT_KEEP_RATE,
    TRAIN_MFU,
    decode_tail_efficiency,
    decode_tokens_per_s,
    generation_demand,
    train_efficiency,
    train_flops_per_token,
    weight_sync_seconds,
)


@dataclass(frozen=True)
class Request:
    """What the user asked for, with the derived lengths."""

    model: ModelSpec
    gpu: GPU
    gpus: int
    mem: float
    seq_len: int
    prompt_len: int
    samples: int
    gpus_per_node: int
    allow_offload: bool
    min_seqs: int
    keep_rate: float
    over_admission: float
    staleness: int
    te: bool

    @property
    def resp(self) -> float:
        return (self.seq_len - self.prompt_len) / 2  # responses average half the budget

    @property
    def ctx(self) -> float:
        return self.prompt_len + self.resp / 2  # mean context of a trained or decoded token

    @property
    def resp_frac(self) -> float:
        return self.resp / (self.prompt_len + self.resp)  # share of trained tokens that are response tokens


def _pow2(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(max(limit, 1))) + 1)]


def default_logprob_chunk() -> int:
    """The trainers' default `trainer.logprob_chunk_tokens` (0 where the config has no fused logprob head)."""
    from pipeline.config import TrainerConfig

    return int(getattr(TrainerConfig(), "logprob_chunk_tokens", 0) or 0)


def _train_candidates(r: Request, n: int):
    m = r.model
    chunk = default_logprob_chunk()
    backends = ["megatron"] if m.is_moe else ["fsdp", "megatron"]
    for backend in backends:
        tps = [1] if backend == "fsdp" else [t for t in _pow2(r.gpus_per_node) if m.num_kv_heads % t == 0]
        # pp must divide the layers: the config has no uneven first/last stage setting.
        pps = [1] if backend == "fsdp" else [p for p in (1, 2, 3, 4, 6, 8, 12, 16) if m.num_layers % p == 0]
        cps = [1] if backend == "fsdp" or not r.te else _pow2(8)
        for tp in tps:
            for pp in pps:
                for cp in cps:
                    if n % (tp * pp * cp):
                        continue
                    dp = n // (tp * pp * cp)
                    if r.samples % dp:
                        continue  # validate(): dp must divide the samples of a mini-batch
                    eps = [e for e in _pow2(m.num_experts) if (tp * cp * dp) % e == 0] if m.is_moe else [1]
                    for ep in eps:
                        for offload in (False, True) if r.allow_offload else (False,):
                            for recompute in (False, True):
                                par = Parallel(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp)
                                yield par, TrainSetup(backend, recompute=recompute, optimizer_offload=offload,
                                                      offload_in_gen=False, logprob_chunk=chunk, te=r.te)  # fmt: skip


def best_trainers(r: Request, n: int, mem_budget: float, states_budget: float = float("inf")):
    """Feasible trainer layouts on n GPUs, best first: [(rate, parallel, setup)]. rate = layout efficiency / FLOPs
    per token, so that n * peak FLOP/s * MFU * rate is trained tokens/s. `states_budget`: most GiB the resident
    weights + grads + optimizer may take (time-shared: they stay while the engine generates)."""
    found = []
    for par, setup in _train_candidates(r, n):
        setup = replace(setup, mb_tokens=r.seq_len)
        if structure_problems(r.model, par, setup, EngineSetup(), r.gpus_per_node):
            continue
        stages = [train_memory(r.model, par, r.seq_len, setup, s) for s in ("first", "last")]
        if max(s["total"] for s in stages) > mem_budget:
            continue
        if max(s["weights"] + s["grads"] + s["optimizer"] for s in stages) > states_budget:
            continue
        rate = train_efficiency(par, setup, r.samples) / train_flops_per_token(r.model, r.ctx, setup.recompute)
        # Ties: fsdp (simpler, ZeRO-3), then fewer model-parallel ranks.
        found.append((rate, setup.backend == "fsdp", -par.tp * par.pp * par.cp, par, setup))
    found.sort(key=lambda x: x[:3], reverse=True)
    return [(rate, par, setup) for rate, _, _, par, setup in found]


def _engine_tps(r: Request) -> list[int]:
    limit = min(r.gpus, r.gpus_per_node)
    return [t for t in _pow2(limit) if r.model.num_heads % t == 0]


def _best_engine(r: Request, max_gpus: int, mem_fraction: float):
    """(engine setup, tokens/s per engine, batch) with the best tokens/s per GPU, or None."""
    best = None
    for tp in [t for t in _engine_tps(r) if t <= max_gpus]:
        e = EngineSetup(tp=tp, mem_fraction=mem_fraction, min_seqs=r.min_seqs)
        mem = engine_memory(r.model, e, r.seq_len, r.mem)
        if mem["weights"] + mem["kv_min"] > mem["reserved"]:
            continue
        tps, batch = decode_tokens_per_s(r.model, e, r.gpu, r.mem, r.prompt_len, r.resp)
        if best is None or tps / tp > best[1] / best[0].tp * 1.02:  # a larger tp must win clearly
            best = (e, tps, batch)
    return best


def propose(
    model: ModelSpec | str,
    gpus: int,
    gpu_mem: float | None = None,
    seq_len: int = 8192,
    *,
    mode: str = "disaggregated",
    gpu: str = "h100",
    prompt_len: int = 1024,
    samples_per_minibatch: int = 512,
    gpus_per_node: int = 8,
    allow_offload: bool = False,
    min_seqs: int = 4,
    keep_rate: float = DEFAULT_KEEP_RATE,
    over_admission: float = 0.5,
    staleness: int = 1,
    te: bool | None = None,
) -> Plan:
    """The best modelled layout of `model` on `gpus` GPUs (mode: disaggregated | colocated)."""
    import importlib.util

    m = load_model(model)
    hw = GPUS.get(gpu.lower())
    if hw is None:
        raise PlanError(f"--gpu {gpu!r}: one of {', '.join(GPUS)}")
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1; got {gpus}")
    if not 0 < prompt_len < seq_len:
        raise PlanError(f"prompt length {prompt_len} must be in (0, seq_len={seq_len})")
    if te is None:
        te = importlib.util.find_spec("transformer_engine") is not None
    r = Request(m, hw, gpus, gpu_mem or hw.mem_gb, seq_len, prompt_len, samples_per_minibatch, gpus_per_node,
                allow_offload, min_seqs, keep_rate, over_admission, staleness, te)  # fmt: skip
    if mode == "colocated":
        plans = [p for p in (_space_shared(r), _time_shared(r)) if p is not None]
        if not plans:
            raise PlanError(
                _no_fit_message(r) + " Colocated, neither a tp=1 engine per GPU beside a trainer rank nor engines "
                f"of tp <= {min(gpus, gpus_per_node)} sharing the trainer's GPUs (memory released while training) fit."
            )
        best = max(plans, key=lambda p: (not p.config_error, p.pipeline_tokens_per_s))
        other = [p for p in plans if p is not best]
        if other:
            best.notes.append(
                f"the {other[0].placement} alternative (engine tp={other[0].engine.tp}) models "
                f"{other[0].pipeline_tokens_per_s:,.0f} tokens/s"
                + (f" but cannot be written as a config yet: {other[0].config_error}" if other[0].config_error else "")
            )
        return best
    if mode != "disaggregated":
        raise PlanError(f"--mode must be colocated or disaggregated; got {mode!r}")
    if gpus < 2:
        raise PlanError("disaggregated mode needs >= 2 GPUs (one trains, one generates); use --mode colocated")
    return _disaggregated(r)


def _finish(r: Request, plan: Plan) -> Plan:
    plan.gpus_per_node = r.gpus_per_node
    plan.demand = generation_demand(r.keep_rate, r.over_admission)
    plan.gen_tokens_per_s *= decode_tail_efficiency(r.staleness)
    plan.step_tokens = r.samples * r.resp
    shared = plan.placement != "disaggregated"
    link = "disk" if shared else ("nccl-intra-node" if r.gpus <= r.gpus_per_node else "nccl-inter-node")
    plan.sync_s = weight_sync_seconds(r.model.total_params, 2.0, link)
    return plan


def _first_valid(plans: list[Plan]) -> Plan | None:
    """The fastest plan whose config validates; else the fastest, with its config_error set."""
    plans = sorted(plans, key=lambda p: p.pipeline_tokens_per_s, reverse=True)
    for plan in plans:
        plan.config_error = config_error(plan)
        if not plan.config_error:
            return plan
    return plans[0] if plans else None


def _disaggregated(r: Request) -> Plan:
    """Split the GPUs so that useful generated and trained response tokens/s balance (maximise the pipeline rate)."""
    eng = _best_engine(r, r.gpus - 1, 0.85)
    if eng is None:
        raise PlanError(f"{r.model.name}: no engine of tp <= {min(r.gpus - 1, r.gpus_per_node)} GPUs holds the "
                        f"weights and {r.min_seqs} full sequences")  # fmt: skip
    e, per_engine, batch = eng
    plans = []
    for n_train in range(1, r.gpus):
        n_gen = r.gpus - n_train
        if n_gen < e.tp:
            continue
        cands = best_trainers(r, n_train, r.mem * HEADROOM)
        if not cands:
            continue
        gen = (n_gen // e.tp) * per_engine
        train = n_train * r.gpu.tflops * 1e12 * TRAIN_MFU * cands[0][0] * r.resp_frac
        par, setup = cands[0][1], cands[0][2]
        feas = check_feasible(r.model, par, r.gpus, r.mem, r.seq_len, train=setup, engine=e, train_gpus=n_train,
                              gpus_per_node=r.gpus_per_node)  # fmt: skip
        alts = [(rate / cands[0][0], p, t, n_train) for rate, p, t in cands[1:6]]
        plan = _finish(r, Plan(r.model, r.gpu, r.gpus, r.mem, r.seq_len, r.prompt_len, "disaggregated", n_train,
                               par, setup, e, n_gen // e.tp, feas, gen, train, batch, alts))  # fmt: skip
        plans.append(plan)
    best = _first_valid(plans)
    if best is None:
        raise PlanError(_no_fit_message(r))
    return best  # with config_error set when no fitting layout validates (e.g. it needs optimizer offload)


def _space_shared(r: Request) -> Plan | None:
    """Every GPU holds a trainer rank and a resident tp=1 engine; choose the engine's memory fraction."""
    plans = []
    for frac20 in range(17, 5, -1):  # mem_fraction 0.85 .. 0.30 in steps of 0.05
        e = EngineSetup(tp=1, mem_fraction=frac20 / 20, min_seqs=r.min_seqs)
        em = engine_memory(r.model, e, r.seq_len, r.mem)
        if em["weights"] + em["kv_min"] > em["reserved"]:
            continue
        cands = best_trainers(r, r.gpus, r.mem * HEADROOM - em["reserved"] - em["runtime"])
        if not cands:
            continue
        per_engine, batch = decode_tokens_per_s(r.model, e, r.gpu, r.mem, r.prompt_len, r.resp)
        train = r.gpus * r.gpu.tflops * 1e12 * TRAIN_MFU * cands[0][0] * r.resp_frac
        par, setup = cands[0][1], cands[0][2]
        feas = check_feasible(r.model, par, r.gpus, r.mem, r.seq_len, train=setup, engine=e, placement="space-shared")
        alts = [(rate / cands[0][0], p, t, r.gpus) for rate, p, t in cands[1:6]]
        plan = _finish(r, Plan(r.model, r.gpu, r.gpus, r.mem, r.seq_len, r.prompt_len, "space-shared", r.gpus,
                               par, setup, e, r.gpus, feas, r.gpus * per_engine, train, batch, alts))  # fmt: skip
        plans.append(plan)
    return _first_valid(plans)


def _time_shared(r: Request) -> Plan | None:
    """Engines of tp GPUs on the trainer's GPUs, memory released while training; the trainer stays resident, so
    the engine's mem_fraction is what the resident states leave."""
    plans = []
    for tp in _engine_tps(r):
        if r.gpus % tp:
            continue
        cands = best_trainers(r, r.gpus, r.mem * HEADROOM - ENGINE_RELEASED_GB)
        for rate, par, setup in cands[:12]:
            tr = max((train_memory(r.model, par, r.seq_len, setup, s) for s in ("first", "last")),
                     key=lambda d: d["total"])  # fmt: skip
            states = tr["weights"] + tr["grads"] + tr["optimizer"] + RUNTIME_GB
            frac = math.floor((r.mem * HEADROOM - states - ENGINE_RUNTIME_GB) / r.mem * 20) / 20
            frac = min(frac, 0.85)
            e = EngineSetup(tp=tp, mem_fraction=frac, min_seqs=r.min_seqs)
            em = engine_memory(r.model, e, r.seq_len, r.mem)
            if frac <= 0 or em["weights"] + em["kv_min"] > em["reserved"]:
                continue
            per_engine, batch = decode_tokens_per_s(r.model, e, r.gpu, r.mem, r.prompt_len, r.resp)
            train = r.gpus * r.gpu.tflops * 1e12 * TRAIN_MFU * rate * r.resp_frac
            feas = check_feasible(r.model, par, r.gpus, r.mem, r.seq_len, train=setup, engine=e,
                                  placement="time-shared", gpus_per_node=r.gpus_per_node)  # fmt: skip
            plan = _finish(r, Plan(r.model, r.gpu, r.gpus, r.mem, r.seq_len, r.prompt_len, "time-shared", r.gpus,
                                   par, setup, e, r.gpus // tp, feas, (r.gpus // tp) * per_engine, train, batch))  # fmt: skip
            plans.append(plan)
    return _first_valid(plans)


def config_error(plan: Plan) -> str:
    """Why the plan cannot be written as a config that validates ('' when it can)."""
    try:
        validated_config(plan)
    except Exception as e:  # ConfigError / PlanError: the message is what the user needs
        return str(e)
    return ""


def _no_fit_message(r: Request) -> str:
    m = r.model
    states = m.total_params * 16 / GiB
    hint = "" if r.allow_offload else " (optimizer CPU offload not considered)"
    return (
        f"{m.name} ({m.total_params / 1e9:.1f}B params, ~{states:.0f} GiB of weights, fp32 gradients and Adam state "
        f"in all) does not fit on {r.gpus} x {r.mem:g} GiB GPUs at seq_len {r.seq_len} with any layout{hint}: "
        "use more GPUs, a shorter --seq-len, or GPUs with more memory."
    )
