"""The tiny policy model: a Qwen2 built from config, saved and checked as an HF directory.

Contract:
- `build_tiny_model(cfg, vocab_size, ...)` returns a float32 `Qwen2ForCausalLM` with the architecture of
  `cfg.tiny`, initialised deterministically from `cfg.init_seed` (the global RNG is left as it was).
  The eos/pad ids given are written into the model config and its generation config, so engines stop at eos.
- `save_model_dir(model, tokenizer, path)` writes both (safetensors) atomically (written beside `path`, then
  renamed), so a crash never leaves a half-written model behind. `check_model_path` validates a given directory.
- Which starting checkpoint a run uses (given, tiny, warm-started) is decided by `pipeline.warmstart.prepare_model_dir`,
  which imports this module (never the reverse).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline.config import ConfigError, ModelConfig

INIT_DIR = "init_model"


def tiny_qwen2_config(
    cfg: ModelConfig, vocab_size: int, eos_token_id: int, pad_token_id: int, attn_implementation: str = "sdpa"
) -> Qwen2Config:
    t = cfg.tiny
    if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(
            f"model.tiny: hidden_size ({t.hidden_size}) must divide by num_attention_heads ({t.num_attention_heads}), "
            f"which must divide by num_key_value_heads ({t.num_key_value_heads})"
        )
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        tie_word_embeddings=t.tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )
    config._attn_implementation = attn_implementation
    return config


def build_tiny_model(
    cfg: ModelConfig,
    vocab_size: int,
    eos_token_id: int = 1,
    pad_token_id: int = 0,
    attn_implementation: str = "sdpa",
) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 (see the module docstring). Defaults match the built-in char tokenizer."""
    config = tiny_qwen2_config(cfg, vocab_size, eos_token_id, pad_token_id, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = Qwen2ForCausalLM(config).float()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = eos_token_id, pad_token_id, None
    model.eval()
    return model


def check_model_path(path: str) -> str:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"model.path: {path!r} is not a directory")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {path!r} has no config.json (expected a Hugging Face model directory)")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields a fresh directory beside `path`; on success it replaces `path` by a rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_model_dir(model: torch.nn.Module, tokenizer, path: str | Path) -> None:
    """Model (safetensors) and tokenizer into `path`, atomically."""
    from pipeline.tokenizer import save_tokenizer

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
