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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["megatron", "fsdp"])
def test_predicted_peak_within_10_percent_on_the_gpu(backend):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cmd = [sys.executable, "-m", "pipeline.planning.gpu_check", "--backend", backend, "--shape", "1.5b",
           "--tokens", "16384"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, out.stderr[-3000:]
    row = rows[-1]
    assert row["ratio"] == pytest.approx(1.0, abs=0.10), row
