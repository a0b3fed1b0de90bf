"""Tokenizers: the built-in character-level tokenizer and loading by spec.

Contract:
- `build_char_tokenizer()` returns a `PreTrainedTokenizerFast` made locally with the `tokenizers` library (no
  download): one id per character of printable ASCII (space..~) plus newline, and the specials
  `<pad>` (id 0), `<|endoftext|>` (id 1, eos), `<|im_start|>`, `<|im_end|>`, `<unk>` (id 4); 101 ids in all.
  `decode(encode(s)) == s` for any string of those characters (nothing is inserted between characters);
  any other character encodes to `<unk>` (one per UTF-8 byte). `encode` adds no special tokens. It carries a
  ChatML chat template, so `apply_chat_template(..., add_generation_prompt=True)` works.
- It is a byte-level BPE without merges (GPT-2 byte alphabet: space is stored as `Ġ`, newline as `Ċ`) because
  transformers 5 loads any tokenizer next to a `qwen2` config.json as `Qwen2Tokenizer`, which re-imposes
  byte-level pre-tokenisation: in this form `AutoTokenizer.from_pretrained(model_dir)` gives the same ids and
  text for printable ASCII (it drops unknown characters instead of mapping them to `<unk>`).
- `load_tokenizer(spec, model_dir)`: `builtin:char` -> the tokenizer saved in `model_dir` when there is one (so a
  run and its engines share exactly one tokenizer), else a fresh char tokenizer; anything else is a local path or
  an HF id handed to `AutoTokenizer.from_pretrained` (a failure names the spec).
- `save_tokenizer(tok, path)`: `save_pretrained`, then for a tokenizer.json-only tokenizer (like the char one) the
  config names the portable class `PreTrainedTokenizerFast` so transformers 4.x and 5.x both load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, IM_START, IM_END, UNK = "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIALS = (PAD, EOS, IM_START, IM_END, UNK)
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"
BUILTIN_CHAR = "builtin:char"

# ChatML, the format Qwen models use; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_symbol(b: int) -> str:
    """The GPT-2 byte-level alphabet: printable Latin-1 bytes stand for themselves, the others for 256 + n in order."""
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if b in visible:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in visible].index(b))


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in character-level tokenizer (see the module docstring)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *(byte_symbol(ord(c)) for c in CHARS)])}
    # Byte-level BPE without merges = one token per (ASCII) character; the ByteLevel decoder maps Ġ/Ċ back.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return tok


def load_tokenizer(path_or_spec: str, model_dir: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from `builtin:char`, a local directory or an HF id (see the module docstring)."""
    if path_or_spec == BUILTIN_CHAR:
        if model_dir and (Path(model_dir) / "tokenizer.json").is_file():
            # The run's own saved copy; loaded verbatim (AutoTokenizer would pick the model type's class).
            return PreTrainedTokenizerFast.from_pretrained(model_dir)
        return build_char_tokenizer()
    if path_or_spec.startswith("builtin:"):
        raise ValueError(
            f"model.tokenizer: unknown built-in tokenizer {path_or_spec!r}; the only one is {BUILTIN_CHAR!r}"
        )
    try:
        return AutoTokenizer.from_pretrained(path_or_spec)
    except Exception as e:  # noqa: BLE001 - re-raised with the spec named
        raise ValueError(f"model.tokenizer: cannot load tokenizer {path_or_spec!r}: {e}") from e


def save_tokenizer(tok: PreTrainedTokenizerBase, path: str | Path) -> None:
    """`save_pretrained` into `path`, written so that transformers 4.x and 5.x both load it."""
    tok.save_pretrained(str(path))
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") != "TokenizersBackend":
        return  # a model's own tokenizer class: leave it as its authors wrote it
    # transformers 5 writes its generic backend class and a list under `extra_special_tokens`; 4.x knows neither.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def encode_texts(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts, no special tokens added; the Rust batch encoder without offsets when available."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
