"""Signals: SIGINT/SIGTERM end the training loop after the current step (then a checkpoint and a clean shutdown).

Contract: `with StopFlag() as stop:` installs the handlers (main thread only) and restores the old ones on exit;
enter it before Ray or any process starts. Until `stop.started()` (start-up: Ray, engines, trainer ranks, the
checkpoint's load) a signal raises `StartupInterrupted` at once, so the blocking start-up waits (`ray.get`, which
runs Python's signal handlers while it waits) unwind and every `with` block stops what it started. After
`started()`, `stop.requested` turns true at the first signal; a second signal raises KeyboardInterrupt at once.
Either interrupt (the start-up one too) lands wherever the main thread is: possibly inside a constructor (a half-built
asyncio loop whose `__del__` then fails) or between creating a coroutine and awaiting it. What such objects report
as they are collected is a consequence of the stop the user asked for, not a failure, so from then on it goes to the
DEBUG log (`quiet_aftermath`) instead of printing tracebacks under the "stopped" message.
(`ray.init` installs its own SIGTERM handler: `Cluster` puts the previous one back.)
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

log = logging.getLogger("dapo")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartupInterrupted(KeyboardInterrupt):
    """A signal arrived before the first step: the run stops at once (nothing trained, nothing to save)."""


class StopFlag:
    requested = False
    starting = True

    def __enter__(self) -> StopFlag:
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    @contextlib.contextmanager
    def startup(self) -> Iterator[None]:
        """Around start-up and what it started: a KeyboardInterrupt out of it while starting is StartupInterrupted
        (Ray's waits re-raise a plain KeyboardInterrupt from our handler's exception)."""
        try:
            yield
        except KeyboardInterrupt as e:
            if self.starting and not isinstance(e, StartupInterrupted):
                raise StartupInterrupted(str(e)) from None
            raise

    def started(self) -> None:
        """Start-up is over: from now on the first signal finishes the current step."""
        self.starting = False

    def _handle(self, signum: int, frame: object) -> None:
        if self.starting:
            if self.requested:  # already unwinding: let the shutdown of what started finish
                return
            self.requested = True
            quiet_aftermath()
            raise StartupInterrupted(f"signal {signum} during start-up")
        if self.requested:  # a second signal: stop now
            quiet_aftermath()
            raise KeyboardInterrupt
        log.warning("signal %d: finishing the current step, then saving and shutting down", signum)
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def quiet_aftermath() -> None:
    """For the rest of the process: errors in finalizers (`Exception ignored in ...`) and never-awaited coroutines
    are logged at DEBUG, not printed. Called when a signal interrupts the main thread at an arbitrary point (during
    start-up, or the second one)."""

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        exc = unraisable.exc_value
        trace = (unraisable.exc_type, exc, unraisable.exc_traceback) if exc is not None else None
        what = unraisable.err_msg or "exception ignored in"
        log.debug("after the interrupt: %s %r", what, unraisable.object, exc_info=trace)

    sys.unraisablehook = hook
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
