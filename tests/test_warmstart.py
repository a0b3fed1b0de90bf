"""Supervised warm start: examples and masking, it makes the tiny model solve problems, and it is cached."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import pipeline.warmstart as ws
from pipeline.config import load_config
from pipeline.flow.data import DataError, load_prompts
from pipeline.flow.tasks import answer_matches, synthetic_rows
from pipeline.modeling import build_tiny_model
from pipeline.runtime.evaluate import evaluate_hf
from pipeline.tokenizer import build_char_tokenizer, load_tokenizer
from pipeline.warmstart import prepare_model_dir

TINY_CPU = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
TASK = "synthetic:arith?ops=1"  # "Compute 3+4." -> "3+4=7\nAnswer: 7": learnable in ~100 steps


def test_collate_masks_prompt_and_padding():
    ids, mask, labels = ws._collate([([5, 6], [7, 1]), ([5], [8, 9, 1])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 1], [5, 8, 9, 1]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, 7, 1], [-100, 8, 9, 1]]
    ids, mask, labels = ws._collate([([5], [1]), ([5, 6], [7, 8, 1])], pad_id=0)
    assert ids.tolist() == [[5, 1, 0, 0, 0], [5, 6, 7, 8, 1]]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, 1, -100, -100, -100], [-100, -100, 7, 8, 1]]


def test_supervised_examples_are_prompt_solution_eos():
    cfg = load_config(TINY_CPU, [f"data.train_path={TASK}"])
    tok = build_char_tokenizer()
    examples = ws.supervised_examples(cfg, tok, 5, seed=3)
    rows = synthetic_rows(TASK, 5, seed=3)
    assert len(examples) == 5
    for (prompt, response), row in zip(examples, rows, strict=True):
        assert prompt == tok.encode(row["prompt"])
        assert response == tok.encode(row["solution"]) + [tok.eos_token_id]


def test_warm_start_needs_solutions(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    cfg = load_config(TINY_CPU, [f"data.train_path={path}"])
    with pytest.raises(DataError, match=r"d.jsonl: row 0: no 'solution' field; model.warm_start_steps > 0 needs"):
        ws.supervised_examples(cfg, build_char_tokenizer(), 4, 0)


def test_cache_key_tracks_what_changes_the_result():
    base = load_config(TINY_CPU, ["model.warm_start_steps=10"])
    key = ws.warm_start_key(base)
    assert key == ws.warm_start_key(load_config(TINY_CPU, ["model.warm_start_steps=10", "trainer.lr=0.5"]))
    for override in ("model.warm_start_steps=11", "model.init_seed=1", f"data.train_path={TASK}",
                     "model.tiny.hidden_size=64", "data.template=dapo"):  # fmt: skip
        assert ws.warm_start_key(load_config(TINY_CPU, ["model.warm_start_steps=10", override])) != key, override


def test_warm_start_learns_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(TINY_CPU, [f"data.train_path={TASK}", "model.warm_start_steps=120"])
    tok = build_char_tokenizer()
    test = load_prompts(cfg.data, tok, path=f"{TASK}&split=test&n=32", seed=1)
    random_model = build_tiny_model(cfg.model, len(tok), tok.eos_token_id, tok.pad_token_id)
    before = evaluate_hf(random_model, tok, test[:16], answer_matches, max_new_tokens=20)

    path = prepare_model_dir(cfg, str(tmp_path / "run1"))
    entry = ws.cache_root() / ws.warm_start_key(cfg)
    assert entry.parent == tmp_path / "cache" / "warmstart" and (entry / ws.MARKER).is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    after = evaluate_hf(model, load_tokenizer("builtin:char", path), test, answer_matches, max_new_tokens=20)
    assert before["acc"] == 0.0
    assert after["acc"] >= 0.15, after["per_prompt"][:3]  # measured 0.28 on 64 held-out prompts
    assert after["truncated"] < 0.1  # it learned to stop (eos)

    # Second time: a cache hit, no training, the same weights.
    def no_training(*a, **k):
        raise AssertionError("warm start ran again despite a cached entry")

    monkeypatch.setattr(ws, "warm_start", no_training)
    t0 = time.perf_counter()
    path2 = prepare_model_dir(cfg, str(tmp_path / "run2"))
    assert time.perf_counter() - t0 < 5
    model2 = AutoModelForCausalLM.from_pretrained(path2)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True)
    )
    assert (Path(path2) / "tokenizer.json").read_bytes() == (Path(path) / "tokenizer.json").read_bytes()
