"""End to end on the embedded default, shortened: real Ray actors, a real local engine over HTTP, real ZMQ,
a real FSDP-backend trainer and a real gloo weight broadcast."""

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runtime.train import train

ROOT = Path(__file__).resolve().parents[1]


# colocated: a checkpoint staged on a memory filesystem per sync (what SGLang loads on GPUs), and the engine's memory
# released while the trainer trains
COLOCATED_DISK = [
    "weight_sync.mode=colocated",
    "weight_sync.colocated_transport=disk",
    "weight_sync.release_memory=[kv_cache,weights]",
]


@pytest.mark.slow
@pytest.mark.parametrize("sync", [[], COLOCATED_DISK], ids=["broadcast", "colocated_disk"])
def test_embedded_default_runs_end_to_end(tmp_path, sync):
    B, G = 4, 4
    shm = Path(tempfile.mkdtemp(prefix="dapo-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else tmp_path))
    cfg = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [
            "trainer.total_steps=3",
            f"trainer.batch_size={B}",
            f"rollout.n_samples_per_prompt={G}",
            "trainer.micro_batch_size=8",
            "trainer.num_minibatches=2",
            f"logging.dir={tmp_path}",
            "logging.run_name=e2e",
            "weight_sync.every=1",
            "eval.every=2",
            "data.eval_path=synthetic:arith?split=test&n=16",
            f"weight_sync.disk_dir={shm}",
            *sync,
        ],
    )
    try:
        result = train(cfg)
        assert os.listdir(shm) == []  # every staged checkpoint was removed
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert result.steps == 3 and result.version == 3
    engine_log = (Path(result.run_dir) / "engine0.log").read_text()
    assert "api key set" in engine_log  # the run's random per-run key (pipeline/runtime/run_security.py)
    disk_loads = engine_log.count(f"update_weights_from_disk {shm}/")
    assert (disk_loads, engine_log.count("release_memory_occupation: released")) == ((3, 3) if sync else (0, 0))
    assert result.engine_versions == ["3"]  # the engine reports the version of the last broadcast
    assert len(result.history) == 3
    for step, m in enumerate(result.history, start=1):
        assert m["weight_version"] == step
        assert m["train/grad_norm"] > 0
        assert 0.0 < m["reward/acc"] < 1.0  # dynamic sampling: only groups with mixed outcomes are trained
        assert -2.0 <= m["reward/mean"] <= 1.0
        assert m["staleness/max"] <= cfg.rollout.max_staleness
        assert m["time/weight_sync(s)"] > 0
        assert m["perf/train_tokens_per_s"] > 0
        # two mini-batches, each trained as it arrives; not with the engines' memory released while training
        assert m["perf/streamed_minibatches"] == (0 if sync else 2)
    # Before the first step (v0), the one started at step 2 (while training went on), after the last step (v3).
    assert [(e["eval/step"], e["eval/weight_version"]) for e in result.evals] == [(0, 0), (2, 2), (3, 3)]
    assert all(0.0 <= e["eval/acc"] <= e["eval/pass"] <= 1.0 for e in result.evals)
    acc = result.accounting
    assert acc["trained"] == 3 * B
    assert acc["lost"] == 0 and acc["balanced"] == 1, acc
    events = list((Path(result.run_dir) / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (Path(result.run_dir) / "checkpoints" / "latest").is_file()  # the final checkpoint
    assert _processes_mentioning(str(tmp_path)) == []  # no orphaned engine or worker


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_resume_continues_the_run(tmp_path):
    """N steps, stop, resume from the checkpoint, N more: versions continue, no prompt is trained twice,
    the accounting identity holds across the restart, and the TensorBoard step continues."""
    B, N = 2, 2
    base = [
        f"trainer.batch_size={B}",
        "rollout.n_samples_per_prompt=4",
        "trainer.micro_batch_size=8",
        f"logging.dir={tmp_path}",
        "logging.run_name=resume",
        "checkpoint.every=1",
        "eval.every=0",
    ]
    first = train(load_config(ROOT / "configs" / "tiny-cpu.yaml", [*base, f"trainer.total_steps={N}"]))
    assert first.version == N
    second = train(
        load_config(
            ROOT / "configs" / "tiny-cpu.yaml", [*base, f"trainer.total_steps={2 * N}", "checkpoint.resume=auto"]
        )
    )
    assert second.steps == 2 * N and len(second.history) == N  # only the remaining steps ran
    assert [m["weight_version"] for m in second.history] == [N + 1, 2 * N]
    assert second.engine_versions == [str(2 * N)]
    prompts = [p for step in first.trained_prompts + second.trained_prompts for p in step]
    assert len(prompts) == 2 * N * B and len(set(prompts)) == len(prompts)
    assert second.accounting["balanced"] == 1 and second.accounting["trained"] == 2 * N * B, second.accounting
    # TensorBoard keeps every step, the checkpointed step N included (the resumed writer purges only steps > N)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "resume" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted(e.step for e in events.Scalars("reward/mean")) == list(range(1, 2 * N + 1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, engines, max_restarts",
    [(signal.SIGKILL, 1, 3), (signal.SIGSTOP, 1, 3), (signal.SIGKILL, 2, 0)],
    ids=["crashed", "hung", "dropped"],
)
def test_engine_crash_mid_run_is_survived(tmp_path, sig, engines, max_restarts):
    """Chaos: an engine process is SIGKILLed (crashed) or SIGSTOPped (hung: alive, /health silent) mid-run; it is
    restarted, gets the current weights, the run finishes and every prompt is still accounted for. With
    engine.max_restarts=0 it is dropped instead and the other engine carries the run."""
    killed: list[int] = []

    def chaos() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if list((tmp_path / "chaos" / "tb").glob("events.*")):  # the loop is about to start
                time.sleep(0.5)  # a few steps in (a step takes 0.1-0.5 s here; the run has 24)
                for proc in Path("/proc").glob("[0-9]*"):
                    try:
                        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:
                        continue
                    if "engines.local" in cmd and str(tmp_path) in cmd:
                        os.kill(int(proc.name), sig)
                        killed.append(int(proc.name))
                        return  # one engine
            time.sleep(0.5)

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    cfg = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [
            "trainer.total_steps=24",
            "trainer.batch_size=2",
            "rollout.n_samples_per_prompt=4",
            f"logging.dir={tmp_path}",
            "logging.run_name=chaos",
            "trainer.micro_batch_size=8",
            "eval.every=0",
            "engine.request_timeout_s=120",
            "engine.health_timeout_s=3",
            "weight_sync.timeout_s=10",  # a sync that meets the hung engine fails after this, then it is replaced
            f"engine.num_engines={engines}",
            f"engine.max_restarts={max_restarts}",
        ],
    )
    result = train(cfg)
    thread.join(timeout=5)
    assert killed, "the chaos thread found no engine to kill"
    # The restarted engine holds the latest weights; a dropped one is no longer asked.
    assert result.steps == 24 and result.engine_versions == ["24"]
    assert max(m.get("engine/restarts", 0) for m in result.history) == (1 if max_restarts else 0)
    assert result.history[-1]["engine/alive"] == 1
    assert result.accounting["balanced"] == 1 and result.accounting["trained"] == 48, result.accounting
    assert _processes_mentioning(str(tmp_path)) == []  # the hung one was killed, not left behind


@pytest.mark.slow
def test_megatron_backend_in_the_loop(tmp_path):
    """trainer.backend=megatron on four ranks, two pipeline stages x two context-parallel ranks (CPU attention):
    each stage's source rank (CP rank 0) broadcasts its own layers, stage after stage, and the engine's checksums of
    every tensor match what was sent. Two mini-batches per step, each trained (all four ranks) as it arrives."""
    cfg = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [
            "trainer.backend=megatron",
            "trainer.world_size=4",
            "trainer.parallel.pp=2",
            "trainer.parallel.cp=2",
            "trainer.total_steps=2",
            "trainer.batch_size=2",
            "trainer.num_minibatches=2",
            "rollout.n_samples_per_prompt=4",
            "trainer.micro_batch_size=4",
            "weight_sync.checksum=true",
            f"logging.dir={tmp_path}",
            "logging.run_name=megatron",
            "eval.every=0",
        ],
    )
    result = train(cfg)
    assert result.steps == 2 and result.engine_versions == ["2"]
    assert all(m["train/grad_norm"] > 0 and m["perf/streamed_minibatches"] == 2 for m in result.history)
    assert result.accounting["balanced"] == 1


