"""Trainer benchmark: train and logprob-forward throughput, MFU and peak memory of both trainer backends.

Contract:
- `run(quick, shape=None, backends=("megatron", "fsdp"), steps=3, warmup=1, rows=4, max_tokens=0, seed=0,
  peak_tflops=None) -> dict` builds a random-weight Qwen2.5-shaped HF checkpoint (`SHAPES`: `tiny` for CPU, `0.5b`,
  `1.5b`, `7b` with Qwen2.5's dimensions, vocab 151,936, rope theta 1e6, qkv bias, tied embeddings for 0.5B/1.5B),
  saved in bf16 (float32 for `tiny`), and runs each backend in its own fresh one-rank process on the current device
  (CUDA if available: bf16, nccl; else CPU: float32, gloo). `shape=None` is `tiny` when `quick` or without CUDA,
  else `1.5b`.
- Workload (`WORKLOADS`): the long-tailed RL batch of the GPU notes for the Qwen shapes, 32 sequences of 272-4096
  tokens (prompt 256), lengths at evenly spaced quantiles of a power law (45,611 tokens in all), sorted longest
  first as the trainer does, in micro-batches of `rows` rows (or a `max_tokens` budget); lr 1e-6, no warm-up, no
  recompute, fixed seeds. `tiny`: 16 sequences of 24-160 tokens. The first logprob forward gives the behaviour
  logprobs (ratio 1, as on policy).
- Timing: `warmup` untimed passes, then the median of `steps` timed ones (quick: one of each), separately for
  `forward_logprobs` and `train_minibatch` (forward + backward + optimizer step over every micro-batch).
- Result keys per backend `b`: `b_train_tokens_per_s`, `b_mfu` (None where the device's bf16 peak is unknown, e.g.
  CPU), `b_peak_mem_gib` (torch.cuda.max_memory_allocated; on CPU the process max RSS), `b_logprob_tokens_per_s`,
  `b_logprob_over_train_ratio`, `b_first_loss`, `b_error` (instead of the figures, when `keep_going` and that
  backend failed; without `keep_going` the failure propagates), `b_plan_peak_gib` (the `allocated` term of
  pipeline.plan.trainer_peak_memory for the largest micro-batch, when that function exists), plus `shape`,
  `device`, `tokens`, `params`, `train_flops_per_step`.
- MFU = (6 x N x tokens + causal attention FLOPs) / time / peak, N = the parameters that take part in matmuls (all
  of them, less an untied input embedding, which is a lookup), causal attention FLOPs = 6 x layers x heads x
  head_dim x sum(L^2) over sequences (forward QK^T and PV at half the L^2 square each, backward twice the forward).

Run: python -m benchmarks.bench_trainer --shape 1.5b --backends megatron,fsdp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import tempfile
import time
from typing import Any

import torch

from engines.megatron.launch import init_dist, spawn
from pipeline.contracts.backend import MicroBatch
from pipeline.testing.megatron import tiny_config

GIB = 1024**3
QWEN_VOCAB = 151936


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = QWEN_VOCAB
    tie: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES: dict[str, Shape] = {
    "tiny": Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256),
    "0.5b": Shape(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2),
    "1.5b": Shape(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2),
    "7b": Shape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, tie=False),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    n_seqs: int
    min_len: int
    max_len: int
    prompt: int
    power: float  # lengths = min + (max - min) * q^power at quantiles q: most short, a few near the cap


WORKLOADS = {
    "tiny": Workload(n_seqs=16, min_len=24, max_len=160, prompt=16, power=2.4),
    "qwen": Workload(n_seqs=32, min_len=272, max_len=4096, prompt=256, power=2.39),
}


def hf_config(shape: Shape) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie,
        use_sliding_window=False,
        attention_dropout=0.0,
    )


def param_count(shape: Shape) -> int:
    """Parameters of a Qwen2 model of this shape (qkv with bias, o and MLP without, two RMSNorms per layer)."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h
    layer = attn + 3 * h * shape.intermediate + 2 * h
    emb = shape.vocab * h
    return shape.layers * layer + h + emb + (0 if shape.tie else emb)


