"""Mixed precision on the torch (fsdp) backend with the bf16 preset's optimizer settings (configs/base/dapo.yaml):
fp32 master weights and AdamW state, bf16 compute, on one rank (bf16 compute copy) and on two (FSDP2
MixedPrecisionPolicy). A few steps at lr 1e-6 move essentially every master element (bf16 parameters moved ~0.4%),
the weights a sync sends are the master rounded to bf16, a checkpoint resumes exactly, and activation
recomputation changes nothing."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from engines.fsdp.backend import build_backend
from engines.megatron.launch import init_dist
from pipeline.flow.trainer import TrainWorker, make_step_batches
from tests.test_fsdp_trainer import _cfg, _groups, _model_dir, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _preset_cfg(world: int = 1, **over):
    """tiny-cpu with the bf16 preset's dtype and optimizer settings (constant LR: the preset after warm-up)."""
    preset = OmegaConf.load(os.path.join(ROOT, "configs/base/dapo.yaml"))
    t = preset.trainer
    settings = {
        "model.dtype": preset.model.dtype,
        "trainer.lr": t.lr,
        "trainer.weight_decay": t.weight_decay,
        "trainer.grad_clip": t.grad_clip,
        "trainer.warmup_steps": 0,
        "trainer.batch_size": 2,
        "rollout.n_samples_per_prompt": 4,
        "trainer.micro_batch_size": 2,
        "trainer.world_size": world,
    }
    if "betas" in t:
        settings["trainer.betas"] = f"[{t.betas[0]},{t.betas[1]}]"
    settings.update(over)
    return _cfg(**settings)


def _master(backend) -> dict[str, torch.Tensor]:
    """Full fp32 master weights under HF names (gathered from the shards on several ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if backend.world_size == 1:
        return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}
    sd = get_model_state_dict(backend.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def _train(backend, cfg, rank: int, world: int, steps: int = STEPS) -> list[dict]:
    worker = TrainWorker(cfg, backend)
    batches = make_step_batches(_groups(), cfg, world)
    return [worker.train_step([batches[0][rank]]) for _ in range(steps)]


def _moved_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    moved = sum(int((after[k] != before[k]).sum()) for k in before)
    return moved / sum(v.numel() for v in before.values())


def _check_sent_weights(backend, master: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a weight sync sends (named_hf_weights) is the master rounded to bf16, every tensor."""
    sent = dict(backend.named_hf_weights())
    assert sent, "the sync source sends weights"
    for name, t in sent.items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t.cpu(), master[name].cpu().to(torch.bfloat16)), name
    return sent


def _check_engine_receives(model_dir: str, sent: dict[str, torch.Tensor], master: dict[str, torch.Tensor]) -> None:
    """A bf16 CPU engine that loads the sent tensors holds the master rounded (its /weights_checksum hash)."""
    from transformers import AutoModelForCausalLM

    from engines.local.engine import Engine
    from pipeline.contracts.weight_wire import weights_checksum

    engine = Engine(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), max_running=1).start()
    try:
        names = sorted(sent)
        before = engine.checksum(names)
        engine.call(lambda: engine.load_tensors(list(sent.items()))).result(timeout=30)
        want = weights_checksum([(n, master[n].to(torch.bfloat16)) for n in names])
        assert engine.checksum(names) == want != before
    finally:
        engine.stop()


