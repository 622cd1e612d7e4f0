"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers and `kill` send).

The first signal only records a request: the trainer finishes the current step, saves a
checkpoint and stops, so the rerun continues exactly where it left off. A second signal raises
KeyboardInterrupt at once, for when the step or the save itself hangs.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered, SIGINT/SIGTERM request a stop instead of killing the process; `requested` says
    whether one came. The previous handlers come back on exit.

    Python lets only the main thread install handlers, so in any other thread (a run started from a
    worker thread) it installs none and the signals keep their usual effect.
    """

    def __init__(self, announce: bool):
        """`announce` is False on every rank but local rank 0, so a signal sent to a node's ranks is reported once."""
        self.announce = announce
        self.signum: int | None = None  # the signal that requested the stop
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                  "(send it again to stop at once)", flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
