"""The built-in char tokenizer, the tiny model built from config, and the model directory a run starts from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import ConfigError, ModelConfig, TinyModelConfig, load_config
from pipeline.modeling import build_tiny_model
from pipeline.tokenizer import CHARS, build_char_tokenizer, load_tokenizer
from pipeline.warmstart import prepare_model_dir

TINY_CPU = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
ASCII = "".join(chr(c) for c in range(32, 127)) + "\n"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_char_tokenizer_vocab_and_specials(tok):
    assert len(tok) == 101 < 128  # 5 specials + 95 printable + newline
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 4)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [2, 3]
    assert tok.eos_token == "<|endoftext|>"
    # One id per character, in CHARS order after the specials; nothing added around the text.
    assert tok.encode(CHARS, add_special_tokens=True) == list(range(5, 101))
    assert tok.encode("Ab 1\n") == [5 + CHARS.index(c) for c in "Ab 1\n"]


def test_char_tokenizer_round_trip(tok):
    for s in (ASCII, "Compute 8+5-4+2.\n8+5=13\nAnswer: 11", "  two  spaces\n\n", "a", ""):
        ids = tok.encode(s)
        assert len(ids) == len(s)
        assert tok.decode(ids) == s  # no spaces inserted, no clean-up
    # Specials are kept as one token inside text and dropped by skip_special_tokens.
    ids = tok.encode("<|im_start|>hi<|im_end|>") + [tok.eos_token_id]
    assert ids == [2, *tok.encode("hi"), 3, 1]
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_char_tokenizer_unknown_characters(tok):
    assert tok.encode("\t") == [4]
    assert tok.encode("é") == [4, 4]  # one <unk> per UTF-8 byte
    assert tok.encode("x\ty") == [tok.encode("x")[0], 4, tok.encode("y")[0]]


def test_char_tokenizer_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"


def test_load_tokenizer_specs(tmp_path):
    assert len(load_tokenizer("builtin:char")) == 101
    with pytest.raises(ValueError, match="unknown built-in tokenizer 'builtin:bytes'"):
        load_tokenizer("builtin:bytes")
    with pytest.raises(ValueError, match="cannot load tokenizer .*no-such-dir"):
        load_tokenizer(str(tmp_path / "no-such-dir"))


def test_tiny_model_from_config():
    cfg = ModelConfig(
        tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    )
    state = torch.random.get_rng_state()
    m = build_tiny_model(cfg, 101, eos_token_id=1, pad_token_id=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert m.config.vocab_size == 101 and m.get_input_embeddings().weight.shape == (101, 32)
    assert m.config.num_hidden_layers == 2 and m.config.tie_word_embeddings
    assert (m.config.eos_token_id, m.config.pad_token_id) == (1, 0)
    assert (m.generation_config.eos_token_id, m.generation_config.pad_token_id) == (1, 0)
    assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    # Seeded: same seed -> same weights; another seed -> other weights; eager and sdpa compute the same thing.
    same = build_tiny_model(cfg, 101, attn_implementation="eager")
    other = build_tiny_model(ModelConfig(tiny=cfg.tiny, init_seed=1), 101)
    assert same.config._attn_implementation == "eager"
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), same.parameters(), strict=True))
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)
    x = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(m(x).logits, same(x).logits, atol=1e-5, rtol=1e-5)


def test_tiny_model_bad_heads():
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=30, num_attention_heads=4))
    with pytest.raises(ConfigError, match=r"^model.tiny: hidden_size \(30\)"):
        build_tiny_model(cfg, 101)


def test_prepare_model_dir_builds_and_saves(tmp_path):
    cfg = load_config(TINY_CPU, ["model.warm_start_steps=0", "model.tiny.hidden_size=32",
                                                "model.tiny.intermediate_size=64"])  # fmt: skip
    path = prepare_model_dir(cfg, str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "init_model")
    files = {p.name for p in (tmp_path / "run" / "init_model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((tmp_path / "run" / "init_model" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["vocab_size"]) == (1, 0, 101)
    model = AutoModelForCausalLM.from_pretrained(path)
    ref = build_tiny_model(cfg.model, 101)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))
    # transformers 5 loads any tokenizer beside a qwen2 config as Qwen2Tokenizer; ours must survive that.
    s = "Compute 8+5-4+2.\n8+5=13  x"
    ref_tok = build_char_tokenizer()
    for loaded in (AutoTokenizer.from_pretrained(path), load_tokenizer("builtin:char", path)):
        assert loaded.encode(s) == ref_tok.encode(s)
        assert loaded.decode(ref_tok.encode(s) + [1], skip_special_tokens=True) == s
        assert (loaded.eos_token_id, loaded.pad_token_id) == (1, 0)


def test_prepare_model_dir_with_path(tmp_path):
    cfg = load_config(TINY_CPU)
    cfg.model.path = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"^model.path: .*missing' is not a directory"):
        prepare_model_dir(cfg, str(tmp_path))
    (tmp_path / "empty").mkdir()
    cfg.model.path = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"^model.path: .* has no config.json"):
        prepare_model_dir(cfg, str(tmp_path))
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert prepare_model_dir(cfg, str(tmp_path / "out")) == str(tmp_path / "empty")
    assert not (tmp_path / "out").exists()  # nothing is built when a checkpoint is given
