"""Signals: SIGINT/SIGTERM end the training loop after the current step (then a checkpoint and a clean shutdown).

Contract: `with StopFlag() as stop:` installs the handlers (main thread only) and restores the old ones on exit;
`stop.requested` turns true at the first signal; a second signal raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("dapo")


class StopFlag:
    requested = False

    def __enter__(self) -> StopFlag:
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("signal %d: finishing the current step, then saving and shutting down", signum)
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
