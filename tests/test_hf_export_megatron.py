"""Hugging Face export of a Megatron TP=2 x PP=2 trainer on 4 gloo CPU ranks: the in-run path (every rank iterates
`named_hf_weights`, each stage's source writes its own layers) and `dapo export` from the megatron dist-checkpoint
(4 CPU processes loading it through the backend) give the same tensors, and the exported model's logits are the
trainer's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engines.megatron.launch import init_dist, spawn
from pipeline.config import to_yaml
from pipeline.runtime import hf_export
from pipeline.testing.megatron import random_micro_batches, save_tiny_hf, tiny_config

TP, PP = 2, 2
VOCAB = 200


def _config(hf: str):
    cfg = tiny_config(TP, PP, 1)
    cfg.model.path = hf
    cfg.model.tokenizer = ""
    cfg.rollout.max_new_tokens, cfg.data.max_prompt_tokens = 64, 64  # within the tiny model's 256 positions
    cfg.algorithm.overlong.cache_len = 16
    return cfg


def _rank(rank: int, world_size: int, port: int, tmp: str) -> None:
    from engines.megatron.backend import build_backend
    from pipeline.algorithm.losses import make_loss_fn

    init_dist(rank, world_size, port)
    hf = os.path.join(tmp, "init")
    cfg = _config(hf)
    backend = build_backend(cfg, rank, world_size)
    backend.setup(hf)
    backend.train_minibatch(random_micro_batches(2, 3, VOCAB, seed=1), make_loss_fn(cfg.algorithm))
    probe = random_micro_batches(1, 3, VOCAB, seed=5)
    ref = backend.forward_logprobs(probe)[0]
    part = hf_export.write_backend_shards(backend, hf, os.path.join(tmp, "online"), torch.float32)
    Path(tmp, f"part{rank}.json").write_text(json.dumps(part))
    backend.save(os.path.join(tmp, "run", "checkpoints", "step_00000001", "trainer"))
    if rank == 0:
        torch.save({"probe": probe, "ref": ref}, os.path.join(tmp, "ref.pt"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mexport")
    save_tiny_hf(str(tmp / "init"), "qwen2", vocab_size=VOCAB, tie=True, seed=3)
    (tmp / "online").mkdir()
    spawn(_rank, TP * PP, str(tmp), timeout_s=300)
    parts = [json.loads((tmp / f"part{r}.json").read_text()) for r in range(TP * PP)]
    online = hf_export.finalize(tmp / "online", tmp / "online_final", parts, str(tmp / "init"), torch.float32)
    run = tmp / "run"
    (run / "config.yaml").write_text(to_yaml(_config(str(tmp / "init"))))
    (run / "checkpoints" / "step_00000001" / "state.json").write_text(json.dumps({"step": 1}))
    offline = hf_export.export_run(run, tmp / "offline")
    return parts, online, offline, torch.load(tmp / "ref.pt", weights_only=False), tmp / "init"


def test_each_stage_source_writes_its_own_layers(exported):
    parts, *_ = exported
    # rank order tp-cp-ep-pp-dp: ranks 0 and 2 are the (tp 0) sources of stages 0 and 1; TP peers write nothing
    assert [bool(p) for p in parts] == [True, False, True, False]
    stage0, stage1 = set(parts[0]), set(parts[2])
    assert "model.embed_tokens.weight" in stage0 and "model.layers.0.self_attn.q_proj.weight" in stage0
    assert "model.norm.weight" in stage1 and "model.layers.1.mlp.down_proj.weight" in stage1
    assert not stage0 & stage1 and "lm_head.weight" not in stage0 | stage1  # tied


def test_online_and_offline_exports_agree_and_give_the_trainers_logits(exported):
    from transformers import AutoModelForCausalLM

    _, online, offline, ref, init = exported
    a = AutoModelForCausalLM.from_pretrained(online, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(offline, dtype=torch.float32).eval()
    start = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).state_dict()
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert sum(not torch.equal(t, start[n]) for n, t in b.state_dict().items()) > 10  # the step moved the weights
    mb = ref["probe"][0]
    with torch.no_grad():
        logits = b(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, mb.input_ids[:, 1:, None])[..., 0]
    mask = mb.attention_mask[:, 1:].bool()
    torch.testing.assert_close(lp[mask], ref["ref"][:, 1:][mask], rtol=0, atol=1e-5)
