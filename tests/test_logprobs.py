"""The fused output layer + log-softmax + gather + entropy (engines/logprobs.py): exact against the
float64 full-logits reference and the old logits helpers (forward, hidden and weight gradients, temperature, padded
vocabulary, chunking, entropy detach), TP=2 on gloo equals TP=1, peak memory of one micro-batch bounded well below
tokens x vocab x 4 bytes, and at temperature 0.7 both trainer backends reproduce the CPU engine's logprobs of the
tokens it sampled."""

from __future__ import annotations

import os
import threading
import weakref

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engines.logprobs import fused_logprobs, token_aligned
from engines.megatron.launch import init_dist, rank_main, rendezvous
from pipeline.algorithm.losses import logprobs_from_logits, token_entropy_from_logits
from pipeline.config import Config, validate
from pipeline.contracts.backend import MicroBatch

# --------------------------------------------------------------------------------------------------- references


def _reference(h, w, t, temperature, vocab):
    """Full-logits log-softmax over the real vocabulary: (logprob, entropy)."""
    logp = torch.log_softmax((h @ w[:vocab].T) / temperature, dim=-1)
    return logp.gather(-1, t[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def _data(n=29, hidden=6, rows=16, vocab=13, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype)
    w = torch.randn(rows, hidden, generator=g, dtype=dtype)
    t = torch.randint(0, vocab, (n,), generator=g)
    g_lp, g_ent = torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
    return h, w, t, g_lp, g_ent


def _grads(fn, h, w, g_lp, g_ent):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = fn(h, w)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if ent is not None and ent.requires_grad else 0.0)
    loss.backward()
    return lp.detach(), None if ent is None else ent.detach(), h.grad, w.grad


# --------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_matches_float64_reference(temperature, chunk):
    h, w, t, g_lp, g_ent = _data()  # 16 weight rows, real vocabulary 13: 3 padding rows excluded
    got = _grads(
        lambda h, w: fused_logprobs(
            h, w, t, temperature=temperature, chunk_tokens=chunk, with_entropy=True, vocab_size=13
        ),
        h, w, g_lp, g_ent,
    )  # fmt: skip
    want = _grads(lambda h, w: _reference(h, w, t, temperature, 13), h, w, g_lp, g_ent)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[3][13:].abs().max() == 0  # padding rows get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_old_logits_path(dtype):
    """Against the helpers the backends used (logits materialised, upcast, / T), in the trainer's dtypes."""
    h, w, t, g_lp, g_ent = _data(n=40, hidden=16, rows=50, vocab=50, dtype=dtype, seed=1)
    T = 0.7

    def old(h, w):
        logits = (h @ w.T).float() / T
        return logprobs_from_logits(logits, t), token_entropy_from_logits(logits)

    got = _grads(lambda h, w: fused_logprobs(h, w, t, temperature=T, chunk_tokens=8, with_entropy=True), h, w,
                 g_lp.float(), g_ent.float())  # fmt: skip
    want = _grads(old, h, w, g_lp.float(), g_ent.float())
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # Gradients: fp32 equal to summation order; bf16 rounds d logits to bf16 (both paths), and sums the weight gradient over chunks
    # in fp32 where the old path summed all tokens in one bf16 matmul.
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got[2:], want[2:], strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_entropy_detached_when_its_coefficient_is_zero():
    h, w, t, g_lp, g_ent = _data()
    lp_only = _grads(lambda h, w: (fused_logprobs(h, w, t, vocab_size=13)[0], None), h, w, g_lp, g_ent)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = fused_logprobs(hh, ww, t, with_entropy=True, entropy_grad=False, vocab_size=13)
    assert lp.requires_grad and not ent.requires_grad
    torch.testing.assert_close(ent, _reference(h, w, t, 1.0, 13)[1], rtol=1e-10, atol=1e-10)
    (lp * g_lp).sum().backward()
    torch.testing.assert_close(hh.grad, lp_only[2], rtol=0, atol=0)
    torch.testing.assert_close(ww.grad, lp_only[3], rtol=0, atol=0)


def test_entropy_only_gradient():
    h, w, t, _, g_ent = _data()
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    _, ent = fused_logprobs(hh, ww, t, temperature=0.7, chunk_tokens=5, with_entropy=True, vocab_size=13)
    (ent * g_ent).sum().backward()
    rh, rw = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    (_reference(rh, rw, t, 0.7, 13)[1] * g_ent).sum().backward()
    torch.testing.assert_close(hh.grad, rh.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ww.grad, rw.grad, rtol=1e-10, atol=1e-10)


def test_token_aligned_layout():
    """Value at position t is about token t given positions < t; position 0 is 0 (pipeline/contracts/backend.py)."""
    g = torch.Generator().manual_seed(3)
    hidden, w = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g).double()
    ids = torch.randint(0, 9, (2, 5), generator=g)
    lp, ent = token_aligned(hidden, ids, w, temperature=0.5, with_entropy=True)
    assert lp.shape == ent.shape == (2, 5) and (lp[:, 0] == 0).all() and (ent[:, 0] == 0).all()
    for b in range(2):
        for s in range(1, 5):
            logp = torch.log_softmax(hidden[b, s - 1] @ w.T / 0.5, -1)
            assert lp[b, s].item() == pytest.approx(logp[ids[b, s]].item(), abs=1e-12)
            assert ent[b, s].item() == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-12)