def matmul_params(shape: Shape) -> int:
    """N of the 6 N T rule: every parameter but an untied input embedding (a lookup, no FLOPs)."""
    return param_count(shape) - (0 if shape.tie else shape.vocab * shape.hidden)


def train_flops(shape: Shape, lengths: list[int]) -> float:
    """Training FLOPs of one pass over sequences of these lengths: 6 N tokens + causal attention."""
    attn = 6.0 * shape.layers * shape.heads * shape.head_dim * sum(L * L for L in lengths)
    return 6.0 * matmul_params(shape) * sum(lengths) + attn


def device_peak_flops(name: str) -> float | None:
    """Dense bf16 peak of a known accelerator (FLOP/s), None where unknown (CPU)."""
    for key, tflops in (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("L40S", 362.0)):
        if key in name:
            return tflops * 1e12
    return None


def long_tailed_lengths(w: Workload) -> list[int]:
    """Deterministic long-tailed lengths (quantiles of a power law), longest first as the trainer orders rows."""
    qs = [i / (w.n_seqs - 1) for i in range(w.n_seqs)]
    lengths = [w.min_len + round((w.max_len - w.min_len) * q**w.power) for q in qs]
    return sorted(lengths, reverse=True)


def micro_batches(
    lengths: list[int], prompt: int, vocab: int, rows: int, max_tokens: int, seed: int
) -> list[MicroBatch]:
    """Right-padded micro-batches of `rows` rows (or filled up to `max_tokens` real tokens)."""
    groups: list[list[int]] = []
    for L in lengths:
        fits = groups and (
            sum(groups[-1]) + L <= max_tokens if max_tokens > 0 else len(groups[-1]) < rows
        )  # fmt: skip
        if fits:
            groups[-1].append(L)
        else:
            groups.append([L])
    g = torch.Generator().manual_seed(seed)
    out = []
    for lens in groups:
        T = max(lens)
        lens_t = torch.tensor(lens)
        att = (torch.arange(T) < lens_t[:, None]).long()
        ids = torch.randint(1, vocab, (len(lens), T), generator=g) * att
        loss_mask = att.float() * (torch.arange(T) >= prompt).float()
        adv = torch.randn(len(lens), 1, generator=g).expand(len(lens), T) * loss_mask
        out.append(
            MicroBatch(
                input_ids=ids,
                attention_mask=att,
                position_ids=torch.arange(T).expand(len(lens), T).contiguous(),
                loss_mask=loss_mask,
                old_logprobs=torch.zeros(len(lens), T),
                advantages=adv.contiguous(),
                max_new_tokens=max(lengths) - prompt,
            )
        )
    total = float(sum(mb.loss_mask.sum() for mb in out))
    for mb in out:
        mb.global_tokens, mb.global_seqs = total, float(len(lengths))
    return out