@pytest.mark.slow
def test_trainer_failure_stops_with_a_resumable_checkpoint(tmp_path):
    """A trainer rank dies mid-run: the run stops (no hang) with an error naming the last checkpoint and how to
    resume, and resuming from it continues the run."""
    import re

    import psutil

    from pipeline.runtime.train import RunFailed

    ckpts = tmp_path / "tf" / "checkpoints"

    def kill_trainer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (ckpts / "step_00000004" / "state.json").is_file():
            time.sleep(0.2)
        for proc in psutil.Process().children(recursive=True):
            try:
                if "TrainerActor" in " ".join(proc.cmdline()):
                    os.kill(proc.pid, signal.SIGKILL)
            except psutil.Error:
                continue

    base = [
        "trainer.batch_size=2", "rollout.n_samples_per_prompt=4", "trainer.micro_batch_size=8", "eval.every=0",
        f"logging.dir={tmp_path}", "logging.run_name=tf", "checkpoint.every=2",
    ]  # fmt: skip
    thread = threading.Thread(target=kill_trainer, daemon=True)
    thread.start()
    with pytest.raises(RunFailed) as failed:
        train(load_config(ROOT / "configs" / "tiny-cpu.yaml", [*base, "trainer.total_steps=200"]))
    thread.join(timeout=5)
    message = str(failed.value)
    assert "checkpoint.resume=auto" in message and "logging.run_name=tf" in message, message
    last = int(re.search(r"step_(\d+)", message).group(1))
    assert last >= 4 and last % 2 == 0
    result = train(
        load_config(
            ROOT / "configs" / "tiny-cpu.yaml",
            [*base, f"trainer.total_steps={last + 2}", "checkpoint.resume=auto"],
        )
    )
    assert result.steps == last + 2 and len(result.history) == 2  # continued from the checkpoint, not from 0
    assert result.history[0]["weight_version"] == last + 1
