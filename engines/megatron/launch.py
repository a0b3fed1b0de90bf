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
- Every rank `spawn` starts runs through `rank_main(rank, fn, *args)`, which callers that start their own processes
  use as the target too: `fn(rank, *args)`, then the multiprocessing queues among `args` are flushed and the process
  ends at once (`os._exit(0)`) instead of finalizing the interpreter. Why: gloo's worker threads release each
  finished collective's work object, and with it Python tensors. Once the interpreter finalizes, a thread that
  needs the GIL for that is ended by Python inside a C++ destructor, and the rank aborts after its work succeeded
  ("terminate called without an active exception", SIGABRT; seen about once in 8-20 two-rank FSDP runs of a spawn
  context, even after `destroy_process_group`). The forkserver's children already end with `os._exit`; children of
  the spawn start method (the default where CUDA is present, and the tests' own spawn contexts) finalize. A failure
  in `fn` propagates as before.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.queues
import os
import signal
import sys
import time
from datetime import timedelta
from typing import Any, NoReturn

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


def rank_main(rank: int, fn: Any, *args: Any) -> NoReturn:
    """Run one rank's `fn(rank, *args)`, then end the process without finalizing the interpreter (module contract)."""
    fn(rank, *args)
    for arg in args:
        if isinstance(arg, multiprocessing.queues.Queue):  # what the rank put is in the pipe before the process ends
            arg.close()
            arg.join_thread()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
        rank_main, args=(fn, world_size, store.port, *args), nprocs=world_size, join=False, start_method=method
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
