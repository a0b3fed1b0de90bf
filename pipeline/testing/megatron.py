"""Test support for the megatron (and FSDP) tests and benchmarks: tiny HF checkpoints, configs, micro-batches.

Contract:
- `save_tiny_hf(path, model_type=..., vocab_size=..., tie=..., seed=..., **config)` writes a tiny random HF causal
  LM (safetensors + config.json; `config` overrides HF config fields) with non-trivial biases and norm weights, and
  returns the model (float32, eval).
- `tiny_config(tp, pp, dp, vpp=1, cp=1, **trainer)` returns a `Config` for the megatron backend (dropout is always 0).
- `assert_same_update(before, after, ref_before, ref_after, lr)` asserts that one Adam step moved every HF tensor
  as in the reference run.
- `random_micro_batches(...)` builds right-padded MicroBatches with variable lengths, advantages and behaviour
  logprobs, deterministic in a seed.
Multi-process gloo runs (`spawn`, `init_dist`) are product code: engines/megatron/launch.py.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import Config
from pipeline.contracts.backend import MicroBatch

_EXTRA: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 24},
    "qwen3_moe": {
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "router_aux_loss_coef": 0.0,
        "norm_topk_prob": True,
    },  # fmt: skip
}


def save_tiny_hf(
    path: str,
    model_type: str = "qwen2",
    vocab_size: int = 200,
    tie: bool = True,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    **config: Any,
) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        initializer_range=0.1,  # logits of order 1, so that a 1e-4 comparison means something
        **{**_EXTRA.get(model_type, {}), **config},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.3)
                elif "norm" in name:
                    p.uniform_(0.6, 1.4)
    model.save_pretrained(path, safe_serialization=True)
    return model


def tiny_config(tp: int = 1, pp: int = 1, dp: int = 1, vpp: int = 1, cp: int = 1, **trainer: Any) -> Config:
    cfg = Config()
    cfg.data.train_path = "synthetic:arith"
    t = cfg.trainer
    t.backend = "megatron"
    t.world_size = tp * pp * cp * dp
    t.parallel.tp, t.parallel.pp, t.parallel.dp, t.parallel.vpp, t.parallel.cp = tp, pp, dp, vpp, cp
    t.lr, t.warmup_steps, t.weight_decay, t.grad_clip = 1e-2, 0, 0.1, 1.0
    for k, v in trainer.items():
        setattr(t, k, v)
    return cfg


def random_micro_batches(
    n: int, rows: int, vocab_size: int, seed: int = 0, min_len: int = 4, max_len: int = 24
) -> list[MicroBatch]:
    """n right-padded micro-batches of `rows` sequences of random lengths; see `micro_batches`."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n, rows), generator=g).tolist()
    return micro_batches(lengths, vocab_size, g)


def micro_batches(lengths: list[list[int]], vocab_size: int, g: torch.Generator) -> list[MicroBatch]:
    """One right-padded micro-batch per entry of `lengths` (its rows' sequence lengths): random tokens from `g`,
    prompt = first third, response = the rest; global token and sequence counts over all of them."""
    total_tokens = 0.0
    out = []
    for row_lengths in lengths:
        rows, T = len(row_lengths), max(row_lengths)
        ids = torch.zeros(rows, T, dtype=torch.long)
        att = torch.zeros(rows, T, dtype=torch.long)
        loss_mask = torch.zeros(rows, T)
        for r, L in enumerate(row_lengths):
            ids[r, :L] = torch.randint(1, vocab_size, (L,), generator=g)
            att[r, :L] = 1
            loss_mask[r, max(L // 3, 1) : L] = 1.0
        adv = torch.randn(rows, 1, generator=g).expand(rows, T) * loss_mask
        old = (-torch.rand(rows, T, generator=g) * 3 - 2.5) * loss_mask  # near uniform over ~200 tokens
        total_tokens += float(loss_mask.sum())
        out.append(
            MicroBatch(
                input_ids=ids,
                attention_mask=att,
                position_ids=torch.arange(T).expand(rows, T).contiguous(),
                loss_mask=loss_mask,
                old_logprobs=old,
                advantages=adv.contiguous(),
            )
        )
    for mb in out:
        mb.global_tokens = total_tokens
        mb.global_seqs = float(sum(map(len, lengths)))
    return out


def assert_same_update(
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    ref_before: dict[str, torch.Tensor],
    ref_after: dict[str, torch.Tensor],
    lr: float,
) -> None:
    """Assert that one optimizer step (Adam's first) moved every HF tensor as the reference run did."""
    assert set(after) == set(ref_after)
    for name, w in ref_after.items():
        assert torch.equal(before[name], ref_before[name]), name  # same starting point
        delta_ref = w - ref_before[name]
        delta = after[name] - before[name]
        if name.endswith("k_proj.bias"):
            # Softmax is invariant to a key bias (it shifts a query's scores uniformly): its true gradient is 0,
            # so Adam's step on it is normalised rounding noise; only check it stays within one Adam step.
            assert (delta - delta_ref).abs().max() <= 2.1 * lr, name
            continue
        assert delta_ref.abs().max() > 1e-2 * lr, name  # every tensor moved
        # Adam's first step moves weights by ~lr: the configured lr reached the optimizer. (An untied input
        # embedding has no gradient on rows of tokens absent from the batch: only weight decay moves those.)
        if delta_ref.dim() == 2 and not name.endswith("embed_tokens.weight"):
            assert abs(delta_ref.abs().median().item() - lr) < 0.1 * lr, name
        # Adam's first step is ~lr * g / (|g| + eps): elements with gradients near eps amplify fp32 rounding
        # differences between layouts (measured worst case 2.7e-5 at TP=2 for lr 1e-2), so bound the max at 1% of
        # lr and the mean tightly. The gradient's scale is checked by grad-norm tests (Adam's first step ignores it).
        err = (delta - delta_ref).abs()
        assert err.max() < 1e-2 * lr and err.mean() < 1e-5 * lr, (name, err.max().item(), err.mean().item())


def merge_micro_batches(mbs: list[MicroBatch]) -> MicroBatch:
    """One right-padded micro-batch holding every row of `mbs` (same global counts): a different split of the
    same mini-batch."""
    T = max(mb.input_ids.shape[1] for mb in mbs)

    def cat(name: str) -> torch.Tensor:
        parts = [getattr(mb, name) for mb in mbs]
        return torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1])) for p in parts], dim=0)

    rows = sum(mb.input_ids.shape[0] for mb in mbs)
    return MicroBatch(
        input_ids=cat("input_ids"),
        attention_mask=cat("attention_mask"),
        position_ids=torch.arange(T).expand(rows, T).contiguous(),
        loss_mask=cat("loss_mask"),
        old_logprobs=cat("old_logprobs"),
        advantages=cat("advantages"),
        global_tokens=mbs[0].global_tokens,
        global_seqs=mbs[0].global_seqs,
        max_new_tokens=mbs[0].max_new_tokens,
    )
