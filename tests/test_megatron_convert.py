"""HF <-> megatron conversion: hand-checked layouts, and bit-exact round trips for tp, pp in {1, 2} (+ vpp, EP)."""

from __future__ import annotations

import pytest
import torch

from engines.megatron.convert import (
    ArchInfo,
    arch_from_hf,
    chunk_layers,
    hf_to_megatron,
    megatron_to_hf,
    padded_vocab_size,
    split_for_tp,
)


def _arch(**kw) -> ArchInfo:
    base = dict(
        model_type="qwen2", num_layers=4, hidden_size=1, num_heads=4, num_kv_heads=2, head_dim=1, ffn_hidden_size=4,
        vocab_size=10, padded_vocab_size=16, tie_word_embeddings=False, qkv_bias=True, qk_norm=False,
    )  # fmt: skip
    base.update(kw)
    return ArchInfo(**base)


def test_padded_vocab_size():
    assert padded_vocab_size(200, 128, 1) == 256
    assert padded_vocab_size(256, 128, 2) == 256
    assert padded_vocab_size(257, 128, 2) == 512
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 2) == 152064  # Qwen2 vocabulary at TP=2


def test_qkv_interleaved_per_group_and_split_by_groups():
    arch = _arch()
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # 4 query heads, head_dim 1
    k = torch.tensor([[10.0], [11.0]])  # 2 key/value groups
    v = torch.tensor([[20.0], [21.0]])
    r0, r1 = split_for_tp("qkv", [q, k, v], arch, tp=2)
    # group g = [its query heads, k_g, v_g]; TP rank r holds group r
    assert r0.flatten().tolist() == [0.0, 1.0, 10.0, 20.0]
    assert r1.flatten().tolist() == [2.0, 3.0, 11.0, 21.0]
    (full,) = split_for_tp("qkv", [q, k, v], arch, tp=1)
    assert full.flatten().tolist() == [0.0, 1.0, 10.0, 20.0, 2.0, 3.0, 11.0, 21.0]
    bias = split_for_tp("qkv", [q[:, 0], k[:, 0], v[:, 0]], arch, tp=2)
    assert bias[1].tolist() == [2.0, 3.0, 11.0, 21.0]


def test_gate_up_fused_per_rank_and_vocab_padding():
    arch = _arch()
    gate = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    up = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    r0, r1 = split_for_tp("gate_up", [gate, up], arch, tp=2)
    assert r0.flatten().tolist() == [0.0, 1.0, 10.0, 11.0]
    assert r1.flatten().tolist() == [2.0, 3.0, 12.0, 13.0]
    emb = torch.arange(10.0).unsqueeze(1) + 1
    s0, s1 = split_for_tp("vocab", [emb], arch, tp=2)  # padded 10 -> 16 rows, 8 per rank
    assert s0.flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert s1.flatten().tolist() == [9, 10, 0, 0, 0, 0, 0, 0]
    o0, o1 = split_for_tp("row", [torch.arange(8.0).view(2, 4)], arch, tp=2)
    assert o0.tolist() == [[0, 1], [4, 5]] and o1.tolist() == [[2, 3], [6, 7]]


def test_layer_placement_matches_megatron_uniform_split():
    arch = _arch(num_layers=8)
    assert chunk_layers(arch, pp=2, vpp=1, pp_rank=1, vp_stage=0) == range(4, 8)
    # interleaved: chunk v of rank r starts at v * L / vpp + r * L / (pp * vpp)
    assert chunk_layers(arch, pp=2, vpp=2, pp_rank=0, vp_stage=1) == range(4, 6)
    assert chunk_layers(arch, pp=2, vpp=2, pp_rank=1, vp_stage=0) == range(2, 4)


def _hf_state(model_type: str, tie: bool) -> tuple[dict[str, torch.Tensor], object]:
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 12} if model_type == "qwen3" else {}
    config = AutoConfig.for_model(
        model_type, vocab_size=203, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # every tensor distinct, biases and norms included
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight", None)
    return sd, config


@pytest.mark.parametrize(("model_type", "tie"), [("qwen2", True), ("qwen3", False), ("llama", False)])
@pytest.mark.parametrize(("tp", "pp", "vpp"), [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 2, 2)])
@pytest.mark.parametrize("te", [False, True])
def test_round_trip_is_bit_exact(model_type, tie, tp, pp, vpp, te):
    sd, config = _hf_state(model_type, tie)
    arch = arch_from_hf(config, make_vocab_size_divisible_by=128, tp=tp)
    assert arch.padded_vocab_size == 256
    back: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp):
        for v in range(vpp):
            kw = dict(pp_rank=pp_rank, pp=pp, vp_stage=v, vpp=vpp, te=te)
            shards = [hf_to_megatron(sd.__getitem__, arch, tp_rank=r, tp=tp, **kw) for r in range(tp)]
            if v == 0 and pp_rank == 0:
                emb = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
                assert emb.shape[0] == 256 and not emb[203:].any()  # zero padding rows
            part = megatron_to_hf(shards, arch, **kw)
            assert not set(part) & set(back), "two chunks emitted the same tensor"
            back.update(part)
    assert set(back) == set(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_moe_round_trip_with_expert_parallelism():
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=4,
    )  # fmt: skip
    arch = arch_from_hf(config, tp=2)
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    shapes = {"model.embed_tokens.weight": (100, 16), "model.norm.weight": (16,), "lm_head.weight": (100, 16)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        for n, s in {
            "self_attn.q_proj.weight": (16, 16), "self_attn.k_proj.weight": (8, 16), "self_attn.v_proj.weight": (8, 16),
            "self_attn.o_proj.weight": (16, 16), "self_attn.q_norm.weight": (4,), "self_attn.k_norm.weight": (4,),
            "input_layernorm.weight": (16,), "post_attention_layernorm.weight": (16,), "mlp.gate.weight": (4, 16),
        }.items():  # fmt: skip
            shapes[p + n] = s
        for e in range(4):
            shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (8, 16)
            shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (8, 16)
            shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (16, 8)
    names = list(shapes)
    sd = {n: torch.randn(shapes[n], generator=g) for n in names}
    back: dict[str, torch.Tensor] = {}
    for ep_rank in range(2):
        shards = [hf_to_megatron(sd.__getitem__, arch, tp_rank=r, tp=2, ep_rank=ep_rank, ep=2) for r in range(2)]
        assert "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight" in shards[0]
        assert "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight" not in shards[0]
        back.update(megatron_to_hf(shards, arch, ep_rank=ep_rank, ep=2))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # local expert 1 of EP rank 1 is global expert 3
    s = hf_to_megatron(sd.__getitem__, arch, tp_rank=0, tp=2, ep_rank=1, ep=2)
    got = s["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"]
    want = torch.cat(
        [sd["model.layers.1.mlp.experts.3.gate_proj.weight"][:4], sd["model.layers.1.mlp.experts.3.up_proj.weight"][:4]]
    )
    assert torch.equal(got, want)


def test_bad_parallelism_names_the_key():
    arch = _arch(num_kv_heads=2)
    with pytest.raises(ValueError, match="trainer.parallel.tp"):
        arch.check_parallel(tp=4, pp=1)
    with pytest.raises(ValueError, match="trainer.parallel.pp"):
        arch.check_parallel(tp=1, pp=3)