def save_random_checkpoint(shape: Shape, path: str, dtype: torch.dtype, seed: int) -> None:
    """A random-weight HF checkpoint of this shape (built on the GPU where there is one: a 7B init on CPU is slow)."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=dtype)
    model.save_pretrained(path, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def _bench_config(backend: str, dtype: str, seed: int) -> Any:
    cfg = tiny_config(lr=1e-6, warmup_steps=0, recompute=False, seed=seed, grad_clip=1.0)
    cfg.trainer.backend = backend
    cfg.model.dtype = dtype
    cfg.rollout.temperature = 1.0
    return cfg


def _timed(fn: Any, n: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(n):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def _worker(rank: int, world_size: int, port: int, tmp: str, spec: dict) -> None:
    """One backend on one rank: set up, time logprob forwards then training steps, write result_<backend>.json."""
    from pipeline.algorithm.losses import make_loss_fn

    cuda = torch.cuda.is_available()
    init_dist(rank, world_size, port, backend="nccl" if cuda else "gloo")
    torch.set_num_threads(spec["threads"])
    name = spec["backend"]
    cfg = _bench_config(name, spec["dtype"], spec["seed"])
    if name == "megatron":
        from engines.megatron.backend import build_backend
    else:
        from engines.fsdp.backend import build_backend
    backend = build_backend(cfg, rank, world_size)
    t0 = time.perf_counter()
    backend.setup(os.path.join(tmp, "hf"))
    setup_s = time.perf_counter() - t0
    mbs = micro_batches(spec["lengths"], spec["prompt"], spec["vocab"], spec["rows"], spec["max_tokens"], spec["seed"])
    n = spec["warmup"] + spec["steps"]
    lp_times, lps = _timed(lambda: backend.forward_logprobs(mbs), n)
    for mb, lp in zip(mbs, lps, strict=True):
        mb.old_logprobs = lp.float() * mb.loss_mask  # on policy: ratio 1
    loss_fn = make_loss_fn(cfg.algorithm)
    losses: list[float] = []

    def step() -> None:
        losses.append(float(backend.train_minibatch(mbs, loss_fn)["loss"]))

    train_times, _ = _timed(step, n)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    result = {
        "setup_s": setup_s,
        "logprob_s": statistics.median(lp_times[spec["warmup"] :]),
        "train_s": statistics.median(train_times[spec["warmup"] :]),
        "logprob_times": lp_times,
        "train_times": train_times,
        "first_loss": losses[0],
        "peak_bytes": peak,
        "peak_kind": "cuda_max_allocated" if cuda else "max_rss",
    }
    with open(os.path.join(tmp, f"result_{name}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def plan_prediction_gib(backend: str, shape: Shape, mb_tokens: int, dtype: str) -> float | None:
    """pipeline.plan.trainer_peak_memory's prediction of what torch's allocator peaks at (its `allocated` term,
    comparable with torch.cuda.max_memory_allocated), in GiB, for the largest micro-batch; None where that function
    does not exist (it comes with another change) or fails."""
    try:
        from pipeline.plan import trainer_peak_memory  # type: ignore[attr-defined]
    except ImportError:
        return None
    cfg = _bench_config(backend, dtype, 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        terms = trainer_peak_memory(hf_config(shape), cfg, mb_tokens, device=device)
        value = terms.get("allocated", terms["total"]) if isinstance(terms, dict) else float(terms)
    except Exception:  # a prediction that cannot be made must not fail the measurement beside it
        return None
    return float(value) / GIB


def run(
    quick: bool = True,
    shape: str | None = None,
    backends: tuple[str, ...] | list[str] = ("megatron", "fsdp"),
    steps: int = 3,
    warmup: int = 1,
    rows: int = 4,
    max_tokens: int = 0,
    seed: int = 0,
    peak_tflops: float | None = None,
    timeout_s: float = 900.0,
    keep_going: bool = False,
) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    if quick:
        steps, warmup = 1, 1
    shape = shape or ("tiny" if quick or not cuda else "1.5b")
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: expected one of {', '.join(SHAPES)}")
    s = SHAPES[shape]
    w = WORKLOADS["tiny" if shape == "tiny" else "qwen"]
    lengths = long_tailed_lengths(w)
    dtype = "bfloat16" if cuda else "float32"
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops * 1e12 if peak_tflops else device_peak_flops(device) if cuda else None
    flops = train_flops(s, lengths)
    mbs = micro_batches(lengths, w.prompt, s.vocab, rows, max_tokens, seed)
    max_mb_tokens = max(int(mb.attention_mask.sum()) for mb in mbs)
    tokens = sum(lengths)
    out: dict[str, Any] = {
        "shape": shape,
        "device": device,
        "dtype": dtype,
        "tokens": tokens,
        "sequences": len(lengths),
        "params": param_count(s),
        "train_flops_per_step": flops,
    }
    spec_base = {
        "lengths": lengths,
        "prompt": w.prompt,
        "vocab": s.vocab,
        "rows": rows,
        "max_tokens": max_tokens,
        "seed": seed,
        "dtype": dtype,
        "warmup": warmup,
        "steps": steps,
        "threads": max(1, min(4, os.cpu_count() or 1)) if not cuda else 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(s, os.path.join(tmp, "hf"), torch.bfloat16 if cuda else torch.float32, seed)
        for name in backends:
            if name not in ("megatron", "fsdp"):
                raise ValueError(f"--backends: unknown backend {name!r} (megatron, fsdp)")
            try:
                spawn(_worker, 1, tmp, {**spec_base, "backend": name}, timeout_s=timeout_s)
                with open(os.path.join(tmp, f"result_{name}.json")) as f:
                    r = json.load(f)
            except Exception as e:  # one backend failing (out of memory, timeout) must not hide the other's figures
                if not keep_going:
                    raise
                out[f"{name}_error"] = f"{type(e).__name__}: {str(e).strip()[-400:]}"
                continue
            train_tps = tokens / r["train_s"]
            lp_tps = tokens / r["logprob_s"]
            out[f"{name}_train_tokens_per_s"] = train_tps
            out[f"{name}_logprob_tokens_per_s"] = lp_tps
            out[f"{name}_logprob_over_train_ratio"] = lp_tps / train_tps
            out[f"{name}_mfu"] = flops / r["train_s"] / peak if peak else None
            out[f"{name}_peak_mem_gib"] = r["peak_bytes"] / GIB
            out[f"{name}_peak_mem_kind"] = r["peak_kind"]
            out[f"{name}_first_loss"] = r["first_loss"]
            out[f"{name}_setup_s"] = r["setup_s"]
            out[f"{name}_train_times_s"] = r["train_times"]
            out[f"{name}_logprob_times_s"] = r["logprob_times"]
            pred = plan_prediction_gib(name, s, max_mb_tokens, dtype)
            if pred is not None:
                out[f"{name}_plan_peak_gib"] = pred
    return out


def format_table(r: dict[str, Any], backends: list[str]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

    plan = any(f"{b}_plan_peak_gib" in r for b in backends)
    head = "| backend | train tokens/s | MFU | peak memory GiB | logprob fwd tokens/s | logprob/train |"
    head += " plan peak GiB |" if plan else ""
    lines = [
        f"shape {r['shape']} ({r['params'] / 1e9:.3f} B params), {r['device']}, {r['dtype']}, "
        f"{r['sequences']} sequences, {r['tokens']} tokens",
        head,
        "|---" * (7 if plan else 6) + "|",
    ]
    for b in backends:
        if f"{b}_error" in r:
            lines.append(f"| {b} | failed: {r[f'{b}_error'][-200:]!r} |")
            continue
        mfu = r.get(f"{b}_mfu")
        row = (
            f"| {b} | {fmt(r[f'{b}_train_tokens_per_s'], '.0f')} | {fmt(mfu and 100 * mfu, '.1f')}"
            f"{'%' if mfu else ''} | {fmt(r[f'{b}_peak_mem_gib'], '.2f')} ({r[f'{b}_peak_mem_kind']}) | "
            f"{fmt(r[f'{b}_logprob_tokens_per_s'], '.0f')} | {fmt(r[f'{b}_logprob_over_train_ratio'], '.2f')} |"
        )
        if plan:
            row += f" {fmt(r.get(f'{b}_plan_peak_gib'), '.2f')} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 1.5b on CUDA, tiny on CPU")
    ap.add_argument("--backends", default="megatron,fsdp")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--rows", type=int, default=4, help="rows per micro-batch")
    ap.add_argument("--max-tokens", type=int, default=0, help="token budget per micro-batch instead of --rows")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: known GPUs)")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per backend (its worker is killed after)")
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    r = run(
        quick=False,
        shape=args.shape,
        backends=backends,
        steps=args.steps,
        warmup=args.warmup,
        rows=args.rows,
        max_tokens=args.max_tokens,
        peak_tflops=args.peak_tflops,
        timeout_s=args.timeout_s,
        keep_going=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    print(format_table(r, backends), flush=True)
    if any(f"{b}_error" in r for b in backends):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
