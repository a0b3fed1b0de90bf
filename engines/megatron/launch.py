"""Multi-process gloo (or NCCL) runs on this machine: the launcher of the offline megatron export and of the tests.

Contract:
- `spawn(fn, world_size, *args, timeout_s, start_method=None)` runs `fn(rank, world_size, port, *args)` in
  `world_size` fresh processes (a free 127.0.0.1 port for the rendezvous), and raises if one fails or the run exceeds
  the timeout. Start method: forkserver with megatron preloaded on a machine without CUDA (fast workers); `spawn`
  where CUDA is available, since the preloaded modules may initialise CUDA in the forkserver and a forked child
  then cannot use it ("Cannot re-initialize CUDA in forked subprocess").
- The rendezvous port is held from the start: `spawn` opens the run's TCPStore on port 0 in the launching process and
  passes its port, so no other process can take the port between choosing and binding it (a free port chosen,
  closed and bound later by rank 0 could be lost to another process on a busy machine).
- `init_dist(rank, world_size, port, backend="gloo")` is what `fn` calls first: its own process group (so a timed-out
  run is killed with its helpers), 1 CPU thread, the torch.distributed rendezvous through the store on
  127.0.0.1:port.
- `rendezvous()` -> that store, for callers that start the ranks themselves (tests, the planner's GPU check).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from datetime import timedelta
from typing import Any

import torch

STORE_TIMEOUT_S = 300.0  # how long a rank waits for the others at the rendezvous


def rendezvous() -> Any:
    """The rendezvous server of a run's ranks, bound now on a free 127.0.0.1 port (`.port`): keep it referenced until
    the ranks have joined (`init_dist(rank, world_size, store.port)`)."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)


def init_dist(rank: int, world_size: int, port: int, backend: str = "gloo") -> None:
    import torch.distributed as dist

    os.setpgrp()  # own process group: a timed-out run is killed with its helpers (megatron's checkpoint writers)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(LOCAL_RANK=str(rank))
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


# Imported once by the forkserver, then inherited by every worker it forks: a worker starts in well under a second
# instead of paying ~10 s of megatron/transformers imports each time.
PRELOAD = [
    "torch",
    "torch.distributed",
    "transformers",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "engines.megatron.backend",
    "pipeline.algorithm.losses",
]


def default_start_method() -> str:
    """`spawn` where CUDA is usable (no CUDA state inherited from a forkserver), else the fast preloaded forkserver.

    `torch.cuda.is_available()` does not initialise CUDA in this process (no context, so no bad fork later)."""
    return "spawn" if torch.cuda.is_available() else "forkserver"


def spawn(fn: Any, world_size: int, *args: Any, timeout_s: float = 120.0, start_method: str | None = None) -> None:
    import multiprocessing

    import torch.multiprocessing as mp

    method = start_method or default_start_method()
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(PRELOAD)
    store = rendezvous()  # lives here, bound before any worker starts, until the run ends
    ctx = mp.start_processes(
        fn, args=(world_size, store.port, *args), nprocs=world_size, join=False, start_method=method
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.kill()
            raise TimeoutError(f"distributed run of {fn.__name__} exceeded {timeout_s} s")
