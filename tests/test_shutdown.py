"""A run stopped by Ctrl-C resumes where it stopped: the checkpoint the signal left behind loads (with the config the
run saved), the step and the weight version continue from it, and no prompt is lost or trained twice.
(tests/test_signals.py checks the stop itself: exit status, the checkpoint's step, no process left.)"""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from pipeline.config import load_config
from pipeline.train import train
from tests.test_signals import _start, _wait_for_steps


@pytest.mark.slow
def test_resume_after_ctrl_c_continues_at_the_next_step(tmp_path):
    proc, log = _start(tmp_path)  # dapo train, 500 steps of batch 4, in its own process group
    try:
        _wait_for_steps(proc, log, 2, timeout=300)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert psutil.wait_procs(children, timeout=30)[1] == []
    run = tmp_path / "run"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    stopped = json.loads((run / "checkpoints" / latest / "state.json").read_text())["step"]
    assert 2 <= stopped < 500

    cfg = load_config(run / "config.yaml", ["checkpoint.resume=auto", f"trainer.total_steps={stopped + 2}"])
    result = train(cfg)
    assert result.steps == stopped + 2 and len(result.history) == 2  # from the checkpoint, not from step 0
    assert [m["weight_version"] for m in result.history] == [stopped + 1, stopped + 2]  # weight_sync.every = 1
    assert result.engine_versions == [str(stopped + 2)]
    acc = result.accounting  # the batches before the signal count too: nothing lost across the stop
    assert acc["balanced"] == 1 and acc["lost"] == 0 and acc["trained"] == 4 * (stopped + 2), acc
    prompts = [p for step in result.trained_prompts for p in step]
    assert len(set(prompts)) == len(prompts) == 2 * 4