def test_bad_arguments_and_config_key():
    h, w, t, *_ = _data()
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_logprobs(h, w, t, chunk_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(h, w, t, temperature=0.0)
    cfg = Config()
    cfg.trainer.logprob_chunk_tokens = 0
    with pytest.raises(ValueError, match="trainer.logprob_chunk_tokens"):
        validate(cfg)


# --------------------------------------------------------------------------------------------------- TP=2


def _tp_worker(rank, world, port, q):
    import torch.distributed as dist

    init_dist(rank, world, port)  # 1 thread, the rendezvous the parent holds
    h, w, t, g_lp, g_ent = _data()
    t[0], t[1] = 7, 8  # one target on each rank's slice (rows 0-7, 8-15)
    hh = h.clone().requires_grad_(True)
    ww = w[rank * 8 : (rank + 1) * 8].clone().requires_grad_(True)
    lp, ent = fused_logprobs(
        hh, ww, t, temperature=0.7, chunk_tokens=6, with_entropy=True, vocab_start=rank * 8, vocab_size=13,
        group=dist.group.WORLD,
    )  # fmt: skip
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    dist.all_reduce(hh.grad)  # the caller's one input-gradient all-reduce (megatron: copy_to_..._region)
    q.put((rank, lp.detach().numpy(), ent.detach().numpy(), hh.grad.numpy(), ww.grad.numpy()))
    dist.destroy_process_group()


def test_tp2_equals_tp1():
    ctx = mp.get_context("spawn")
    q, store = ctx.Queue(), rendezvous()  # held until the ranks have joined
    procs = [ctx.Process(target=rank_main, args=(r, _tp_worker, 2, store.port, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict((r[0], r[1:]) for r in (q.get(timeout=120), q.get(timeout=120)))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    h, w, t, g_lp, g_ent = _data()
    t[0], t[1] = 7, 8
    lp, ent, gh, gw = _grads(
        lambda h, w: fused_logprobs(h, w, t, temperature=0.7, chunk_tokens=6, with_entropy=True, vocab_size=13),
        h, w, g_lp, g_ent,
    )  # fmt: skip
    for rank in (0, 1):
        r_lp, r_ent, r_gh, r_gw = (torch.from_numpy(x) for x in out[rank])
        torch.testing.assert_close(r_lp, lp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r_ent, ent, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r_gh, gh, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r_gw, gw[rank * 8 : (rank + 1) * 8], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------- memory
class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and still alive (every aten op's outputs are
    recorded; a storage counts until it is freed). Captures the backward too (CPU autograd runs on this thread)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def test_peak_memory_does_not_grow_with_tokens_times_vocab():
    n, hidden, vocab, chunk = 2048, 64, 4096, 128
    logits_bytes = n * vocab * 4  # 32 MiB: one float32 (tokens x vocab) tensor
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).requires_grad_(True)
    t = torch.randint(0, vocab, (n,), generator=g)

    def fused():
        lp, ent = fused_logprobs(h, w, t, temperature=0.7, chunk_tokens=chunk, with_entropy=True)
        (lp.sum() + ent.sum()).backward()

    def old():  # the logits path both backends ran before
        logits = (h @ w.T).float() / 0.7
        (logprobs_from_logits(logits, t).sum() + token_entropy_from_logits(logits).sum()).backward()

    peaks = {}
    for name, fn in (("fused", fused), ("old", old)):
        h.grad = w.grad = None
        with PeakMemory() as mem:
            fn()
        peaks[name] = mem.peak
    bound = logits_bytes // 4
    assert peaks["old"] > logits_bytes > bound  # the measurement sees the logits when they exist
    # Two (chunk x vocab) float32 buffers, the weight gradient and the hidden gradient: 7 MiB here.
    assert peaks["fused"] < bound, peaks


# --------------------------------------------------------------------------------------------------- engine
T_ENGINE = 0.7


def _engine_samples(model_dir: str) -> list[tuple[list[int], list[int], list[float]]]:
    """(prompt, sampled tokens, the engine's reported logprobs) at temperature 0.7."""
    from transformers import AutoModelForCausalLM

    from engines.local.engine import Engine, Request
    from engines.local.sampling import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = Engine(model, max_running=4, seed=5).start()
    done, reqs = threading.Semaphore(0), []
    try:
        for i, prompt in enumerate(([5, 9, 13], [7, 3], [20, 21, 22, 23], [4])):
            params = SamplingParams(max_new_tokens=10 + i, temperature=T_ENGINE, ignore_eos=True)
            req = Request(rid=f"r{i}", prompt=prompt, params=params, on_done=lambda r: done.release())
            reqs.append(req)
            engine.submit(req)
        for _ in reqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert all(r.error is None and len(r.logprobs) == len(r.output_ids) > 0 for r in reqs)
    return [(r.prompt, r.output_ids, r.logprobs) for r in reqs]


def _micro_batch(samples) -> MicroBatch:
    T = max(len(p) + len(o) for p, o, _ in samples)
    B = len(samples)
    ids, att = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    loss_mask, old = torch.zeros(B, T), torch.zeros(B, T)
    for b, (p, o, lp) in enumerate(samples):
        n = len(p) + len(o)
        ids[b, :n] = torch.tensor(p + o)
        att[b, :n] = 1
        loss_mask[b, len(p) : n] = 1.0
        old[b, len(p) : n] = torch.tensor(lp)
    pos = torch.arange(T).expand(B, T).contiguous()
    return MicroBatch(ids, att, pos, loss_mask, old, torch.zeros(B, T), global_tokens=float(loss_mask.sum()))


def _megatron_worker(rank, world, port, tmp):
    from engines.megatron.backend import build_backend
    from engines.megatron.launch import init_dist
    from pipeline.testing.megatron import tiny_config

    init_dist(rank, world, port)
    cfg = tiny_config()
    cfg.rollout.temperature = T_ENGINE
    backend = build_backend(cfg, rank, world)
    backend.setup(os.path.join(tmp, "model"))
    mb = torch.load(os.path.join(tmp, "mb.pt"), weights_only=False)
    torch.save(backend.forward_logprobs([mb])[0], os.path.join(tmp, "megatron_lp.pt"))


def test_both_backends_reproduce_the_engines_logprobs_at_temperature(tmp_path):
    from engines.fsdp.backend import build_backend
    from engines.megatron.launch import spawn
    from pipeline.testing.tiny_models import save_tiny_model

    model_dir = str(save_tiny_model(tmp_path / "model", seed=4, vocab_size=128, hidden_size=32, intermediate_size=64))
    mb = _micro_batch(_engine_samples(model_dir))
    torch.save(mb, tmp_path / "mb.pt")
    mask = mb.loss_mask > 0

    cfg = Config()
    cfg.rollout.temperature = T_ENGINE
    cfg.trainer.logprob_chunk_tokens = 7  # several chunks
    fsdp = build_backend(cfg, 0, 1)
    fsdp.setup(model_dir)
    fsdp_lp = fsdp.forward_logprobs([mb])[0]

    spawn(_megatron_worker, 1, str(tmp_path), timeout_s=120)
    megatron_lp = torch.load(tmp_path / "megatron_lp.pt")

    engine_lp = mb.old_logprobs[mask]
    assert engine_lp.min() < -0.5  # sampled tokens are not all near-certain: the temperature matters
    for name, lp in (("fsdp", fsdp_lp), ("megatron", megatron_lp)):
        delta = (lp[mask] - engine_lp).abs().max().item()
        assert delta < 1e-4, f"{name}: on-policy log-ratio up to {delta}"
