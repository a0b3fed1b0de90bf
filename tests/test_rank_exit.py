"""engines.megatron.launch.rank_main: a rank ends right after its work, without finalizing the interpreter (where
gloo's worker threads could abort the process; see the launcher's contract), and what it put on a multiprocessing
queue still reaches the parent."""

from __future__ import annotations

import atexit
import multiprocessing as mp
from pathlib import Path

import numpy as np

from engines.megatron.launch import rank_main, spawn


def _marks(rank: int, world: int, port: int, out: str) -> None:
    atexit.register(Path(out, f"finalized{rank}").touch)  # runs only if the interpreter finalizes
    Path(out, f"ran{rank}").touch()


def test_spawned_ranks_end_without_finalizing(tmp_path):
    # The spawn start method (a GPU machine's): its children finalize the interpreter on exit (the forkserver's end
    # with os._exit already).
    spawn(_marks, 2, str(tmp_path), timeout_s=120, start_method="spawn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ran0", "ran1"]


def _put(rank: int, q: mp.Queue) -> None:
    q.put((rank, np.arange(1 << 18)))  # 2 MB: far more than a pipe holds, still in the feeder thread at return


def test_what_a_rank_queued_arrives():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=rank_main, args=(0, _put, q))
    p.start()
    rank, data = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0 and rank == 0 and np.array_equal(data, np.arange(1 << 18))
