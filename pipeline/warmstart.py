"""The policy's starting checkpoint, and the supervised warm start of the tiny model, cached so it runs once.

Contract:
- `prepare_model_dir(cfg, out_dir)`: with `cfg.model.path` set, checks it is a directory holding config.json and
  returns it unchanged. Otherwise it builds the tiny model and the built-in tokenizer (pipeline/modeling.py),
  applies the cached warm start when `cfg.model.warm_start_steps > 0`, and saves both to `out_dir/init_model`
  (atomically), which it returns.
- `warm_start(model, tokenizer, cfg, steps, seed)` trains `model` in place with AdamW on examples
  `prompt + solution + eos` built from `cfg.data.train_path` (templated exactly as `load_prompts` does), with the
  loss on the response tokens only; deterministic for a given seed on one thread count. Returns loss statistics.
  The source must give rows with a `solution` field (every `synthetic:` task does); otherwise `DataError`.
  Synthetic sources are drawn fresh (steps x batch rows, train split), so the warm start sees no eval problem.
- `cached_warm_start(cfg)` returns a directory holding the warm-started model and tokenizer (HF format), keyed by
  a hash of everything that changes the result (architecture, tokenizer, init seed, task source and template,
  a data file's size and mtime, steps, hyper-parameters, `WARMSTART_VERSION`, to bump when this procedure or a
  synthetic task's generator changes). It trains and saves on a miss, and only reads on a hit.
  The cache lives in `$DAPO_CACHE_DIR/warmstart` (default `~/.cache/dapo-rl/warmstart`); entries appear atomically,
  so concurrent runs at worst both train, never read a half-written entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.modeling import INIT_DIR, atomic_dir, build_tiny_model, check_model_path, save_model_dir
from pipeline.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

WARMSTART_VERSION = 2
"""Bump when the warm-start procedure changes, so stale cache entries are not reused."""
BATCH_SIZE = 32
LR = 3e-3
WARMUP_FRACTION = 0.05
GRAD_CLIP = 1.0
MARKER = "warmstart.json"


def cache_root() -> Path:
    base = os.environ.get("DAPO_CACHE_DIR") or str(Path.home() / ".cache" / "dapo-rl")
    return Path(base) / "warmstart"


def _file_stamp(source: str) -> list[int] | None:
    """(size, mtime) of a local dataset file, so an edited file is not served a stale entry."""
    path = Path(source.partition("?")[0])
    if source.startswith(("synthetic:", "hf://")) or not path.is_file():
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def warm_start_key(cfg: Config) -> str:
    m, d = cfg.model, cfg.data
    spec = {
        "version": WARMSTART_VERSION,
        "tiny": dataclasses.asdict(m.tiny),
        "tokenizer": m.tokenizer,
        "init_seed": m.init_seed,
        "steps": m.warm_start_steps,
        "data": {k: getattr(d, k) for k in ("train_path", "template", "prompt_key", "answer_key", "max_prompt_tokens")},
        "hparams": {"batch": BATCH_SIZE, "lr": LR, "warmup": WARMUP_FRACTION, "clip": GRAD_CLIP},
        "file": _file_stamp(d.train_path),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def supervised_examples(cfg: Config, tokenizer: Any, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + eos) pairs from the training source's reference solutions."""
    from pipeline.flow.data import DataError, load_rows, rows_to_prompts, source_config
    from pipeline.tokenizer import encode_texts

    base, scfg = source_config(cfg.data.train_path, cfg.data)
    rows = load_rows(cfg.data.train_path, scfg, seed, size=n)
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get("solution"), str) or not r["solution"]]
    if missing:
        raise DataError(
            f"{base}: row {missing[0]}: no 'solution' field; model.warm_start_steps > 0 needs reference solutions "
            "(use a synthetic: task, or set model.warm_start_steps=0)"
        )
    prompts = rows_to_prompts(rows, scfg, tokenizer, base)
    solutions = encode_texts(tokenizer, [r["solution"] for r in rows])
    return [(p.prompt_ids, list(s) + [tokenizer.eos_token_id]) for p, s in zip(prompts, solutions, strict=True)]


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding), each (B, T)."""
    width = max(len(p) + len(r) for p, r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(batch):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(r)
    return ids, mask, labels


def warm_start(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Config,
    steps: int,
    seed: int,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
) -> dict[str, float]:
    """Train `model` in place on reference solutions (see the module docstring)."""
    examples = supervised_examples(cfg, tokenizer, steps * batch_size, seed)
    rng = random.Random(seed)
    rng.shuffle(examples)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses, t0 = [], time.perf_counter()
    threads = torch.get_num_threads()
    # trainer.threads (default 1): on a shared CPU, oversubscribed threads make this slower, not faster.
    torch.set_num_threads(max(1, cfg.trainer.threads))
    try:  # no dropout in the tiny model, so the order of `examples` is the only randomness
        for step in range(steps):
            # Synthetic sources give steps x batch fresh rows; a file is cycled through.
            batch = [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]
            ids, mask, labels = _collate(batch, tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - t0}


def cached_warm_start(cfg: Config) -> str:
    """Directory of the warm-started model + tokenizer (trained on a cache miss)."""
    key = warm_start_key(cfg)
    path = cache_root() / key
    if (path / MARKER).is_file():
        log.info("warm start: cache hit %s", path)
        return str(path)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model = build_tiny_model(cfg.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    steps = cfg.model.warm_start_steps
    log.info("warm start: %d supervised steps on %s (cache miss %s)", steps, cfg.data.train_path, path)
    stats = warm_start(model, tokenizer, cfg, steps, seed=cfg.model.init_seed)
    log.info("warm start: loss %.3f -> %.3f in %.1fs", stats["first_loss"], stats["final_loss"], stats["seconds"])
    tmp = path.with_name(f".{key}.{os.getpid()}")
    save_model_dir(model, tokenizer, tmp)
    (tmp / MARKER).write_text(json.dumps({"key": key, "steps": steps, **stats}, indent=2) + "\n")
    try:
        tmp.rename(path)
    except OSError:  # another process finished the same entry first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def prepare_model_dir(cfg: Config, out_dir: str) -> str:
    """The HF directory the trainer and the engines load (see the module docstring)."""
    if cfg.model.path:
        return check_model_path(cfg.model.path)
    target = Path(out_dir) / INIT_DIR
    if cfg.model.warm_start_steps > 0:
        cached = cached_warm_start(cfg)
        with atomic_dir(target) as tmp:
            shutil.copytree(cached, tmp, dirs_exist_ok=True)
        return str(target)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model = build_tiny_model(cfg.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    save_model_dir(model, tokenizer, target)
    return str(target)
