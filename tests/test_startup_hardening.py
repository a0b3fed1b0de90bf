"""Start-up hardening (issue 22): a local cluster is always a fresh Ray instance of the run's own; a bad checkpoint
fails before anything starts, naming the file; a SIGTERM at any point of start-up ends the run promptly (exit 130,
no Ray GCS error, no process left behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray

from pipeline.config import load_config
from pipeline.runtime import cluster as cluster_mod
from pipeline.runtime import train as train_mod
from pipeline.runtime.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def test_local_address_starts_a_fresh_ray_instance(monkeypatch, tmp_path):
    """cluster.address=local must not attach to a cluster another session left in /tmp/ray/ray_current_cluster:
    plain ray.init() does; ray.init(address="local") always starts a new one."""
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(cluster_mod.Cluster, "_reserve", lambda self: None)
    cfg = load_config(TINY, [f"logging.dir={tmp_path}"])
    with cluster_mod.Cluster(cfg):
        pass
    assert len(calls) == 1 and calls[0].get("address") == "local", calls
    calls.clear()
    cfg = load_config(TINY, [f"logging.dir={tmp_path}", "cluster.address=10.0.0.1:6379"])
    with cluster_mod.Cluster(cfg):
        pass
    assert calls[0]["address"] == "10.0.0.1:6379"


def test_a_bad_checkpoint_fails_before_the_cluster_starts(monkeypatch, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text('{"step": 3, "vers')  # truncated
    entered = []

    def no_cluster(self):
        entered.append(1)
        raise AssertionError("the cluster started before the checkpoint was verified")

    monkeypatch.setattr(cluster_mod.Cluster, "__enter__", no_cluster)
    cfg = load_config(TINY, [f"logging.dir={tmp_path}", "logging.run_name=r", f"checkpoint.resume={ckpt}"])
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        train_mod.train(cfg)
    assert entered == [] and time.monotonic() - t0 < 10
    assert str(ckpt) in str(err.value), err.value


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["gcs_server", "engines.local"])  # Ray starting / the engine starting
def test_sigterm_during_startup_stops_promptly_and_cleanly(tmp_path, phase):
    log = tmp_path / "out.log"
    cmd = [
        sys.executable, "-m", "pipeline.tools.cli", "train", str(TINY), "model.warm_start_steps=0",
        "eval.every=0", f"logging.dir={tmp_path}", "logging.run_name=run",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    try:
        children = _wait_for_process(proc, phase, timeout=120)
        proc.send_signal(signal.SIGTERM)  # the driver only, as README says
        t0 = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert took < 20, (took, out[-3000:])
    assert "GCS" not in out and "Traceback" not in out, out[-3000:]
    assert code == 130, (code, out[-3000:])
    assert "stopped by a signal during start-up" in out, out[-3000:]
    children += [c for c in _leftovers(proc.pid, str(tmp_path)) if c not in children]
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], [" ".join(p.cmdline())[:120] for p in alive]


def _leftovers(sid: int, run_dir: str) -> list[psutil.Process]:
    """Processes still in the run's session (Ray's), or naming its directory (an engine server, in its own session)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid or run_dir in " ".join(p.cmdline()):
                found.append(p)
        except (ProcessLookupError, psutil.Error, PermissionError):
            pass
    return found


def _wait_for_process(proc: subprocess.Popen, name: str, timeout: float) -> list[psutil.Process]:
    """The run's processes once one whose command line holds `name` has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dapo train exited early ({proc.returncode})"
        children = psutil.Process(proc.pid).children(recursive=True)
        try:
            if any(name in " ".join(c.cmdline()) for c in children):
                return children
        except psutil.Error:
            pass
        time.sleep(0.1)
    pytest.fail(f"no {name} process within {timeout}s")


@pytest.mark.slow
def test_a_bad_data_file_is_reported_once(tmp_path):
    """A data error inside the rollout actor's constructor: one `dapo: data error` line naming file and line, without
    Ray's ~20-line "Exception raised in creation task" traceback from the worker."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": \n')
    cmd = [
        sys.executable, "-m", "pipeline.tools.cli", "train", str(TINY), "model.warm_start_steps=0", "eval.every=0",
        f"data.train_path={bad}", f"logging.dir={tmp_path}", "logging.run_name=run",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "creation task" not in text and "Traceback" not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("dapo: ")]
    assert errors == [f"dapo: data error: {bad}: line 2: invalid JSON ({errors[0].rsplit('(', 1)[-1]}"], text[-3000:]
