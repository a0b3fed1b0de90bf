"""`dapo plan`: parameter, memory and throughput terms against hand-computed numbers; published RL setups
(slime, verl, AReaL) judged feasible; proposals feasible for the same (model, GPUs) and written as loadable configs."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.plan import (
    GPUS,
    KNOWN_MODELS,
    EngineSetup,
    Parallel,
    PlanError,
    TrainSetup,
    check_feasible,
    decode_tokens_per_s,
    engine_memory,
    load_model,
    model_from_hf_config,
    plan_main,
    propose,
    train_memory,
    write_config,
)

GiB = 2**30
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --------------------------------------------------------------------------------------------------- model sizes
def test_param_count_dense_by_hand():
    # h=8, 2 layers, 2 heads of 4, 1 kv head, I=16, V=10, untied, Qwen2 qkv bias.
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, biases 8+4+4 = 16, norms 2*8 = 16, MLP 3*8*16 = 384 -> 608
    # total: 2*608 + embedding 80 + head 80 + final norm 8 = 1384
    cfg = {"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 10, "tie_word_embeddings": False}  # fmt: skip
    m = model_from_hf_config(cfg)
    assert m.total_params == 1384
    assert m.active_params == 1384


def test_param_count_moe_by_hand():
    # Qwen3-MoE: h=8, 2 layers, 2 heads x 4, 1 kv head, 4 experts top-2, I_moe=6, V=10, tied.
    # per layer: attention 192 + q/k norms 8 + norms 16 = 216; router 8*4 = 32; experts 4*3*8*6 = 576 -> 824
    # total 2*824 + embedding 80 + final norm 8 = 1736; active: half the experts idle -> 1736 - 2*288 = 1160
    cfg = {"model_type": "qwen3_moe", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 6, "intermediate_size": 99, "vocab_size": 10, "tie_word_embeddings": True}  # fmt: skip
    m = model_from_hf_config(cfg)
    assert (m.total_params, m.active_params, m.num_moe_layers) == (1736, 1160, 2)


@pytest.mark.parametrize(
    "name, total_b, active_b",
    [  # sizes published on the model cards
        ("Qwen2.5-0.5B", 0.49, 0.49),
        ("Qwen2.5-7B", 7.61, 7.61),
        ("Qwen3-4B", 4.0, 4.0),
        ("Qwen3-8B", 8.2, 8.2),
        ("Qwen3-30B-A3B", 30.5, 3.3),
        ("Qwen3-235B-A22B", 235.0, 22.0),
        ("Llama-3-8B", 8.03, 8.03),
    ],
)
def test_known_models_match_published_sizes(name, total_b, active_b):
    m = load_model(name)
    assert m.total_params / 1e9 == pytest.approx(total_b, rel=0.02)
    assert m.active_params / 1e9 == pytest.approx(active_b, rel=0.02)


def test_hf_config_file_and_names(tmp_path):
    cfg = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
           "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768,
           "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "tie_word_embeddings": False,
           "decoder_sparse_step": 1, "mlp_only_layers": []}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from_file = load_model(str(tmp_path))  # a checkpoint directory
    assert from_file.total_params == KNOWN_MODELS["qwen3-30b-a3b"].total_params
    assert load_model("Qwen/Qwen3-30B-A3B-Instruct") is KNOWN_MODELS["qwen3-30b-a3b"]
    del cfg["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError, match="vocab_size"):
        load_model(str(tmp_path / "config.json"))
    with pytest.raises(PlanError, match="Nope-1B"):
        load_model("Nope-1B")


def test_kv_cache_bytes_per_token():
    m = load_model("Qwen2.5-7B")  # 28 layers, 4 kv heads x 128
    assert m.kv_bytes_per_token() == 28 * 4 * 128 * 2 * 2 == 57344
    assert m.kv_bytes_per_token(tp=2) == 28672
    assert m.kv_bytes_per_token(tp=8) == 28 * 1 * 128 * 2 * 2  # heads replicated beyond tp = kv heads


# --------------------------------------------------------------------------------------------------- memory terms
P7 = 7_615_616_512  # Qwen2.5-7B parameters


def test_states_and_distributed_optimizer():
    m = load_model("Qwen2.5-7B")
    sharded = train_memory(m, Parallel(dp=4), 1000, TrainSetup(recompute=True))
    assert sharded["weights"] == pytest.approx(2 * P7 / GiB)  # 14.18 GiB bf16
    assert sharded["grads"] == pytest.approx(4 * P7 / GiB)  # fp32
    assert sharded["optimizer"] == pytest.approx(12 * P7 / 4 / GiB)  # 21.27 GiB over dp=4
    full = train_memory(m, Parallel(dp=4), 1000, TrainSetup(recompute=True, distributed_optimizer=False))
    assert full["optimizer"] == pytest.approx(4 * sharded["optimizer"])
    offload = train_memory(m, Parallel(dp=4), 1000, TrainSetup(optimizer_offload=True))
    assert offload["optimizer"] == 0
    fsdp = train_memory(m, Parallel(dp=8), 1000, TrainSetup(backend="fsdp"))
    assert fsdp["weights"] + fsdp["optimizer"] == pytest.approx(12 * P7 / 8 / GiB)  # fp32 master + Adam, sharded


def test_activations_by_hand():
    m = load_model("Qwen2.5-7B")  # h 3584, q 3584, kv 512, I 18944, 28 heads, bf16 (c = 2)
    # Megatron, per token and layer (local spec): norms 2*2*2h + bias-dropout-adds 2*(2+1)h = 14h = 50176;
    # attention 2*(q + 2kv + q + kv + 2kv + (2q - 2kv) + q + q) = 2*(6q + 3kv) = 46080, + 4*28 LSE = 46192;
    # MLP 2*3I = 113664 -> 210032
    layer = 210032
    no_rc = train_memory(m, Parallel(), 1000, TrainSetup(recompute=False, mb_tokens=1000))
    embed_out = 1000 * 2 * 3584
    backward = 1000 * 2 * 3 * 18944  # one layer's backward: gradients of the MLP interior (fc2 input, gate, up)
    assert no_rc["activations"] == pytest.approx((1000 * layer * 28 + backward + embed_out) / GiB)  # 5.59 GiB
    assert no_rc["logits"] == pytest.approx(1000 * 152064 * 22 / GiB)  # the full path: 22 B per token x vocab
    rc = train_memory(m, Parallel(), 1000, TrainSetup(recompute=True, mb_tokens=1000))
    # the layer inputs; the recomputed layer (210 MB) is smaller than the logits (3.3 GB) freed before it
    assert rc["activations"] == pytest.approx((1000 * 2 * 3584 * 28 + embed_out) / GiB)
    # tp=4 without transformer-engine: no sequence parallelism, the h-sized terms are replicated
    tp4 = train_memory(m, Parallel(tp=4), 1000, TrainSetup(recompute=False, mb_tokens=1000))
    tp4_layer = 50176 + (46080 + 112 + 113664) / 4
    assert tp4["activations"] == pytest.approx((1000 * 28 * tp4_layer + backward / 4 + embed_out) / GiB)
    assert tp4["logits"] == pytest.approx(no_rc["logits"] / 4)  # vocabulary-parallel head
    te4 = train_memory(m, Parallel(tp=4), 1000, TrainSetup(recompute=False, mb_tokens=1000, te=True))
    assert te4["activations"] < tp4["activations"] * 0.6  # sequence parallelism with transformer-engine
    cp2 = train_memory(m, Parallel(cp=2), 1000, TrainSetup(recompute=False, mb_tokens=1000, te=True))
    assert cp2["activations"] == pytest.approx(no_rc["activations"] / 2)
    # 1F1B with pp=2: stage 0 keeps 2 micro-batches of 14 layers; the last stage 1 micro-batch plus the logits
    first = train_memory(m, Parallel(pp=2), 1000, TrainSetup(recompute=False, mb_tokens=1000), "first")
    last = train_memory(m, Parallel(pp=2), 1000, TrainSetup(recompute=False, mb_tokens=1000), "last")
    assert first["activations"] == pytest.approx((2 * 1000 * layer * 14 + backward + embed_out) / GiB)
    assert last["logits"] == pytest.approx(no_rc["logits"]) and first["logits"] == 0
    # the fused chunked logprob path (#16): one 2048-token chunk x 8 B + the hidden states, not tokens x vocab
    chunked = train_memory(m, Parallel(), 20000, TrainSetup(recompute=True, mb_tokens=20000, logprob_chunk=2048))
    assert chunked["logits"] == pytest.approx((2048 * 152064 * 8 + 20000 * 2 * 3584 + 4 * 152064 * 3584) / GiB)


def test_fsdp_mixed_precision_states():
    m = load_model("Qwen2.5-7B")
    t = TrainSetup("fsdp", recompute=True, mb_tokens=1000)
    one = train_memory(m, Parallel(), 1000, t)
    assert one["weights"] + one["optimizer"] == pytest.approx(12 * P7 / GiB)  # fp32 master + Adam m, v
    # gradients are allocated during the backward; at the peak all 4*P outweigh the activations here
    assert one["grads"] == pytest.approx(4 * P7 / GiB - one["activations"] - one["logits"])
    assert one["fsdp_gather"] == pytest.approx(2 * P7 / GiB)  # one rank: a whole bf16 copy of the fp32 master
    eight = train_memory(m, Parallel(dp=8), 1000, t)
    attn = 3584 * 3584 * 2 + 2 * 3584 * 512 + 3584 + 2 * 512 + 2 * 3584
    gather = 2 * (3 * (attn + 3 * 3584 * 18944) + 2 * 152064 * 3584)  # 2 bf16 layers + 1 layer's grads + root
    assert eight["fsdp_gather"] == pytest.approx(gather / GiB)
    old = train_memory(m, Parallel(), 1000, TrainSetup("fsdp", mb_tokens=1000, master_fp32=False))
    assert old["weights"] == pytest.approx(2 * P7 / GiB) and old["fsdp_gather"] == 0  # bf16 params, no casts


def test_trainer_peak_memory_from_a_config():
    from pipeline.plan import trainer_peak_memory

    hf = {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
          "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True}  # fmt: skip
    cfg = load_config(CONFIGS / "qwen2.5-1.5b-1gpu.yaml", ["trainer.recompute=false", "trainer.backend=megatron"])
    out = trainer_peak_memory(hf, cfg, 16384)
    terms = ("weights", "grads", "optimizer", "activations", "logits")
    assert out["allocated"] == pytest.approx(sum(out[k] for k in terms))
    assert out["total"] == pytest.approx(out["allocated"] + out["runtime"] + out["fragmentation"])
    chunk = getattr(cfg.trainer, "logprob_chunk_tokens", 0)
    if chunk:  # #16's fused head: one chunk's logits x 8 B, the hidden states, the fp32 head-weight gradient
        assert out["logits"] == pytest.approx(chunk * 151936 * 8 + 16384 * 2 * 1536 + 4 * 151936 * 1536)
    else:  # the full path: 22 B per token and vocabulary entry (51 GiB); the H200 measurement of #16 (micro-batches
        # of 4 rows of 272-4096 tokens, so at most 16k tokens) peaked at 90 GiB, a full 16k micro-batch bounds it
        assert out["logits"] / GiB == pytest.approx(16384 * 151936 * 22 / GiB)
        assert 90 < out["allocated"] / GiB < 130


def test_engine_memory_by_hand():
    m = load_model("Qwen2.5-7B")
    e = engine_memory(m, EngineSetup(tp=2, mem_fraction=0.8), 10000, 80)
    assert e["weights"] == pytest.approx(P7 / GiB)  # 2 B x P / tp 2
    assert e["reserved"] == pytest.approx(64.0)
    assert e["kv_min"] == pytest.approx(28672 * 10000 / GiB)
    assert e["kv_tokens"] == pytest.approx((64.0 - P7 / GiB) * GiB / 28672)


def test_decode_model_memory_bound_by_hand():
    m = load_model("Qwen2.5-0.5B")
    tps, batch = decode_tokens_per_s(m, EngineSetup(), GPUS["h100"], 80, 100, 100, max_running=1)
    # one sequence at mean context 150: read 2 B x 494,032,768 weights + 150 x 12288 B of KV per token,
    # at 70% of 3.35 TB/s (the FLOP side is ~2 us, far below)
    assert batch == 1
    assert tps == pytest.approx(3.35e12 * 0.7 / (2 * 494_032_768 + 150 * 12288))  # ~2369 tokens/s
    faster, _ = decode_tokens_per_s(m, EngineSetup(), GPUS["h200"], 80, 100, 100, max_running=1)
    assert faster > tps


def test_infeasible_layouts_are_rejected():
    slime32 = dict(train=TrainSetup(mb_tokens=20480, optimizer_offload=True), engine=EngineSetup(8, 0.7),
                   placement="time-shared")  # fmt: skip
    assert check_feasible("Qwen3-32B", Parallel(tp=8), 8, 64, 9216, **slime32).ok
    # without the CPU optimizer: 4.1B params per rank x (2 + 4 + 12) B = 69 GiB + activations > 64 GiB
    no_offload = dict(slime32, train=TrainSetup(mb_tokens=20480))
    f = check_feasible("Qwen3-32B", Parallel(tp=8), 8, 64, 9216, **no_offload)
    assert not f.ok and any(p.startswith("train:") for p in f.problems)
    f = check_feasible("Qwen2.5-7B", Parallel(tp=8), 16, 80, 4096, engine=EngineSetup(tp=1))
    assert any("num_key_value_heads=4" in p for p in f.problems)  # megatron query groups
    f = check_feasible("Qwen2.5-32B", Parallel(tp=8), 9, 80, 4096, engine=EngineSetup(tp=1, mem_fraction=0.7))
    assert any(p.startswith("engine:") for p in f.problems)  # 61 GiB of bf16 weights > 0.7 x 80 GiB
    f = check_feasible("Qwen3-30B-A3B", Parallel(tp=2, ep=4), 4, 80, 4096, engine=EngineSetup(tp=2))
    assert any("ep*etp=4 must divide" in p for p in f.problems)


# --------------------------------------------------------------------------------------------------- published setups
@dataclass
class Published:
    """A released RL training configuration: facts recorded from the named file (not copied text)."""

    source: str
    model: str
    gpus: int
    gpu_mem: float
    seq_len: int  # prompt + response budget
    parallel: Parallel
    train: TrainSetup
    engine: EngineSetup
    placement: str  # time-shared = the framework's colocation (slime --colocate, verl hybrid engine)
    # train: backend megatron with full recompute unless stated; mb_tokens = one micro-batch before the cp split
    train_gpus: int = 0  # disaggregated: GPUs of the trainer
    gpu: str = "h100"
    optimizer_offload: bool = False
    notes: str = field(default="")


PUBLISHED = [
    Published("THUDM/slime scripts/run-qwen3-4B.sh", "Qwen3-4B", 8, 80, 8192 + 1024,
              Parallel(tp=2, dp=4), TrainSetup(mb_tokens=9216, te=True), EngineSetup(tp=2, mem_fraction=0.7), "time-shared",
              notes="SP, full recompute, max-tokens-per-gpu 9216, 2 GPUs per SGLang engine"),
    Published("THUDM/slime scripts/run-qwen3-30B-A3B.sh", "Qwen3-30B-A3B", 8, 80, 8192 + 1024,
              Parallel(tp=4, ep=8, etp=1, dp=2), TrainSetup(mb_tokens=20480, optimizer_offload=True, te=True),
              EngineSetup(tp=8, mem_fraction=0.7), "time-shared", optimizer_offload=True,
              notes="EP 8, optimizer CPU offload, max-tokens-per-gpu 20480"),
    Published("THUDM/slime scripts/run-qwen3-235B-A22B.sh", "Qwen3-235B-A22B", 128, 80, 8192 + 1024,
              Parallel(tp=4, pp=4, cp=2, ep=16, etp=1, dp=2),
              TrainSetup(mb_tokens=2 * 16384, optimizer_offload=True, te=True),
              EngineSetup(tp=32, mem_fraction=0.7, weight_bytes=1), "disaggregated", train_gpus=64,
              optimizer_offload=True, notes="8x8 actor GPUs + 64 rollout GPUs, FP8 engine weights, 32 GPUs/engine"),
    Published("THUDM/slime scripts/run-qwen3-32B.sh", "Qwen3-32B", 8, 80, 8192 + 1024,
              Parallel(tp=8), TrainSetup(mb_tokens=20480, optimizer_offload=True), EngineSetup(tp=8, mem_fraction=0.7),
              "time-shared", optimizer_offload=True),
    Published("THUDM/slime scripts/run-llama3.1-8B.sh", "Llama-3.1-8B", 4, 80, 256 + 1792,
              Parallel(tp=2, dp=2), TrainSetup(mb_tokens=9216), EngineSetup(tp=1, mem_fraction=0.8), "time-shared"),
    Published("THUDM/slime scripts/run-qwen3-0.6B-single-gpu.sh", "Qwen3-0.6B", 1, 80, 512 + 512,
              Parallel(), TrainSetup(recompute=False, mb_tokens=4096), EngineSetup(tp=1, mem_fraction=0.45),
              "time-shared"),
    Published("volcengine/verl recipe/dapo/run_dapo_qwen2.5_32b.sh", "Qwen2.5-32B", 128, 96, 2048 + 20480,
              Parallel(cp=8, dp=16), TrainSetup("fsdp", mb_tokens=22528 * 8, ulysses=True, logprob_chunk=2048),
              EngineSetup(tp=4, mem_fraction=0.8),
              "time-shared", gpu="h20",
              notes="the DAPO run: 16 nodes of H20, FSDP + Ulysses sp=8, param/optimizer offload between phases"),
    Published("volcengine/verl examples/grpo_trainer/run_qwen2_5-7b_math.sh", "Qwen2.5-7B-Instruct", 16, 80,
              1024 + 1024, Parallel(dp=16), TrainSetup("fsdp", mb_tokens=16 * 2048, offload_in_gen=False, logprob_chunk=2048),
              EngineSetup(tp=2, mem_fraction=0.6), "time-shared", notes="micro-batch 16 per GPU, no offload"),
    Published("volcengine/verl examples/grpo_trainer/run_qwen2_5-7b_math_megatron.sh", "Qwen2.5-7B-Instruct", 16,
              80, 1024 + 1024, Parallel(tp=4, pp=2, vpp=2, dp=2), TrainSetup(mb_tokens=4 * 2048, offload_in_gen=False),
              EngineSetup(tp=2, mem_fraction=0.6), "time-shared"),
    Published("volcengine/verl examples/grpo_trainer/run_qwen3moe-30b_megatron.sh", "Qwen3-30B-A3B", 32, 80,
              1024 + 2048, Parallel(tp=4, pp=2, ep=4, etp=4, dp=4), TrainSetup(mb_tokens=4 * 3072, offload_in_gen=False),
              EngineSetup(tp=4, mem_fraction=0.6), "time-shared", notes="etp unset -> Megatron uses etp = tp"),
    Published("volcengine/verl examples/grpo_trainer/run_qwen3-236b_megatron.sh", "Qwen3-235B-A22B", 256, 96,
              2048 + 4096, Parallel(tp=4, pp=8, ep=4, etp=4, dp=8), TrainSetup(mb_tokens=6144),
              EngineSetup(tp=8, mem_fraction=0.8), "time-shared", gpu="h20",
              notes="32 nodes of H20, param/grad/optimizer offload between phases"),
    Published("inclusionAI/AReaL examples/math/gsm8k_grpo.yaml", "Qwen2.5-1.5B-Instruct", 8, 80, 1024 + 1024,
              Parallel(dp=4), TrainSetup("fsdp", mb_tokens=10240), EngineSetup(tp=1, mem_fraction=0.8),
              "disaggregated", train_gpus=4, notes="allocation sglang:d4p1t1+d4p1t1"),
    Published("inclusionAI/AReaL examples/math/gsm8k_grpo_megatron.yaml", "Qwen2.5-1.5B-Instruct", 8, 80,
              1024 + 1024, Parallel(dp=4), TrainSetup(recompute=False, mb_tokens=10240),
              EngineSetup(tp=1, mem_fraction=0.8), "disaggregated", train_gpus=4),
    Published("inclusionAI/AReaL examples/math/boba_grpo.yaml", "DeepSeek-R1-Distill-Qwen-1.5B", 8, 80, 1024 + 8192,
              Parallel(dp=4), TrainSetup("fsdp", mb_tokens=16384), EngineSetup(tp=1, mem_fraction=0.9),
              "disaggregated", train_gpus=4, notes="allocation vllm:d4+d4"),
    Published("inclusionAI/AReaL docs/tutorial/megatron.md (Qwen3-30B-A3B example)", "Qwen3-30B-A3B", 32, 80,
              1024 + 1024, Parallel(tp=2, pp=4, cp=2, ep=4, etp=1, dp=1), TrainSetup(recompute=False, mb_tokens=10240, te=True),
              EngineSetup(tp=4, mem_fraction=0.8), "disaggregated", train_gpus=16,
              notes="sglang d4t4 + megatron attn:d1p4t2c2|ffn:d1p4t1e4 (MoE parallel folding)"),
]  # fmt: skip


@pytest.mark.parametrize("pub", PUBLISHED, ids=lambda p: p.source.split()[-1].split("/")[-1])
def test_published_setups_are_feasible(pub):
    f = check_feasible(pub.model, pub.parallel, pub.gpus, pub.gpu_mem, pub.seq_len, train=pub.train,
                       engine=pub.engine, placement=pub.placement, train_gpus=pub.train_gpus)  # fmt: skip
    assert f.ok, f"{pub.source}: {f.problems}"
    assert 0 < f.peak_gb <= pub.gpu_mem
    assert f.breakdown["train/total"] > f.breakdown["train/weights"] > 0


@pytest.mark.parametrize("pub", PUBLISHED, ids=lambda p: p.source.split()[-1].split("/")[-1])
def test_proposals_are_feasible_for_published_model_and_gpus(pub):
    mode = "colocated" if pub.gpus == 1 else "disaggregated"
    plan = propose(pub.model, pub.gpus, pub.gpu_mem, pub.seq_len, mode=mode, gpu=pub.gpu,
                   prompt_len=pub.seq_len // 4, allow_offload=pub.optimizer_offload)  # fmt: skip
    f = check_feasible(plan.model, plan.parallel, pub.gpus, pub.gpu_mem, pub.seq_len, train=plan.train,
                       engine=plan.engine, placement=plan.placement, train_gpus=plan.train_gpus)  # fmt: skip
    assert f.ok, f.problems
    assert plan.parallel.world == plan.train_gpus
    assert 512 % plan.parallel.dp == 0  # the default mini-batch of 512 samples splits over dp
    if plan.placement == "disaggregated":
        assert plan.train_gpus + plan.num_engines * plan.engine.tp <= pub.gpus
        assert plan.gen_tokens_per_s > 0 and plan.train_tokens_per_s > 0
    if not pub.optimizer_offload:
        assert not plan.train.optimizer_offload


def test_nothing_fits_raises_a_clear_error():
    with pytest.raises(PlanError, match="does not fit|no engine"):
        propose("Qwen3-235B-A22B", 8, 80, 8192)
    with pytest.raises(PlanError, match="colocated"):
        propose("Qwen2.5-0.5B", 1, 80, 4096)  # disaggregated needs 2 GPUs


# --------------------------------------------------------------------------------------------------- configs + CLI
def test_written_config_loads_and_matches_the_plan(tmp_path):
    plan = propose("Qwen2.5-7B", 16, 80, 6144, prompt_len=2048, samples_per_minibatch=512)
    out = write_config(plan, tmp_path / "q7.yaml", model_path="/ckpt/Qwen2.5-7B")
    cfg = load_config(out)
    p = cfg.trainer.parallel
    assert (p.tp, p.pp, p.cp, p.dp) == (plan.parallel.tp, plan.parallel.pp, plan.parallel.cp, plan.parallel.dp)
    assert cfg.trainer.world_size == plan.train_gpus and cfg.trainer.backend == plan.train.backend
    assert (cfg.engine.num_engines, cfg.engine.tp) == (plan.num_engines, plan.engine.tp)
    assert cfg.model.path == "/ckpt/Qwen2.5-7B" and cfg.rollout.max_new_tokens == 4096
    assert cfg.algorithm.overlong.cache_len < cfg.rollout.max_new_tokens
    assert cfg.trainer.lr == 1e-6 and cfg.algorithm.eps_high == 0.28  # from the preset chain via base:
    assert "base:" in out.read_text() and "# trainer" in out.read_text()


def test_colocated_config_shares_gpus(tmp_path):
    plan = propose("Qwen2.5-0.5B", 1, 80, 6144, mode="colocated", prompt_len=2048, samples_per_minibatch=256)
    cfg = load_config(write_config(plan, tmp_path / "c.yaml"))
    assert cfg.weight_sync.mode == "colocated"
    assert cfg.trainer.gpus_per_rank + cfg.engine.gpus_per_engine == 1.0
    assert 0.3 <= cfg.engine.mem_fraction <= 0.85
    f = check_feasible(plan.model, plan.parallel, 1, 80, 6144, train=plan.train, engine=plan.engine,
                       placement="space-shared")  # fmt: skip
    assert f.ok and f.peak_gb <= 80 * 0.92


def test_plan_main(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert plan_main(["--model", "Qwen3-30B-A3B", "--gpus", "16", "--seq-len", "8192", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trainer" in text and "engines" in text and "ep=" in text
    assert load_config(out).trainer.parallel.ep > 1
    assert plan_main(["--model", "Nope-7B", "--gpus", "8"]) == 2
    assert "Nope-7B" in capsys.readouterr().err
    assert plan_main(["--check", str(CONFIGS / "qwen2.5-7b-8gpu.yaml")]) == 0
    assert math.isfinite(float(capsys.readouterr().out.split("peak per GPU ")[1].split(" /")[0]))


# --------------------------------------------------------------------------------------------------- the recipes of #21
def _pub(source_end):
    return next(p for p in PUBLISHED if p.source.endswith(source_end))


def test_verl_dapo_32b_on_128_h20_explained():
    from pipeline.plan import explain_difference

    pub = _pub("run_dapo_qwen2.5_32b.sh")
    plan = propose(pub.model, pub.gpus, pub.gpu_mem, pub.seq_len, gpu="h20", prompt_len=2048)
    assert plan.feasibility.ok and plan.train_gpus + plan.num_engines * plan.engine.tp <= 128
    why = explain_difference(plan, pub.parallel, pub.train, pub.engine, pub.placement)
    assert "Ulysses" in why and "placement disaggregated instead of time-shared" in why
    assert 0 <= plan.idle_fraction < 1 and plan.demand == pytest.approx(1 / 0.5 + 0.5 * 0.5 * 0.5)


@pytest.mark.parametrize("script", ["run-qwen3-30B-A3B.sh", "run-qwen3-32B.sh"])
def test_slime_8_gpu_recipes_take_the_shared_layout(script):
    from pipeline.plan import explain_difference

    pub = _pub(script)
    try:  # without optimizer offload the resident states leave little room; with the full logprob path, none
        plan = propose(pub.model, 8, 80, pub.seq_len, mode="colocated", prompt_len=1024)
    except PlanError as e:
        assert "does not fit" in str(e)
        plan = propose(pub.model, 8, 80, pub.seq_len, mode="colocated", prompt_len=1024, allow_offload=True)
    # the recipes' layout: one multi-GPU engine set on the trainer's GPUs, memory released while training
    assert plan.placement == "time-shared" and plan.engine.tp > 1 and plan.feasibility.ok
    why = explain_difference(plan, pub.parallel, pub.train, pub.engine, pub.placement)
    assert "offload" in why
    # the shared multi-GPU layout is a config now; only optimizer offload (30B-A3B on 80 GiB) is not
    assert (
        plan.config_error.startswith("optimizer CPU offload") if plan.train.optimizer_offload else not plan.config_error
    )
    # with 141 GiB the same model fits without offload
    h200 = propose(pub.model, 8, 141, pub.seq_len, mode="colocated", prompt_len=1024, gpu="h200")
    assert h200.feasibility.ok and not h200.train.optimizer_offload


def test_verl_30b_a3b_on_32_gpus_explained():
    from pipeline.plan import explain_difference

    pub = _pub("run_qwen3moe-30b_megatron.sh")
    plan = propose(pub.model, 32, 80, pub.seq_len, prompt_len=1024)
    assert plan.feasibility.ok and plan.train.backend == "megatron"  # MoE: megatron only
    assert plan.engine.tp <= 8 and plan.parallel.tp <= 8
    why = explain_difference(plan, pub.parallel, pub.train, pub.engine, pub.placement)
    assert "placement disaggregated instead of time-shared" in why and "instead of" in why


def test_candidates_validate_and_unsizable_models_are_refused(tmp_path):
    # cp > 1 needs transformer-engine: without it no proposal uses cp (every written config validates)
    plan = propose("Qwen2.5-32B", 128, 96, 22528, gpu="h20", prompt_len=2048, te=False)
    assert plan.parallel.cp == 1 and not plan.config_error
    load_config(write_config(plan, tmp_path / "p.yaml"))
    # engines never span more GPUs than a node has
    big = propose("Qwen3-235B-A22B", 256, 141, 8192, gpu="h200", allow_offload=True)
    assert big.engine.tp <= 8
    mla = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
           "kv_lora_rank": 512, "q_lora_rank": 1536, "vocab_size": 129280}  # fmt: skip
    with pytest.raises(PlanError, match="deepseek_v3"):
        model_from_hf_config(mla)
    with pytest.raises(PlanError, match="kv_lora_rank"):
        model_from_hf_config({**mla, "model_type": "qwen2"})


def test_pipeline_stages_show_the_last_stage_logits():
    from pipeline.plan import explain

    plan = propose("Qwen2.5-32B", 128, 96, 22528, gpu="h20", prompt_len=2048)
    f = check_feasible(plan.model, Parallel(tp=8, pp=2, dp=4), 128, 96, 22528, train=TrainSetup(mb_tokens=22528),
                       engine=EngineSetup(tp=4), train_gpus=64)  # fmt: skip
    assert f.breakdown["train/logits"] == 0 and f.breakdown["train_last/logits"] > 5
    row = next(line for line in explain(plan).splitlines() if "logits" in line)
    assert float(row.split()[-1]) > 0


# --------------------------------------------------------------------------------------------------- throughput terms
def test_generation_demand_tail_and_sync_by_hand():
    from pipeline.plan import decode_tail_efficiency, generation_demand, weight_sync_seconds

    # keep rate 1/3 (verl's DAPO recipe generates 3x the batch): 3 groups per kept one, + half the 0.5 x batch
    # over-admitted surplus finishing kept (1/3) and thrown away
    assert generation_demand(1 / 3, 0.5) == pytest.approx(3 + 0.5 * 0.5 / 3)
    assert generation_demand(1.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="keep_rate"):
        generation_demand(0.0)
    assert decode_tail_efficiency(0, "wait", tail_ratio=4.0) == 0.25  # synchronous: slots idle until the longest
    assert decode_tail_efficiency(1, "abort", tail_ratio=4.0) == pytest.approx(1 - 0.5 * 0.75)
    assert decode_tail_efficiency(1, "resume") == 1.0
    assert weight_sync_seconds(10**9, 2.0, "nccl-inter-node") == pytest.approx(2e9 / 20e9)  # 0.1 s per 1B params


def test_pipeline_rate_and_idle_fraction_by_hand():
    plan = propose("Qwen2.5-7B", 16, 80, 6144, prompt_len=2048, samples_per_minibatch=512)
    gen, train = plan.useful_gen_tokens_per_s, plan.train_tokens_per_s
    assert gen == pytest.approx(plan.gen_tokens_per_s / plan.demand)
    step = max(plan.step_tokens / gen + plan.sync_s, plan.step_tokens / train)
    assert plan.pipeline_tokens_per_s == pytest.approx(plan.step_tokens / step)
    t_gen, t_train = plan.step_tokens / gen + plan.sync_s, plan.step_tokens / train
    assert plan.idle_fraction == pytest.approx(1 - min(t_gen, t_train) / max(t_gen, t_train))
    assert plan.step_tokens == 512 * (6144 - 2048) / 2


def test_time_shared_memory_phases_by_hand():
    m = load_model("Qwen2.5-7B")
    par, t = Parallel(tp=2, pp=4), TrainSetup(recompute=False, mb_tokens=10240, offload_in_gen=False)
    e = EngineSetup(tp=2, mem_fraction=0.5)
    f = check_feasible(m, par, 8, 80, 10240, train=t, engine=e, placement="time-shared")
    b = f.breakdown
    train = b["train/total"] + 1.5  # + what a released engine keeps (context, buffers)
    generate = 0.5 * 80 + 3.0 + b["train/weights"] + b["train/grads"] + b["train/optimizer"] + b["train/runtime"]
    assert f.peak_gb == pytest.approx(max(train, generate))


@pytest.mark.parametrize(
    ("model", "gpus", "mem", "gpu", "seq_len", "prompt_len"),
    [("Qwen2.5-32B", 8, 80, "h100", 9216, 1024), ("Qwen3-30B-A3B", 8, 141, "h200", 9216, 1024),
     ("Qwen2.5-32B", 128, 96, "h20", 22528, 2048)],  # the last: verl's DAPO 32B run on 16 nodes of H20
    ids=["32b-8xh100", "30b-a3b-8xh200", "32b-128xh20"],
)  # fmt: skip
def test_colocated_multi_gpu_engines_are_written_and_validate(tmp_path, model, gpus, mem, gpu, seq_len, prompt_len):
    from pipeline.config import layout

    plan = propose(model, gpus, mem, seq_len, mode="colocated", gpu=gpu, prompt_len=prompt_len)
    assert plan.placement == "time-shared" and plan.engine.tp > 1 and not plan.config_error
    out = write_config(plan, tmp_path / "x.yaml")
    cfg = load_config(out)
    k = plan.engine.tp
    assert cfg.weight_sync.mode == "colocated" and cfg.weight_sync.release_memory
    assert (cfg.engine.tp, cfg.engine.gpus_per_engine, cfg.engine.num_engines) == (k, k, gpus // k)
    assert cfg.trainer.world_size == gpus and cfg.trainer.gpus_per_rank == 1.0
    assert layout(cfg).engine_span == k <= cfg.cluster.gpus_per_node == 8
    assert f"engine j serves with tp={k}" in out.read_text()
