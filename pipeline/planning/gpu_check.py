"""Predicted vs measured peak memory of one trainer rank on the current device (the GPU check of #21).

Contract: `python -m pipeline.planning.gpu_check --backend fsdp|megatron --tokens 4096,16384 [--shape 1.5b|tiny]
[--recompute]` builds a Qwen2.5-shaped model with random weights (bf16 on CUDA, float32 on CPU), runs one rank,
trains micro-batches of 4 rows x (tokens / 4), and prints one JSON line per token count: the measured peak
(torch.cuda.max_memory_allocated over a train_minibatch after a warm-up step; on CPU the profiler peak of
pipeline/planning/measure.py) and `trainer_peak_memory(...)` term by term, in GiB.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import torch

SHAPES = {  # Qwen2.5 config.json fields
    "1.5b": dict(hidden_size=1536, layers=28, heads=12, kv_heads=2, intermediate_size=8960, vocab_size=151936),
    "0.5b": dict(hidden_size=896, layers=24, heads=14, kv_heads=2, intermediate_size=4864, vocab_size=151936),
    "tiny": dict(hidden_size=256, layers=2, heads=4, kv_heads=2, intermediate_size=512, vocab_size=1000),
}


def _save_model(shape: dict[str, int]) -> str:
    """A random-weight Qwen2 checkpoint of this shape (tied embeddings, as Qwen2.5-0.5B/1.5B)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2", vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], max_position_embeddings=32768,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    )  # fmt: skip
    path = tempfile.mkdtemp()
    model = AutoModelForCausalLM.from_config(config)
    if torch.cuda.is_available():
        model = model.to(torch.bfloat16)  # half the bytes to write; the trainers load their own dtypes
    model.save_pretrained(path, safe_serialization=True)
    return path


def _one_rank_config(recompute: bool) -> Any:
    """A one-rank trainer config (no parallelism; the optimizer settings do not change the measured memory)."""
    from pipeline.config import Config

    cfg = Config()
    cfg.data.train_path = "synthetic:arith"
    t = cfg.trainer
    t.backend, t.world_size, t.recompute = "megatron", 1, recompute
    t.parallel.tp = t.parallel.pp = t.parallel.dp = t.parallel.vpp = t.parallel.cp = 1
    t.lr, t.warmup_steps, t.weight_decay, t.grad_clip = 1e-2, 0, 0.1, 1.0
    return cfg


def main(argv: list[str] | None = None) -> None:
    from engines.megatron.launch import init_dist, rendezvous
    from pipeline.algorithm.losses import make_loss_fn
    from pipeline.planning.measure import measure_step, random_micro_batch
    from pipeline.planning.memory import trainer_peak_memory

    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="fsdp")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--recompute", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    path = _save_model(SHAPES[args.shape])
    store = rendezvous()  # this process is rank 0 of a one-rank group: it serves its own rendezvous
    init_dist(0, 1, store.port, backend="nccl" if cuda else "gloo")
    cfg = _one_rank_config(recompute=args.recompute)
    cfg.trainer.backend, cfg.model.dtype = args.backend, "bfloat16" if cuda else "float32"
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    if args.backend == "fsdp":
        from engines.fsdp.backend import FSDPBackend as Backend
    else:
        from engines.megatron.backend import MegatronBackend as Backend
    be = Backend(cfg, 0, 1)
    be.setup(path)
    loss_fn = make_loss_fn(cfg.algorithm)
    for tokens in [int(t) for t in args.tokens.split(",")]:
        T = tokens // 4
        mbs = [random_micro_batch(4, T, SHAPES[args.shape]["vocab_size"], min(256, T // 4))]
        if cuda:
            be.train_minibatch(mbs, loss_fn)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            be.train_minibatch(mbs, loss_fn)
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated()
        else:
            measured = measure_step(be, mbs, loss_fn)["allocated"]
        pred = trainer_peak_memory(hf_config, cfg, tokens, device="cuda" if cuda else "cpu")
        gib = {k: round(v / 2**30, 2) for k, v in pred.items()}
        row = {"backend": args.backend, "shape": args.shape, "tokens": tokens, "recompute": args.recompute,
               "measured_gib": round(measured / 2**30, 2), "predicted_gib": gib,
               "ratio": round(pred["allocated"] / measured, 3)}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
