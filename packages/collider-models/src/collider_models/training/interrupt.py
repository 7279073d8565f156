"""Ctrl-C (SIGINT) and SIGTERM stop a run after the current step, with a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """Context manager: the first SIGINT or SIGTERM sets :attr:`requested` (the training loop
    saves a checkpoint and exits after its step); a second Ctrl-C interrupts at once."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        self.requested = True
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
