"""Megatron-core trainer backend: TP/PP/CP/DP (EP for MoE) over a GPTModel built from a HF checkpoint.

Contract (pipeline/contracts/backend.py's TrainerBackend), one object per rank:
- `build_backend(cfg, rank, world_size)`; the caller has already initialised torch.distributed's default group
  (env:// or tcp:// rendezvous; gloo on CPU, nccl on GPU) with this rank and world size (a Ray actor per rank, or
  torchrun / mp.spawn in tests). `setup(hf_model_dir)` requires `torch.distributed.is_initialized()`, enables the
  CPU compatibility layer when there is no CUDA, calls `parallel_state.initialize_model_parallel(tp, pp, vpp,
  context_parallel_size=cp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
  order="tp-cp-ep-pp-dp")` (a dense model's expert layout mirrors its dense one, see `expert_layout`; a MoE model
  with pp > 1 needs ep*etp == tp*cp), builds the model chunks (engines/megatron/model.py), streams this rank's HF
  weights in from safetensors (engines/megatron/convert.py),
  wraps the chunks in megatron DDP and builds `get_megatron_optimizer` (AdamW; weight decay on matrices only,
  megatron's convention; distributed optimizer when `trainer.distributed_optimizer`).
- Rank layout: DP is the outermost dimension, `dp_rank = rank // (tp * cp * pp)`, as pipeline/runtime/train.py shards
  the batch; TP/CP/PP peers of one DP replica receive the same micro-batches.
- LR: constant after a linear warm-up, `lr * min(1, (k + 1) / warmup_steps)` at optimizer step k
  (engines/schedule.py, shared with the fsdp backend), applied with each group's `lr_mult`/`wd_mult`.
- Precision: with `model.dtype = bfloat16` the model computes in bf16 and megatron's optimizer keeps fp32 main
  (master) weights, fp32 gradients (`grad_reduce_in_fp32`) and fp32 Adam state (Float16OptimizerWithFloat16Params,
  or the distributed optimizer's fp32 shards); `named_hf_weights` reads the bf16 model weights, i.e. the master
  weights rounded to bf16 after each step.
- `train_minibatch(micro_batches, loss_fn)`: each micro-batch (the trainer groups samples by count, or by token
  budget with `trainer.max_tokens_per_micro_batch`) is packed into one row without padding (THD: sequences back to
  back, `PackedSeqParams(cu_seqlens)`, RoPE positions restarting per sequence, attention within each sequence only;
  the packing helpers are engines/packing.py's; attention via TE when installed, else `model.SDPACoreAttention`:
  one engines/attention.py kernel call per layer). With pp > 1 every pack of the mini-batch is padded to the
  longest one (stages exchange one activation shape) and with sequence parallelism to a multiple of tp; the padding
  is one extra segment that no loss position reads. Then megatron's `get_forward_backward_func()` runs them (no
  pipelining, 1F1B, or interleaved with vpp > 1; with vpp the micro-batch list is padded with empty micro-batches
  to a multiple of pp). On the last stage GPTModel's output layer is bypassed (`bypass_output_layer`: the model
  returns its last hidden states, TP-replicated as the output layer's input would be) and
  `engines.logprobs.fused_logprobs` computes per-token logprobs at `rollout.temperature` and entropies
  from the hidden states and this TP rank's vocabulary slice of the output weight, chunked over tokens (no logits
  tensor), reducing over the TP group; they are unpacked to the (B, T) layout of the MicroBatch before calling
  `loss_fn(logprobs, entropy, mb)`. Gradient = the exact SUM of the loss
  shares over micro-batches and DP ranks: the model runs with `calculate_per_token_loss=True` (megatron then
  neither divides by the number of micro-batches nor averages over DP: DDP's gradient scaling factor is 1) and every
  micro-batch reports 0 tokens, so `finalize_model_grads` skips its 1/num_tokens scaling; no multiply/divide round trip happens. Returns `grad_norm`, `lr`, the loss_fn metric
  shares summed over micro-batches and all-reduced (SUM) over DP, on every rank, and this rank's packing numbers:
  `packed_tokens` (real tokens), `packing_efficiency` (real tokens / positions the model computed; 1.0 unless pp > 1
  or sequence parallelism padded the packs) and `padded_layout_efficiency` (real tokens / B*T of the micro-batches
  as given: what the padded layout would have computed). `MegatronBackend(..., packing=False)` runs the padded
  layout instead (benchmarks/bench_megatron.py's baseline; pp = 1 only).
- `forward_logprobs`: the same forward without grad; the result is broadcast from the last pipeline stage.
- `named_hf_weights()`: `convert.megatron_to_hf_named_tensors` (TP-gathered, HF names). Sources: `is_sync_source`
  ranks (tp = dp = cp rank 0), one per PP stage, `pp_rank` being the stage; each yields its own stage's tensors.
  Every rank must iterate it (TP peers take part in the gathers). Replicated tensors are live views of parameters.
- `save(path)` / `load(path)`: megatron dist_checkpointing (torch_dist format) of model, optimizer (distributed
  optimizer state in megatron's `dp_reshardable` format, so a different DP size can resume; TP/PP must match),
  step counter (the LR schedule is a function of it) and per-(pp, tp) RNG states (DP and CP ranks hold replicas),
  under `path/megatron`.
- MoE: with ep > 1 the ranks of an EP group (different DP ranks) run the same number of micro-batches, padded with
  empty one-token micro-batches (every MoE layer runs all-to-alls across the group). The load-balancing loss enters
  the gradient as `router_aux_loss_coef` x the token-weighted mean of megatron's per-micro-batch aux losses over the
  whole mini-batch (all DP ranks; see `_router_tokens`); padding (the pipeline pad segment, empty micro-batches)
  goes through the router and counts as tokens.
- MoE rollout routing replay (`algorithm.routing_replay = rollout`, engines/megatron/routing.py): a micro-batch's
  `routed_experts` (the engine's top-k per token and layer) replace the routers' top-k in every forward (training,
  `forward_logprobs`, recomputation), gate weights from the trainer's own logits; the load-balancing loss stays on
  the trainer's own top-k. MoE metrics of `train_minibatch`: `rollout/logprob_abs_diff` and `rollout/kl_k3` (mean
  |logprob - old_logprobs| and the k3 KL estimate over the loss tokens: the train-inference mismatch, plus the policy
  change for stale samples) of the training forward; with records also `moe/routing_mismatch` (share of (token, layer)
  pairs whose own top-k set differs from the record; summed over CP/SP ranks and pipeline stages),
  `moe/routing_mismatch_tokens` (tokens with a differing layer; the largest stage's count with pp > 1), and both
  routing modes as `*_replay` / `*_noreplay` (the other mode from one extra no-grad forward per mini-batch,
  `algorithm.routing_mismatch_probe`).
- Context parallelism (cp > 1): each sequence of a pack takes a slot that is a multiple of 2*cp
  (`cu_seqlens_padded`), each CP rank runs its load-balanced share of the row (chunks r and 2*cp-1-r of every slot,
  megatron/TE's THD convention) and the per-token logprobs/entropies are all-gathered over the CP group before the
  loss (engines/megatron/context_parallel.py); megatron sums the gradients over CP and DP. The attention is TE's on
  GPUs (CUDA without TE: setup raises) and `model.SDPACoreAttention`'s on CPU.
- EP > 1 together with PP > 1: megatron then needs ep*etp == tp*cp (checked by `expert_layout`), so tp > 1, and
  MoE with tp > 1 needs sequence parallelism, i.e. TE: built as megatron defines it, never run. bf16
  (`model.dtype`) is meant for GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from engines.logprobs import fused_logprobs, tp_vocab_start
from engines.megatron.context_parallel import cp_gather
from engines.megatron.convert import (
    arch_from_hf,
    chunk_layers,
    hf_to_megatron,
    is_sync_source,
    megatron_to_hf_named_tensors,
)
from engines.megatron.cpu_compat import enable_cpu_compat
from engines.megatron.routing import RoutingReplay
from engines.packing import PackedMicroBatch, pack_micro_batch, packed_length, padded_micro_batch  # noqa: F401
from engines.schedule import warmup_lr
from pipeline.contracts.backend import LossFn, MicroBatch
from pipeline.contracts.config import Config, ParallelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RANK_ORDER = "tp-cp-ep-pp-dp"


# --------------------------------------------------------------------------------------------------- HF weights
class HFWeights:
    """Lazy reader of a HF checkpoint directory: safetensors shards, else transformers' loader."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        self.model_dir = model_dir
        self._where: dict[str, str] = {}
        self._full: dict[str, torch.Tensor] | None = None
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        for f in files:
            with safe_open(os.path.join(model_dir, f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                    self._where[k] = os.path.join(model_dir, f)
        if not files:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
            self._full = {k: v.detach() for k, v in model.state_dict().items()}

    def get(self, name: str) -> torch.Tensor:
        if self._full is not None:
            if name not in self._full:
                raise KeyError(f"model.path: {self.model_dir} has no tensor {name!r}")
            return self._full[name]
        if name not in self._where:
            raise KeyError(f"model.path: {self.model_dir} has no tensor {name!r} in its safetensors files")
        from safetensors import safe_open

        with safe_open(self._where[name], framework="pt") as h:
            return h.get_tensor(name)


def _empty_micro_batch(like: MicroBatch) -> MicroBatch:
    """A one-token micro-batch with no loss tokens (pads the interleaved schedule's micro-batch count, and evens out
    the counts of an EP group's ranks)."""
    z = torch.zeros(1, 1)
    return MicroBatch(
        input_ids=torch.zeros(1, 1, dtype=torch.long),
        attention_mask=torch.ones(1, 1, dtype=torch.long),
        position_ids=torch.zeros(1, 1, dtype=torch.long),
        loss_mask=z.clone(),
        old_logprobs=z.clone(),
        advantages=z.clone(),
        prox_logprobs=z.clone() if like.prox_logprobs is not None else None,
        global_tokens=like.global_tokens,
        global_seqs=like.global_seqs,
        max_new_tokens=like.max_new_tokens,
    )


def _to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    if device.type == "cpu":
        return mb
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(mb).items()}
    return MicroBatch(**fields)


def _mismatch_sums(lp: torch.Tensor, mb: MicroBatch) -> dict[str, torch.Tensor]:
    """Sums over the loss tokens of |trainer - engine logprob| and of the k3 estimate of KL(engine || trainer)
    (r - 1 - log r with r = p_trainer / p_engine on tokens sampled from the engine), and the token count."""
    m = mb.loss_mask.to(lp.dtype)
    d = (lp - mb.old_logprobs.to(lp.dtype)) * m  # log r
    k3 = (torch.exp(d) - 1 - d) * m
    return {"_mm_abs": d.abs().sum().detach(), "_mm_k3": k3.sum().detach(), "_mm_n": m.sum().detach()}


def _mismatch_metrics(sums: dict[str, float], suffix: str) -> dict[str, float]:
    n = max(sums.get("_mm_n", 0.0), 1.0)
    return {f"rollout/logprob_abs_diff{suffix}": sums.get("_mm_abs", 0.0) / n,
            f"rollout/kl_k3{suffix}": sums.get("_mm_k3", 0.0) / n}  # fmt: skip


def _routing_metrics(metrics: dict[str, float], suffix: str) -> dict[str, float]:
    """Pops the raw sums out of `metrics`; the training forward's mismatch under its own name and suffixed."""
    raw = {k: metrics.pop(k) for k in [k for k in metrics if k.startswith("_")]}
    out = _mismatch_metrics(raw, "")
    if suffix:
        out.update({k + suffix: v for k, v in out.items()})
    if "_routes" in raw:  # with routing records
        out["moe/routing_mismatch"] = raw["_routes_flipped"] / max(raw["_routes"], 1.0)
        out["moe/routing_mismatch_tokens"] = raw["_route_tokens_flipped"] / max(raw["_route_tokens"], 1.0)
    return out


# --------------------------------------------------------------------------------------------------- backend
class MegatronBackend:
    def __init__(self, cfg: Config, rank: int, world_size: int, packing: bool = True):
        """`packing=False` runs the padded (B, T) layout instead of THD packing: the benchmark's baseline (pp=1
        only, as pipeline stages need one activation shape)."""
        p = cfg.trainer.parallel
        if not packing and p.pp > 1:
            raise ValueError("the padded layout (packing=False) needs trainer.parallel.pp = 1")
        self.packing = packing
        dp = p.dp or world_size // (p.tp * p.pp * p.cp)
        if p.tp * p.pp * p.cp * dp != world_size:
            raise ValueError(f"trainer.parallel: tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{dp} != world size {world_size}")
        if p.cp > 1 and not packing:
            raise ValueError("the padded layout (packing=False) needs trainer.parallel.cp = 1")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.dp_size = dp
        self.dp_rank = rank // (p.tp * p.cp * p.pp)
        self.tp_rank = rank % p.tp
        self.pp_rank = (rank // (p.tp * p.cp)) % p.pp
        self.cp_rank = (rank // p.tp) % p.cp
        self.is_sync_source = self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0
        self.optimizer_steps = 0
        self._counting = False  # the training forward counts routing mismatches, other forwards do not
        self.device = torch.device("cpu")
        if torch.cuda.is_available():  # torchrun: one GPU per local rank; a Ray actor sees only its own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())

    # ------------------------------------------------------------------ set-up
    def setup(self, hf_model_dir: str) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        from transformers import AutoConfig

        from engines.megatron.model import BuildOptions, build_model, te_available

        enable_cpu_compat()
        if not dist.is_initialized():
            raise RuntimeError(
                "the megatron backend needs torch.distributed initialised by the caller "
                "(init_process_group with this rank and world size) before setup()"
            )
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"torch.distributed has rank {dist.get_rank()}/{dist.get_world_size()}, "
                f"the backend was built for {self.rank}/{self.world_size}"
            )
        if self.cfg.trainer.parallel.cp > 1 and torch.cuda.is_available() and not te_available():
            raise ValueError(
                f"trainer.parallel.cp = {self.cfg.trainer.parallel.cp}: context parallelism on GPUs needs "
                "transformer-engine's attention (model.SDPACoreAttention runs it on CPU only)"
            )
        hf_config = AutoConfig.from_pretrained(hf_model_dir)
        p = expert_layout(self.cfg.trainer.parallel, arch_from_hf(hf_config).num_experts > 0)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
            context_parallel_size=p.cp,
            expert_model_parallel_size=p.ep,
            expert_tensor_parallel_size=p.etp,
            order=RANK_ORDER,
        )
        assert ps.get_data_parallel_rank() == self.dp_rank and ps.get_tensor_model_parallel_rank() == self.tp_rank
        assert ps.get_pipeline_model_parallel_rank() == self.pp_rank
        assert ps.get_context_parallel_rank() == self.cp_rank
        model_parallel_cuda_manual_seed(self.cfg.trainer.seed)

        self.use_te = te_available() and torch.cuda.is_available()
        opts = BuildOptions(
            dtype=_DTYPES[self.cfg.model.dtype], recompute=self.cfg.trainer.recompute, use_te=self.use_te
        )
        chunks, self.tconfig, self.arch = build_model(hf_config, p, opts)
        self._aux_coeff = float(self.tconfig.moe_aux_loss_coeff or 0.0)
        self._load_hf(chunks, HFWeights(hf_model_dir))
        for chunk in chunks:
            if chunk.post_process:
                bypass_output_layer(chunk)
        self.chunks = self._wrap_ddp(chunks)
        self.optimizer = self._build_optimizer()
        # MoE: routers hooked for rollout routing replay and the routing-mismatch statistics (engines/megatron/
        # routing.py); used only when a micro-batch carries records.
        self.replay = RoutingReplay(self.chunks, self.tconfig) if self.arch.num_experts else None
        self.replay_on = self.cfg.algorithm.routing_replay == "rollout"
        bypass = self.tconfig.moe_router_fusion or self.tconfig.moe_router_load_balancing_type == "sinkhorn"
        if self.replay is not None and bypass:  # these routings never call the top-k hook: replay would be silent
            raise ValueError("algorithm.routing_replay: megatron's fused or sinkhorn routing bypasses its top-k hook")
        if self.replay is not None:
            self.replay.apply = self.replay_on

    def _load_hf(self, chunks: list[torch.nn.Module], weights: HFWeights) -> None:
        from megatron.core import parallel_state as ps

        p = self.cfg.trainer.parallel
        for v, chunk in enumerate(chunks):
            layers = chunk_layers(self.arch, p.pp, p.vpp, self.pp_rank, v)
            if len(chunk.decoder.layers) and chunk.decoder.layers[0].layer_number - 1 != layers.start:
                raise RuntimeError(
                    f"layer offset mismatch: megatron {chunk.decoder.layers[0].layer_number - 1}, ours {layers.start}"
                )
            sd = hf_to_megatron(
                weights.get, self.arch, tp_rank=self.tp_rank, tp=p.tp, pp_rank=self.pp_rank, pp=p.pp, vp_stage=v,
                vpp=p.vpp, ep_rank=ps.get_expert_model_parallel_rank(), ep=p.ep, te=self.use_te,
            )  # fmt: skip
            missing, unexpected = chunk.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise RuntimeError(f"HF -> megatron load: missing {missing}, unexpected {unexpected}")

    def _wrap_ddp(self, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.cfg.trainer.distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        wrapped = [
            DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=c, disable_bucketing=v > 0)
            for v, c in enumerate(chunks)
        ]
        for w in wrapped:
            w.broadcast_params()
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        return wrapped

    def _build_optimizer(self) -> Any:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t = self.cfg.trainer
        dtype = _DTYPES[self.cfg.model.dtype]
        config = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.lr,
            weight_decay=t.weight_decay,
            adam_beta1=float(t.betas[0]),
            adam_beta2=float(t.betas[1]),
            adam_eps=1e-8,
            clip_grad=t.grad_clip,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=t.distributed_optimizer,
        )
        return get_megatron_optimizer(config, self.chunks)

    # ------------------------------------------------------------------ schedule
    def current_lr(self) -> float:
        t = self.cfg.trainer
        return warmup_lr(t.lr, self.optimizer_steps, t.warmup_steps)

    def _apply_schedule(self) -> float:
        lr, wd = self.current_lr(), self.cfg.trainer.weight_decay
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = wd * g.get("wd_mult", 1.0)
        return lr

    # ------------------------------------------------------------------ compute
    def _logprobs(self, packed: PackedMicroBatch, hidden: torch.Tensor, weight: torch.Tensor, with_entropy: bool):
        """(B, T) logprobs and entropies (or None) from the packed last hidden states (b, s, h) and this TP rank's
        vocabulary slice of the output weight."""
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        lp, ent = fused_logprobs(
            hidden,
            weight,
            packed.target,
            temperature=self.cfg.rollout.temperature,
            chunk_tokens=self.cfg.trainer.logprob_chunk_tokens,
            with_entropy=with_entropy,
            entropy_grad=self.cfg.algorithm.entropy_coef != 0,
            vocab_start=tp_vocab_start(weight, group),
            vocab_size=self.arch.vocab_size,
            group=group,
        )
        if packed.cp_indices is not None:  # this CP rank's share -> the whole row (see context_parallel.py)
            group = ps.get_context_parallel_group()
            lp = cp_gather(lp, packed.cp_indices, packed.total_len, group)
            ent = cp_gather(ent, packed.cp_indices, packed.total_len, group) if ent is not None else None
        lp = torch.where(packed.valid, lp.reshape(-1)[packed.gather_idx], 0.0)
        if ent is not None:
            ent = torch.where(packed.valid, ent.reshape(-1)[packed.gather_idx], 0.0)
        return lp, ent

    def _forward_step(self, loss_fn: LossFn | None, data_iterator: Iterator[PackedMicroBatch], model: Any):
        packed = next(data_iterator)
        psp = _packed_seq_params(packed) if packed.cu_seqlens is not None else None
        if self.replay is not None:
            self.replay.set_current(packed.routed_experts, stats=self._counting)
        hidden = model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None, packed_seq_params=psp
        )  # last stage: (b, s, h) hidden states (the output layer is bypassed); other stages: activations
        if self.replay is not None:
            self.replay.end_forward()
        return hidden, partial(self._loss, loss_fn, packed, model)

    def _loss(self, loss_fn: LossFn | None, packed: PackedMicroBatch, model: Any, hidden: torch.Tensor):
        """Megatron's loss_func: (loss share, 0 tokens, reported dict); see the module docstring for the 0."""
        weight = output_weight(model)
        no_tokens = torch.zeros((), dtype=torch.int, device=hidden.device)
        if loss_fn is None:  # forward_logprobs
            lp, _ = self._logprobs(packed, hidden, weight, with_entropy=False)
            return hidden.new_zeros(()), no_tokens, {"logprobs": lp.detach()}
        lp, ent = self._logprobs(packed, hidden, weight, with_entropy=True)
        mb = _to_device(packed.mb, hidden.device)
        loss, metrics = loss_fn(lp, ent, mb)
        out = {k: v.detach().float() for k, v in metrics.items()}
        if self.replay is not None:  # MoE: the train-inference logprob mismatch (engine_logprobs = old_logprobs)
            out.update(_mismatch_sums(lp.detach(), mb))
        return loss, no_tokens, out

    def _run(
        self, micro_batches: list[MicroBatch], loss_fn: LossFn | None
    ) -> tuple[list[dict], list[PackedMicroBatch]]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        p = self.cfg.trainer.parallel
        mbs = list(micro_batches)
        if p.ep > 1:
            # Every MoE layer's forward and backward runs all-to-alls across the EP group, whose ranks are different
            # DP ranks: they must run the same number of micro-batches (a token budget can give them different ones).
            mbs += [_empty_micro_batch(mbs[0]) for _ in range(self._max_count_over_ep(len(mbs)) - len(mbs))]
        if p.vpp > 1 and len(mbs) % p.pp:
            mbs += [_empty_micro_batch(mbs[0]) for _ in range(p.pp - len(mbs) % p.pp)]
        # Pipeline stages exchange activations of one fixed shape: pad every pack to the longest one (megatron's
        # variable_seq_lengths shape exchange broke the interleaved schedule at pp=2 on gloo).
        pad_to = max(packed_length(mb, p.cp) for mb in mbs) if p.pp > 1 else 0
        # Sequence parallelism splits each CP rank's share of the row over tp.
        align = p.tp * p.cp if self.tconfig.sequence_parallel else 1
        if self.packing:
            packed = [pack_micro_batch(mb, self.device, pad_to, align, p.cp, self.cp_rank) for mb in mbs]
        else:
            packed = [padded_micro_batch(mb, self.device) for mb in mbs]
        if self.arch.num_experts and loss_fn is not None:
            self.tconfig.moe_aux_loss_coeff = self._aux_coeff / self._router_tokens(packed)
        iters: Any = [iter(packed) for _ in self.chunks] if len(self.chunks) > 1 else iter(packed)
        recompute = self.cfg.trainer.recompute and loss_fn is not None
        with self.replay.installed(fifo=recompute) if self.replay is not None else contextlib.nullcontext():
            out = get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, loss_fn),
                data_iterator=iters,
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=len(packed),
                seq_length=max(pk.total_len // pk.input_ids.shape[0] for pk in packed),  # megatron divides it by cp
                micro_batch_size=packed[0].input_ids.shape[0],
                forward_only=loss_fn is None,
            )
        return out, packed[: len(micro_batches)]

    def _max_count_over_ep(self, n: int) -> int:
        from megatron.core import parallel_state as ps

        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_expert_model_parallel_group())
        return int(t.item())

    def _router_tokens(self, packed: list[PackedMicroBatch]) -> float:
        """Tokens the routers of this DP replica's rank see in the mini-batch, summed over DP. Under
        calculate_per_token_loss megatron multiplies each micro-batch's load-balancing loss by the tokens its router
        saw (expecting a later division by the token count, which this backend skips): dividing the coefficient by
        this sum makes the aux term coeff x the token-weighted mean of the per-micro-batch losses of the whole
        mini-batch, whatever the micro-batch sizes and their split over DP ranks."""
        from megatron.core import parallel_state as ps

        per_rank = self.tconfig.tensor_model_parallel_size if self.tconfig.sequence_parallel else 1
        n = torch.tensor([sum(pk.input_ids.numel() for pk in packed) / per_rank], dtype=torch.float64)
        if self.dp_size > 1:
            n = n.to(self.device)
            dist.all_reduce(n, group=ps.get_data_parallel_group())
        return float(n.item())

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        from megatron.core import parallel_state as ps

        enable_cpu_compat()
        for c in self.chunks:
            c.eval()
        out, _ = self._run(micro_batches, None)
        result = []
        for i, mb in enumerate(micro_batches):
            lp = out[i]["logprobs"] if out else torch.zeros(mb.input_ids.shape, device=self.device)
            result.append(self._from_last_stage(lp.float().contiguous(), ps).cpu())
        return result

    def _forward_routing(self, micro_batches: list[MicroBatch], replay: bool) -> list[torch.Tensor]:
        """forward_logprobs with the records replayed or not (`algorithm.routing_replay` is the default)."""
        saved = self.replay_on
        self.replay_on = replay
        self.replay.apply = replay
        try:
            return self.forward_logprobs(micro_batches)
        finally:
            self.replay_on = saved
            self.replay.apply = saved

    def _any_recorded(self, micro_batches: list[MicroBatch]) -> bool:
        """Whether any rank's micro-batches carry routing records (one answer for all ranks: the metrics and the
        probe's forward are collective)."""
        if self.replay is None:
            return False
        flag = torch.tensor([float(any(mb.routed_experts is not None for mb in micro_batches))], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _routing_stats(self) -> dict[str, float]:
        """This DP replica's routing-mismatch counts: (token, layer) pairs summed over the ranks that route different
        tokens (CP ranks; TP ranks under sequence parallelism) and over pipeline stages (different layers); tokens
        summed over the token-splitting ranks, their flipped count the largest over stages (a lower bound of the
        any-layer count, which would need the per-token sets of every stage)."""
        from megatron.core import parallel_state as ps

        stats = torch.tensor(self.replay.take_stats(), dtype=torch.float64, device=self.device)
        if self.cfg.trainer.parallel.cp > 1:
            dist.all_reduce(stats, group=ps.get_context_parallel_group())
        if self.tconfig.sequence_parallel:
            dist.all_reduce(stats, group=ps.get_tensor_model_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            group = ps.get_pipeline_model_parallel_group()
            pairs, tokens = stats[:2].clone(), stats[2:].clone()
            dist.all_reduce(pairs, group=group)
            dist.all_reduce(tokens, op=dist.ReduceOp.MAX, group=group)
            stats = torch.cat([pairs, tokens])
        keys = ("_routes", "_routes_flipped", "_route_tokens", "_route_tokens_flipped")
        return dict(zip(keys, stats.tolist(), strict=True))

    def _mismatch_probe(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """Logprob mismatch of the other routing mode than the training forward's (one no-grad forward)."""
        replay = not self.replay_on
        lps = self._forward_routing(micro_batches, replay)
        sums: dict[str, float] = dict.fromkeys(("_mm_abs", "_mm_k3", "_mm_n"), 0.0)
        for lp, mb in zip(lps, micro_batches, strict=True):
            for k, v in _mismatch_sums(lp.to(self.device), _to_device(mb, self.device)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        sums = self._reduce_metrics(sums)
        return _mismatch_metrics(sums, "_replay" if replay else "_noreplay")

    def train_minibatch(self, micro_batches: list[MicroBatch], loss_fn: LossFn) -> dict[str, float]:
        enable_cpu_compat()
        recorded = self._any_recorded(micro_batches)
        probe: dict[str, float] = {}
        if recorded and self.cfg.algorithm.routing_mismatch_probe:
            probe = self._mismatch_probe(micro_batches)
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self._apply_schedule()
        if self.replay is not None:
            self.replay.apply = self.replay_on
            self.replay.take_stats()
        self._counting = True
        try:
            out, packed = self._run(micro_batches, loss_fn)
        finally:
            self._counting = False
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("megatron optimizer step failed (non-finite gradients)")
        self.optimizer_steps += 1
        # every rank reports the same keys (the DP reduction sums one vector), whatever its micro-batches carried
        moe = self.replay is not None
        sums: dict[str, float] = dict.fromkeys(("_mm_abs", "_mm_k3", "_mm_n"), 0.0) if moe else {}
        for d in out[: len(micro_batches)]:
            for k, v in d.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if recorded:
            sums.update(self._routing_stats())
        metrics = self._reduce_metrics(sums)
        if moe:
            suffix = ("_replay" if self.replay_on else "_noreplay") if recorded else ""
            metrics.update(_routing_metrics(metrics, suffix))
            metrics.update(probe)
        real = sum(pk.real_tokens for pk in packed)
        padded = sum(pk.mb.input_ids.numel() for pk in packed)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["lr"] = lr
        metrics["packed_tokens"] = float(real)
        metrics["packing_efficiency"] = real / max(sum(pk.total_len for pk in packed), 1)
        metrics["padded_layout_efficiency"] = real / max(padded, 1)
        return metrics

    # ------------------------------------------------------------------ metric plumbing
    def _from_last_stage(self, t: torch.Tensor, ps: Any) -> torch.Tensor:
        """Broadcast a tensor of known shape from the last pipeline stage to the other stages."""
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return t
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return t

    def _reduce_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Last stage: SUM over DP; then every pipeline stage receives the result."""
        from megatron.core import parallel_state as ps

        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        keys = sorted(sums)
        if last and keys and self.dp_size > 1:
            vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(vec, group=ps.get_data_parallel_group())
            sums = dict(zip(keys, vec.tolist(), strict=True))
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return sums
        payload = json.dumps(sums if last else {}).encode()
        n = self._from_last_stage(torch.tensor([len(payload)], dtype=torch.int64, device=self.device), ps)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=self.device)
        if last:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        buf = self._from_last_stage(buf, ps)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    # ------------------------------------------------------------------ weights and state
    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        enable_cpu_compat()
        assert is_sync_source() == self.is_sync_source
        yield from megatron_to_hf_named_tensors(self.chunks, self.arch, te=self.use_te)

    def _sharded_state(self, is_loading: bool) -> dict[str, Any]:
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        metadata = {"distrib_optim_sharding_type": "dp_reshardable", "chained_optim_avoid_prefix": True}
        state: dict[str, Any] = {}
        for v, c in enumerate(self.chunks):
            state["model" if len(self.chunks) == 1 else f"model{v}"] = c.module.sharded_state_dict(metadata=metadata)
        model_sd = state if len(self.chunks) > 1 else state["model"]
        state["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
        pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
        rng = {"cpu": torch.get_rng_state(), "tracker": _tracker_states()}
        state["rng_state"] = ShardedObject(
            "rng_state", rng, (pp, tp), (self.pp_rank, self.tp_rank),
            replica_id=self.dp_rank * self.cfg.trainer.parallel.cp + self.cp_rank,  # CP ranks share the RNG seeds
        )  # fmt: skip
        state["optimizer_steps"] = self.optimizer_steps
        return state

    def _materialise_optimizer_state(self) -> None:
        """Give a fresh optimizer its Adam state (step 1, zero moments) with a zero-gradient, lr=0, wd=0 step, which
        leaves the parameters unchanged: megatron's distributed-optimizer state_dict (needed to build the loading
        template) requires a step count, and torch's AdamW only creates one at its first step."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is None or any(len(st) for st in inner.state.values()):
                continue
            saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
            for g in inner.param_groups:
                g["lr"], g["weight_decay"] = 0.0, 0.0
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            inner.step()
            for g, (lr, wd) in zip(inner.param_groups, saved, strict=True):
                g["lr"], g["weight_decay"] = lr, wd
            inner.zero_grad(set_to_none=True)

    def _unshare_adam_steps(self) -> None:
        """megatron's loader gives every torch-AdamW state the same `step` tensor object; torch increments each
        state's step in place, so a shared one would advance once per parameter per step. Give each its own copy."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            for st in inner.state.values() if inner is not None else ():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].clone()

    def save(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        enable_cpu_compat()
        _shim_psutil_memory_log()
        target = os.path.join(path, "megatron")
        if self.rank == 0:
            os.makedirs(target, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state(is_loading=False), target)
        dist.barrier()

    def load(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        enable_cpu_compat()
        self._materialise_optimizer_state()
        state = dist_checkpointing.load(self._sharded_state(is_loading=True), os.path.join(path, "megatron"))
        for v, c in enumerate(self.chunks):
            c.module.load_state_dict(state["model" if len(self.chunks) == 1 else f"model{v}"])
        with torch.no_grad():  # megatron's dp_reshardable loader copies into leaf parameters without no_grad
            self.optimizer.load_state_dict(state["optimizer"])
        self._unshare_adam_steps()
        rng = state["rng_state"]
        torch.set_rng_state(rng["cpu"])
        _set_tracker_states(rng["tracker"])
        self.optimizer_steps = int(state["optimizer_steps"])


def expert_layout(p: ParallelConfig, moe: bool) -> ParallelConfig:
    """The parallel layout megatron is initialised with. Megatron builds expert groups (etp x ep x expert-dp per
    stage) even for a dense model, and under our DP-outermost rank order with pp > 1 it requires the expert
    data-parallel size to equal dp, i.e. ep * etp == tp * cp. A dense model has no expert parameters, so its
    expert layout mirrors the dense one (etp = tp * cp); a MoE model must be configured that way."""
    if not moe:
        return replace(p, etp=p.tp * p.cp)
    if p.pp > 1 and p.ep * p.etp != p.tp * p.cp:
        raise ValueError(
            f"trainer.parallel.etp: with pp > 1 megatron needs ep*etp == tp*cp (rank order {RANK_ORDER}); "
            f"got ep*etp = {p.ep}*{p.etp}, tp*cp = {p.tp}*{p.cp}"
        )
    return p


def _shim_psutil_memory_log() -> None:
    """megatron's torch_dist writer logs process memory with psutil and raises when psutil is missing; it is only
    a log line, so without psutil report 0 bytes instead (install psutil to get the real numbers)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        filesystem_async._process_memory = lambda: 0


def bypass_output_layer(gpt: Any) -> None:
    """Make a last-stage GPTModel return its final hidden states ([b, s, h] after GPTModel's transpose) instead of
    logits: its output layer only does what a ColumnParallelLinear does to its input, i.e. makes the hidden states
    TP-replicated with a backward that sums (all-reduces) their gradient over the TP group exactly once (all-gather /
    reduce-scatter under sequence parallelism). The layer keeps its weight (state dict, checkpoints, the DDP
    gradient buffers); `output_weight` hands it to the fused logprob head."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    layer = gpt.output_layer

    def forward(hidden_states: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None) -> tuple:
        if layer.sequence_parallel:
            return gather_from_sequence_parallel_region(hidden_states), None
        return copy_to_tensor_model_parallel_region(hidden_states), None

    layer.forward = forward


def output_weight(model: Any) -> torch.Tensor:
    """The output-layer weight (V/tp, H) of a last-stage chunk (DDP-wrapped or not): the shared embedding when tied."""
    gpt = model
    while hasattr(gpt, "module"):
        gpt = gpt.module
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _packed_seq_params(packed: PackedMicroBatch) -> Any:
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=packed.cu_seqlens,
        cu_seqlens_kv=packed.cu_seqlens,
        cu_seqlens_q_padded=packed.cu_seqlens_padded,
        cu_seqlens_kv_padded=packed.cu_seqlens_padded,
        max_seqlen_q=packed.max_seqlen,
        max_seqlen_kv=packed.max_seqlen,
    )


def _tracker_states() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker().get_states()


def _set_tracker_states(states: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(states)


def build_backend(cfg: Config, rank: int, world_size: int) -> MegatronBackend:
    """One trainer rank (see the module docstring); torch.distributed must already be initialised."""
    return MegatronBackend(cfg, rank, world_size)
