"""`trainer_peak_memory` against the trainers' measured peak memory on CPU: tiny Qwen2 models built from config,
both backends, recompute on and off, several token counts; predicted within 15% of the measured peak (parameters,
gradient buffers and optimizer state walked tensor by tensor, plus the allocator's transient peak of a
train_minibatch from torch.profiler's memory events; see pipeline/planning/measure.py)."""

import json

import pytest

CASES = [  # (backend, hidden, layers, vocab, recompute, rows, row length, dtype)
    ("megatron", 256, 2, 1000, False, 2, 256, "float32"),
    ("megatron", 256, 2, 1000, False, 4, 512, "float32"),
    ("megatron", 256, 2, 4000, False, 2, 256, "float32"),
    ("megatron", 256, 4, 1000, True, 2, 256, "float32"),
    ("megatron", 256, 4, 1000, True, 4, 512, "float32"),
    ("megatron", 256, 2, 1000, False, 4, 1024, "bfloat16"),
    ("megatron", 256, 4, 1000, True, 4, 1024, "bfloat16"),
    ("fsdp", 256, 2, 1000, False, 2, 256, "float32"),
    ("fsdp", 256, 2, 1000, False, 4, 512, "float32"),
    ("fsdp", 256, 4, 4000, False, 2, 256, "float32"),
    ("fsdp", 256, 4, 1000, True, 2, 256, "float32"),
    ("fsdp", 256, 4, 1000, True, 4, 512, "float32"),
    ("fsdp", 256, 2, 1000, False, 4, 1024, "bfloat16"),
    ("fsdp", 256, 4, 1000, True, 4, 1024, "bfloat16"),
]


def _worker(rank, world_size, port, out_path, tmp):
    """One gloo rank: every case, measured and predicted, written as JSON."""
    from engines.megatron.launch import init_dist
    from pipeline.algorithm.losses import make_loss_fn
    from pipeline.plan import trainer_peak_memory
    from pipeline.planning.measure import measure_step, random_micro_batch
    from pipeline.testing.megatron import save_tiny_hf, tiny_config

    init_dist(rank, world_size, port)
    results = []
    for i, (backend, h, layers, vocab, recompute, rows, T, dtype) in enumerate(CASES):
        if not _supported(backend, recompute, dtype):
            results.append(None)
            continue
        path = f"{tmp}/m{i}"
        hf = save_tiny_hf(path, vocab_size=vocab, hidden_size=h, layers=layers, heads=4, kv_heads=2)
        cfg = tiny_config(recompute=recompute)
        cfg.trainer.backend, cfg.model.dtype = backend, dtype
        if backend == "fsdp":
            from engines.fsdp.backend import FSDPBackend as Backend
        else:
            from engines.megatron.backend import MegatronBackend as Backend
        be = Backend(cfg, 0, 1)
        be.setup(path)
        measured = measure_step(be, [random_micro_batch(rows, T, vocab, T // 4)], make_loss_fn(cfg.algorithm))
        predicted = trainer_peak_memory(hf.config, cfg, rows * T, device="cpu")
        results.append({"measured": measured["allocated"], "predicted": predicted["allocated"]})
    with open(out_path, "w") as f:
        json.dump(results, f)


def _mixed_precision_code() -> bool:
    """#16's trainers: fp32 master weights with bf16 compute, the fused logprob head, FSDP recompute."""
    import importlib.util

    return importlib.util.find_spec("engines.logprobs") is not None


def _supported(backend: str, recompute: bool, dtype: str) -> bool:
    """Cases the model describes on this code: bf16 and FSDP recompute as #16 leaves them."""
    if dtype == "bfloat16" or (backend == "fsdp" and recompute):
        return _mixed_precision_code()
    return True


@pytest.fixture(scope="module")
def measurements(tmp_path_factory):
    from engines.megatron.launch import spawn

    tmp = tmp_path_factory.mktemp("calib")
    out = tmp / "results.json"
    spawn(_worker, 1, str(out), str(tmp), timeout_s=240)
    return json.loads(out.read_text())


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i])))
def test_predicted_peak_within_15_percent(measurements, i):
    backend, _, _, _, recompute, _, _, dtype = CASES[i]
    if not _supported(backend, recompute, dtype):
        pytest.skip("bf16 and FSDP recompute are modelled as #16 leaves the trainers (fp32 master weights, fused head)")
    r = measurements[i]
    assert r["predicted"] == pytest.approx(r["measured"], rel=0.15), CASES[i]
