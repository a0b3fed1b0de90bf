"""Torch trainer backend: a Hugging Face causal LM, FSDP2 (`fully_shard`) on several ranks, plain on one.

Contract (pipeline/contracts/backend.py): per-token log-probs at `rollout.temperature` from the fused output layer
(engines/logprobs.py: no tokens x vocabulary logits tensor), backward on the algorithm's loss shares,
gradients summed over micro-batches and DP ranks, AdamW with constant LR after linear warm-up
(engines/schedule.py), global-norm clipping. Runs on CPU (gloo) and GPU (nccl). The default process group,
when world_size > 1, is initialised by the caller before `build_backend`.

Packing (the default; `FSDPBackend(..., packing=False)` keeps the right-padded (B, T) layout with SDPA): each
micro-batch runs as one row without padding (engines/packing.py: RoPE positions restarting per sequence), its
attention one packed kernel call per layer (engines/attention.py, registered with transformers' AttentionInterface,
the sequence bounds passed through the forward kwargs); the per-token results are mapped back to the (B, T) layout.
Same loss, gradients and update as the padded layout (tests/test_fsdp_packing.py).

Mixed precision (`model.dtype = bfloat16`): the parameters the optimizer steps (master weights), their gradients and
the AdamW state are float32; forward and backward compute in bfloat16.
- world_size > 1: FSDP2 with `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the all-gathered
  parameters are bf16 casts of the fp32 shards, gradients are reduce-scattered in fp32 into fp32 shard gradients.
- one rank: the same arithmetic without a process group: a bf16 compute copy of the model runs forward and
  backward; after each micro-batch its gradients are added (in fp32) into the fp32 master's, and after each
  optimizer step the master is cast back into the copy. (FSDP2 over a 1-rank mesh would need a default process
  group, which the one-rank trainer does not have and must not leak into its process.)
With `model.dtype = float32` there is no copy and no policy. `named_hf_weights` yields the master weights cast to
`model.dtype` (the compute dtype: what the engines serve); checkpoints hold the fp32 master and optimizer state.
`trainer.recompute` turns on non-reentrant activation checkpointing of every decoder layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from engines.attention import register_hf_attention
from engines.logprobs import fused_logprobs, token_aligned
from engines.packing import PackedMicroBatch, pack_micro_batch, unpack
from engines.schedule import warmup_factor
from pipeline.contracts.backend import LossFn, MicroBatch
from pipeline.contracts.config import Config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PolicyHead(torch.nn.Module):
    """The root module: the HF base model, then the fused output layer + log-softmax on `lm_head`'s weight (the
    embedding where tied), in one forward. FSDP2 unshards the root's own parameters (embeddings, final norm, head)
    only inside the root's forward, so the head must run there rather than after it."""

    def __init__(self, lm: torch.nn.Module, temperature: float, chunk_tokens: int, entropy_grad: bool):
        super().__init__()
        self.lm = lm
        self.temperature, self.chunk_tokens, self.entropy_grad = temperature, chunk_tokens, entropy_grad

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        with_entropy: bool,
        packed: PackedMicroBatch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Padded (B, T) layout: (B, T) results aligned with input_ids. Packed (`packed` given, input (1, t)):
        per-position results of the row, position i scoring `packed.target[i]` (engines/packing.py unpacks them)."""
        head = dict(
            temperature=self.temperature,
            chunk_tokens=self.chunk_tokens,
            with_entropy=with_entropy,
            entropy_grad=self.entropy_grad,
        )
        if packed is not None:  # the packed attention kernel takes the sequence bounds through the forward kwargs
            out = self.lm.model(
                input_ids=input_ids,
                position_ids=position_ids,
                use_cache=False,
                dapo_cu_seqlens=packed.cu_seqlens,
                dapo_max_seqlen=packed.max_seqlen,
            )
            return fused_logprobs(out.last_hidden_state, self.lm.lm_head.weight, packed.target, **head)
        out = self.lm.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return token_aligned(out.last_hidden_state, input_ids, self.lm.lm_head.weight, **head)  # hidden (B, T, H)


class FSDPBackend:
    def __init__(self, cfg: Config, rank: int, world_size: int, packing: bool = True):
        """`packing=False` runs the right-padded (B, T) layout with transformers' SDPA (the equality tests' and the
        benchmark's baseline) instead of one packed row per micro-batch."""
        self.cfg = cfg
        self.packing = packing
        self.rank = rank
        self.world_size = world_size
        self.dp_rank = rank
        self.dp_size = world_size
        self.is_sync_source = rank == 0
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.compute_dtype = _DTYPES[cfg.model.dtype]
        self.optimizer_steps = 0

    # ------------------------------------------------------------------ set-up
    def setup(self, hf_model_dir: str) -> None:
        model = self._load(hf_model_dir, torch.float32)  # master weights in float32 whatever the compute dtype
        self.model = model  # the fp32 master: the optimizer's parameters, checkpoints and weight syncs read it
        self.compute = self._compute_model(model, hf_model_dir)
        t = self.cfg.trainer
        self.policy = PolicyHead(
            self.compute, self.cfg.rollout.temperature, t.logprob_chunk_tokens, self.cfg.algorithm.entropy_coef != 0
        )
        if self.world_size > 1:
            self._shard(self.policy)
        self._refresh_compute()  # exactly the master rounded, whatever the loader did
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=1e-8
        )
        warmup = t.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: warmup_factor(step, warmup))

    def _load(self, hf_model_dir: str, dtype: torch.dtype) -> torch.nn.Module:
        attn = register_hf_attention() if self.packing else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=dtype, attn_implementation=attn)
        model.to(self.device)
        model.config.use_cache = False
        return model

    def _compute_model(self, master: torch.nn.Module, hf_model_dir: str) -> torch.nn.Module:
        """The module that runs forward/backward: the master itself, or (one rank, bf16) its bf16 copy."""
        compute = master
        if self.world_size == 1 and self.compute_dtype != torch.float32:
            # Loaded again rather than deep-copied: no second fp32 model in memory, even transiently.
            compute = self._load(hf_model_dir, self.compute_dtype)
        if self.cfg.trainer.recompute:
            # transformers >= 5.2x names it activation_checkpointing_enable (the old name warns); older ones do not.
            enable = getattr(compute, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                compute.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return compute

    def _shard(self, policy: PolicyHead) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if self.compute_dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        kw = {"mp_policy": mp} if mp is not None else {}
        for layer in policy.lm.model.layers:
            fully_shard(layer, **kw)
        fully_shard(policy, **kw)  # the root: embeddings, final norm and head

    def _pairs(self) -> Iterator[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """(master, compute copy) parameter pairs (one rank, bf16 only), matched by name."""
        compute = dict(self.compute.named_parameters())
        for name, master in self.model.named_parameters():
            yield master, compute[name]

    def _accumulate_master_grads(self) -> None:
        """One rank, bf16: add the copy's gradients (bf16) into the master's (fp32), then free them."""
        if self.compute is self.model:
            return
        for master, p in self._pairs():
            if p.grad is None:
                continue
            if master.grad is None:
                master.grad = p.grad.to(master.dtype)
            else:
                master.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def _refresh_compute(self) -> None:
        """One rank, bf16: the copy becomes the master rounded to bf16 (after a step or a load)."""
        if self.compute is self.model:
            return
        for master, p in self._pairs():
            p.copy_(master)

    # ------------------------------------------------------------------ compute
    def _forward(self, mb: MicroBatch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packing:
            pk = pack_micro_batch(mb, self.device)
            lp, ent = self.policy(pk.input_ids, None, pk.position_ids, with_entropy, packed=pk)  # (1, t) each
            logprobs, entropy = unpack(pk, lp), (unpack(pk, ent) if ent is not None else None)
        else:
            logprobs, entropy = self.policy(
                input_ids=mb.input_ids.to(self.device),
                attention_mask=mb.attention_mask.to(self.device),
                position_ids=mb.position_ids.to(self.device),
                with_entropy=with_entropy,
            )
        # (B, T) each, aligned with input_ids; entropy detached when algorithm.entropy_coef == 0
        if entropy is None:
            entropy = torch.zeros_like(logprobs)
        return logprobs, entropy

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        self.policy.eval()
        return [self._forward(mb, with_entropy=False)[0].cpu() for mb in micro_batches]

    def train_minibatch(self, micro_batches: list[MicroBatch], loss_fn: LossFn) -> dict[str, float]:
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for mb in micro_batches:
            logprobs, entropy = self._forward(mb, with_entropy=True)
            mb_dev = _to_device(mb, self.device)
            loss, metrics = loss_fn(logprobs, entropy, mb_dev)
            # Data-parallel wrappers average gradients over ranks; the loss shares must be summed (contract).
            (loss * self.dp_size).backward()
            self._accumulate_master_grads()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        if isinstance(grad_norm, torch.distributed.tensor.DTensor):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self._refresh_compute()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer_steps += 1
        result = _reduce_sum(sums, self.world_size)
        result["grad_norm"] = float(grad_norm)
        result["lr"] = float(lr)
        return result

    # ------------------------------------------------------------------ weights and state
    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The master weights cast to the compute dtype (`model.dtype`), under HF names."""
        if self.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = self.compute.state_dict()  # the master itself, or its bf16 copy (= the master rounded): views
        if not self.is_sync_source:
            return
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        for name, tensor in sd.items():
            if tied and name == "lm_head.weight":
                continue  # the engine's tied head follows the embedding
            yield name, tensor.detach().to(self.compute_dtype) if tensor.is_floating_point() else tensor.detach()

    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.save(state, checkpoint_id=os.path.join(path, "dcp"))
        extra = {
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "optimizer_steps": self.optimizer_steps,
        }
        torch.save(extra, os.path.join(path, f"extra_rank{self.rank}.pt"))

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self._refresh_compute()
        extra = torch.load(os.path.join(path, f"extra_rank{self.rank}.pt"), weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        self.optimizer_steps = extra["optimizer_steps"]


def _to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    if device.type == "cpu":
        return mb
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(mb).items()}
    return MicroBatch(**fields)


def _reduce_sum(sums: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    if not sums:
        return {}
    keys = sorted(sums)
    vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys])
    if world_size > 1:
        if dist.get_backend() == "nccl":
            vec = vec.cuda()
        dist.all_reduce(vec)
    return {k: float(v) for k, v in zip(keys, vec.cpu(), strict=True)}


def build_backend(cfg: Config, rank: int, world_size: int, packing: bool = True) -> FSDPBackend:
    return FSDPBackend(cfg, rank, world_size, packing)
