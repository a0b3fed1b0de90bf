"""Torch trainer backend: a Hugging Face causal LM, plain on one rank, FSDP2 (`fully_shard`) on several.

Contract (pipeline/backend.py): per-token log-probs from full-vocabulary logits, backward on the algorithm's
loss shares, gradients summed over micro-batches and DP ranks, AdamW with constant LR after linear warm-up,
global-norm clipping. Runs on CPU (gloo) and GPU (nccl). The default process group, when world_size > 1, is
initialised by the caller before `build_backend`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from pipeline.algorithm.losses import logprobs_from_logits, token_entropy_from_logits
from pipeline.backend import LossFn, MicroBatch
from pipeline.config import Config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class FSDPBackend:
    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.dp_rank = rank
        self.dp_size = world_size
        self.is_sync_source = rank == 0
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.optimizer_steps = 0

    # ------------------------------------------------------------------ set-up
    def setup(self, hf_model_dir: str) -> None:
        dtype = _DTYPES[self.cfg.model.dtype]
        model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=dtype, attn_implementation="sdpa")
        model.to(self.device)
        model.config.use_cache = False
        if self.world_size > 1:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        self.model = model
        t = self.cfg.trainer
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=1e-8
        )
        warmup = max(t.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )

    # ------------------------------------------------------------------ compute
    def _forward(self, mb: MicroBatch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids = mb.input_ids.to(self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=mb.attention_mask.to(self.device),
            position_ids=mb.position_ids.to(self.device),
            use_cache=False,
        )
        # (B, T-1, V): position t predicts token t+1. The engines report logprobs of softmax(logits / T) (SGLang's
        # default), so the trainer scores at the same temperature for the ratio to be 1 on-policy.
        logits = out.logits[:, :-1].float() / self.cfg.rollout.temperature
        lp = logprobs_from_logits(logits, ids[:, 1:])  # (B, T-1)
        pad = lp.new_zeros(lp.shape[0], 1)
        logprobs = torch.cat([pad, lp], dim=1)  # (B, T), aligned with input_ids
        if with_entropy:
            ent = token_entropy_from_logits(logits)
            if self.cfg.algorithm.entropy_coef == 0:
                ent = ent.detach()
            entropy = torch.cat([pad, ent], dim=1)
        else:
            entropy = torch.zeros_like(logprobs)
        return logprobs, entropy

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        self.model.eval()
        return [self._forward(mb, with_entropy=False)[0].cpu() for mb in micro_batches]

    def train_minibatch(self, micro_batches: list[MicroBatch], loss_fn: LossFn) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for mb in micro_batches:
            logprobs, entropy = self._forward(mb, with_entropy=True)
            mb_dev = _to_device(mb, self.device)
            loss, metrics = loss_fn(logprobs, entropy, mb_dev)
            # Data-parallel wrappers average gradients over ranks; the loss shares must be summed (contract).
            (loss * self.dp_size).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        if isinstance(grad_norm, torch.distributed.tensor.DTensor):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer_steps += 1
        result = _reduce_sum(sums, self.world_size)
        result["grad_norm"] = float(grad_norm)
        result["lr"] = float(lr)
        return result

    # ------------------------------------------------------------------ weights and state
    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = self.model.state_dict()
        if not self.is_sync_source:
            return
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        for name, tensor in sd.items():
            if tied and name == "lm_head.weight":
                continue  # the engine's tied head follows the embedding
            yield name, tensor.detach()

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
        extra = torch.load(os.path.join(path, f"extra_rank{self.rank}.pt"), weights_only=False)
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


def build_backend(cfg: Config, rank: int, world_size: int) -> FSDPBackend:
    return FSDPBackend(cfg, rank, world_size)
