"""Ctrl-C (SIGINT) and SIGTERM stop a run after the current step, with a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
import time

# A repeat of the signal within this many seconds counts as the same request: under torchrun a
# Ctrl-C reaches each worker twice (from the terminal and forwarded by torchrun).
REPEAT_S = 2.0


class StopRequest:
    """Context manager: the first SIGINT or SIGTERM sets :attr:`requested` (the training loop
    saves a checkpoint and exits after its step); another Ctrl-C, more than :data:`REPEAT_S`
    seconds later, interrupts at once (``KeyboardInterrupt``)."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if signum == signal.SIGINT and now - self._first > REPEAT_S:
                raise KeyboardInterrupt
            return
        self.requested, self._first = True, now
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
