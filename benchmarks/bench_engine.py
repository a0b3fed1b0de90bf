"""Local CPU engine vs plain HF `generate` on the same tiny Qwen2, in the same run.

Model: Qwen2 from config (hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 512, vocab 1024), float32.
Workload: 64 prompts of 32 tokens x 128 new tokens, temperature 1, no top-k/top-p, EOS ignored so both produce
exactly 128 tokens per prompt. Baseline: one batched `model.generate` call in this process. Engine: the server
subprocess (python -m engines.local) driven over HTTP by EngineClient with all 64 requests in flight; its time
includes HTTP and JSON. Both use the same number of torch threads and alternate; the best run of each counts
(the machine is shared). Prints tokens/s of each and the ratio.

Run: .venv/bin/python -m benchmarks.bench_engine [--quick] [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from engines.client import EngineClient
from engines.process import free_port, launch_engine
from pipeline.config import EngineConfig
from pipeline.testing.tiny_models import build_tiny_model

MODEL = dict(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512)
PROMPT_LEN = 32


def _prompts(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, MODEL["vocab_size"], (batch, PROMPT_LEN), generator=g)


def bench_hf_generate(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> float:
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
    )
    with torch.inference_mode():
        warm = prompts[:4]
        model.generate(
            warm, attention_mask=torch.ones_like(warm), **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
        )
        start = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape == (prompts.shape[0], PROMPT_LEN + new_tokens), out.shape
    return prompts.numel() // PROMPT_LEN * new_tokens / elapsed


async def _bench_engine(url: str, prompts: torch.Tensor, new_tokens: int) -> float:
    client = EngineClient([url])
    params = {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}
    try:
        await asyncio.gather(*(client.generate(p, {**params, "max_new_tokens": 4}) for p in prompts[:4].tolist()))
        start = time.perf_counter()
        outs = await asyncio.gather(*(client.generate(p, params) for p in prompts.tolist()))
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    assert all(len(o.output_ids) == new_tokens for o in outs)
    return len(outs) * new_tokens / elapsed


def run(quick: bool = False, threads: int = 2, repeats: int | None = None) -> dict:
    """Baseline and engine alternate `repeats` times (the machine is shared: best-of-N damps noise)."""
    batch, new_tokens = (16, 32) if quick else (64, 128)
    repeats = repeats or (1 if quick else 3)
    torch.set_num_threads(threads)
    model = build_tiny_model(seed=0, max_position=1024, init_std=0.02, **MODEL)
    prompts = _prompts(batch)
    hf, engine = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        cfg = EngineConfig(backend="local", threads=threads, max_running_requests=batch, startup_timeout_s=120)
        proc = launch_engine(cfg, str(Path(tmp) / "model"), free_port(), Path(tmp) / "engine.log")
        try:
            for _ in range(repeats):
                hf.append(bench_hf_generate(model, prompts, new_tokens))
                engine.append(asyncio.run(_bench_engine(proc.url, prompts, new_tokens)))
        finally:
            proc.stop()
    best_hf, best_engine = max(hf), max(engine)
    result = {
        "batch": batch,
        "new_tokens": new_tokens,
        "threads": threads,
        "repeats": repeats,
        "hf_generate_tok_s": round(best_hf, 1),
        "engine_tok_s": round(best_engine, 1),
        "ratio": round(best_engine / best_hf, 2),
        "hf_generate_runs": [round(x, 1) for x in hf],
        "engine_runs": [round(x, 1) for x in engine],
    }
    print(
        f"engine {best_engine:.0f} tok/s vs HF generate {best_hf:.0f} tok/s (best of {repeats}; batch {batch} x "
        f"{new_tokens} new tokens, {threads} threads): ratio {best_engine / best_hf:.2f}x"
    )
    print(f"  runs: engine {result['engine_runs']}, HF generate {result['hf_generate_runs']}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=0, help="alternating runs of each (0: 3, or 1 with --quick)")
    args = p.parse_args()
    run(args.quick, args.threads, args.repeats or None)


if __name__ == "__main__":
    main()
