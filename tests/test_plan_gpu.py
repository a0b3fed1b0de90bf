"""On a GPU: `trainer_peak_memory` against torch.cuda.max_memory_allocated of one trainer rank, the case of #21
(Qwen2.5-1.5B shape with random weights, bf16, no recompute, one 16,384-token micro-batch of 4 rows), both
backends, within 10% (pipeline/planning/gpu_check.py does the run, one process per backend)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(backend: str, shape: str, tokens: int, timeout_s: float) -> dict:
    """The last result row of `python -m pipeline.planning.gpu_check` (one rank, in its own process)."""
    cmd = [sys.executable, "-m", "pipeline.planning.gpu_check", "--backend", backend, "--shape", shape,
           "--tokens", str(tokens)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, out.stderr[-3000:]
    return rows[-1]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["megatron", "fsdp"])
def test_predicted_peak_within_10_percent_on_the_gpu(backend):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    row = gpu_check(backend, "1.5b", 16384, timeout_s=240)
    assert row["ratio"] == pytest.approx(1.0, abs=0.10), row


def test_the_check_runs_on_cpu_with_the_tiny_shape():
    # the script the GPU test relies on starts its one-rank process group and measures a step (its rendezvous
    # once waited for a store nobody served: the GPU check would have spent its timeout on it)
    row = gpu_check("megatron", "tiny", 256, timeout_s=120)
    assert (row["backend"], row["shape"], row["tokens"]) == ("megatron", "tiny", 256)
    assert row["measured_gib"] > 0 and row["predicted_gib"]["total"] > 0
