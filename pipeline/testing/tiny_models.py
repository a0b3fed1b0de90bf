"""Tiny saved models for tests and benchmarks of the engines (no hub access, built from config).

`save_tiny_model(path, ...)` writes a randomly initialised Qwen2 (or Llama, or Qwen3-MoE: 4 experts, top-2) causal LM with `save_pretrained`, and,
when the vocabulary has room for it, a character-level `PreTrainedTokenizerFast` (ids 0 <pad>, 1 <eos>, 2 <unk>,
then printable ASCII). The model's eos_token_id is 1. Returns the directory.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHAR_VOCAB = ["<pad>", "<eos>", "<unk>"] + [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
EOS_ID = 1


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHAR_VOCAB)}
    # A BPE model without merges splits text into single characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position: int = 512,
    init_std: float = 0.1,
    model_type: str = "qwen2",
    tie: bool = True,
):
    from transformers import LlamaConfig, Qwen2Config, Qwen3MoeConfig

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3_moe": Qwen3MoeConfig}[model_type]
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}
    return cls(
        **(moe if model_type == "qwen3_moe" else {}),
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position,
        initializer_range=init_std,
        tie_word_embeddings=tie,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        bos_token_id=None,
    )


def build_tiny_model(seed: int = 0, **config_kwargs) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(**config_kwargs), dtype=torch.float32)
    return model.eval()


def save_tiny_model(path: str | Path, seed: int = 0, **config_kwargs) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(seed, **config_kwargs)
    model.save_pretrained(path)
    if model.config.vocab_size >= len(CHAR_VOCAB):
        char_tokenizer().save_pretrained(path)
    return path


@torch.no_grad()
def teacher_forced_logprobs(
    model: torch.nn.Module, prompt: list[int], output: list[int], temperature: float = 1.0
) -> list[float]:
    """log softmax(logits / T) of each output token given everything before it (T = 0 means 1)."""
    ids = torch.tensor([prompt + output])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    return logp.gather(1, torch.tensor(output)[:, None]).squeeze(1).tolist()


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by full forwards, no cache (slow, obviously correct)."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]