def test_one_rank_bf16_moves_every_master_weight_and_resumes(tmp_path):
    model_dir = _model_dir(tmp_path)
    cfg = _preset_cfg()
    assert cfg.model.dtype == "bfloat16" and cfg.trainer.lr == pytest.approx(1e-6)
    backend = build_backend(cfg, 0, 1)
    backend.setup(model_dir)
    assert all(p.dtype == torch.float32 for p in backend.model.parameters())
    before = _master(backend)
    metrics = _train(backend, cfg, 0, 1)
    assert all(m["grad_norm"] > 0 for m in metrics)
    after = _master(backend)
    assert _moved_fraction(before, after) > 0.99
    # Adam's first update is ~lr per element: the weights moved by about 1e-6 per step, not by bf16 steps.
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 2e-5
    states = [s for s in backend.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    _check_engine_receives(model_dir, _check_sent_weights(backend, after), after)

    # Checkpoint after the steps, one more step; a fresh backend resumed from the checkpoint makes the same step.
    backend.save(str(tmp_path / "ckpt"))
    _train(backend, cfg, 0, 1, steps=1)
    resumed = build_backend(cfg, 0, 1)
    resumed.setup(model_dir)
    resumed.load(str(tmp_path / "ckpt"))
    assert all(torch.equal(v, after[k]) for k, v in _master(resumed).items())
    _check_sent_weights(resumed, after)  # the compute copy follows the loaded master
    _train(resumed, cfg, 0, 1, steps=1)
    want, got = _master(backend), _master(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_recompute_changes_nothing(tmp_path):
    model_dir = _model_dir(tmp_path)
    out = []
    for recompute in (False, True):
        cfg = _preset_cfg(**{"model.dtype": "float32", "trainer.lr": 1e-3, "trainer.recompute": recompute})
        backend = build_backend(cfg, 0, 1)
        backend.setup(model_dir)
        calls = []  # counted in the forward itself: torch's checkpoint replays it without module hooks
        mlp = backend.compute.model.layers[0].mlp
        mlp.forward = lambda *a, _f=mlp.forward, _c=calls, **k: (_c.append(1), _f(*a, **k))[1]
        m = _train(backend, cfg, 0, 1, steps=2)
        out.append((m, _master(backend), len(calls)))
    (m0, w0, calls0), (m1, w1, calls1) = out
    assert calls1 == 2 * calls0 > 0  # recompute: each layer's forward runs again in the backward
    for a, b in zip(m0, m1, strict=True):
        assert a["pg_loss"] == pytest.approx(b["pg_loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=1e-5, atol=2e-5)


def _dp_worker(rank, world, port, model_dir, q):
    import torch.distributed as dist

    init_dist(rank, world, port)  # 1 thread, the rendezvous the parent holds
    cfg = _preset_cfg(world, **{"trainer.recompute": world > 1})  # DP=2 also runs FSDP2 + checkpointing
    backend = build_backend(cfg, rank, world)
    backend.setup(model_dir)
    before = _master(backend)
    metrics = _train(backend, cfg, rank, world)
    after = _master(backend)
    if rank == 0:
        _check_sent_weights(backend, after)
    else:
        assert not list(backend.named_hf_weights())
    if rank == 0:
        moved = _moved_fraction(before, after)
        delta = {k: (after[k] - before[k]).numpy().copy() for k in before}  # numpy: no fd sharing
        q.put(([m["grad_norm"] for m in metrics], [m["pg_loss"] for m in metrics], moved, delta))
    dist.destroy_process_group()


def test_fsdp2_bf16_matches_one_rank(tmp_path):
    model_dir = _model_dir(tmp_path)
    results = [run_ranks(_dp_worker, world, model_dir) for world in (1, 2)]
    (g1, l1, moved1, d1), (g2, l2, moved2, d2) = results
    assert moved1 > 0.99 and moved2 > 0.99
    # Same bf16 forward, gradients summed in fp32 either way: equal up to bf16 reduction-order noise.
    assert g1 == pytest.approx(g2, rel=2e-2)
    assert l1 == pytest.approx(l2, rel=2e-2, abs=1e-5)
    a = torch.cat([torch.from_numpy(d1[k]).flatten() for k in sorted(d1)]).double()
    b = torch.cat([torch.from_numpy(d2[k]).flatten() for k in sorted(d2)]).double()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95


def _megatron_worker(rank, world, port, tmp):
    from engines.megatron.backend import build_backend
    from engines.megatron.launch import init_dist
    from pipeline.algorithm.losses import make_loss_fn
    from pipeline.testing.megatron import random_micro_batches, tiny_config

    init_dist(rank, world, port)
    preset = OmegaConf.load(os.path.join(ROOT, "configs/base/dapo.yaml"))
    cfg = tiny_config(distributed_optimizer=False, lr=preset.trainer.lr, weight_decay=preset.trainer.weight_decay)
    cfg.model.dtype = preset.model.dtype
    backend = build_backend(cfg, rank, world)
    backend.setup(os.path.join(tmp, "hf"))
    (inner,) = getattr(backend.optimizer, "chained_optimizers", [backend.optimizer])
    model_params = [p for g in inner.float16_groups for p in g]  # bf16 model weights ...
    mains = [p for g in inner.fp32_from_float16_groups for p in g]  # ... and their fp32 master copies
    before = [p.detach().clone() for p in mains]
    mbs = random_micro_batches(2, 3, 200, seed=1)
    for _ in range(STEPS):
        backend.train_minibatch(mbs, make_loss_fn(cfg.algorithm))
    states = [s for s in inner.optimizer.state.values() if "exp_avg" in s]
    torch.save(
        {
            "model_dtypes": {p.dtype for p in model_params},
            "main_dtypes": {p.dtype for p in mains},
            "state_dtypes": {s[k].dtype for s in states for k in ("exp_avg", "exp_avg_sq")},
            "moved": sum(int((p != q).sum()) for p, q in zip(mains, before, strict=True)),
            "moved_or_zero": sum(int(((p != q) | (q == 0)).sum()) for p, q in zip(mains, before, strict=True)),
            "total": sum(p.numel() for p in mains),
            "rounded": all(torch.equal(m.to(torch.bfloat16), p) for m, p in zip(mains, model_params, strict=True)),
        },
        os.path.join(tmp, "megatron_mp.pt"),
    )


def test_megatron_bf16_keeps_fp32_master_weights(tmp_path):
    """Megatron already does it (Float16OptimizerWithFloat16Params): the same preset settings move essentially every
    master element but megatron's zero-initialised padded vocabulary rows, and the bf16 model weights (what
    named_hf_weights reads) are the master rounded."""
    from engines.megatron.launch import spawn
    from pipeline.testing.megatron import save_tiny_hf

    save_tiny_hf(str(tmp_path / "hf"), "qwen2", vocab_size=200, tie=True, seed=2, layers=2)
    spawn(_megatron_worker, 1, str(tmp_path), timeout_s=120)
    r = torch.load(tmp_path / "megatron_mp.pt")
    assert r["model_dtypes"] == {torch.bfloat16}
    assert r["main_dtypes"] == r["state_dtypes"] == {torch.float32}
    # Unmoved: the zero padding rows, and a few elements whose gradient is exactly 0 (decay alone is < half an ulp).
    assert r["moved_or_zero"] > 0.9999 * r["total"] and r["moved"] > 0.95 * r["total"]
    assert r["rounded"]
