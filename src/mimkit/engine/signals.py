"""Graceful stops: SIGTERM, SIGUSR1 (SLURM's --signal=USR1@N) and a first Ctrl-C ask the loop to stop.

The handler only records the request; the loop notices it after the current optimiser step, agrees on it with
every rank, writes a step checkpoint and raises `mimkit.errors.RunInterrupted` (exit code 75). The first Ctrl-C says so at once
(FIRST_CTRL_C). A second Ctrl-C raises KeyboardInterrupt at once (exit code 130; the CLI then exits without the
interpreter's seconds-long teardown). DataLoader workers ignore these signals: the main process
decides when they stop.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
# the first Ctrl-C's answer, so the user knows it registered (the step may take a while to finish)
FIRST_CTRL_C = "mimkit: Ctrl-C: stopping after this step and writing a checkpoint; Ctrl-C again to stop now"


def _signals() -> list[signal.Signals]:
    return [getattr(signal, n) for n in STOP_SIGNALS if hasattr(signal, n)]


class GracefulStop:
    """Context manager installing the stop handlers (main thread only) and restoring the previous ones."""

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal received; 0 = none
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum:
            raise KeyboardInterrupt  # the second Ctrl-C: quit now
        if not self.signum:
            self.signum = signum
            if signum == signal.SIGINT and int(os.environ.get("RANK", "0")) == 0:  # said once, at once
                sys.stderr.write(f"\n{FIRST_CTRL_C}\n")
                sys.stderr.flush()

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in _signals():
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # not settable here (embedded interpreters)
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous.clear()


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def ignore_stop_signals(worker_id: Optional[int] = None) -> None:
    """DataLoader worker_init_fn: a Ctrl-C or a scheduler's signal to the process group must not kill the
    workers mid-epoch (the main process finishes its step, then shuts them down)."""
    for sig in _signals():
        signal.signal(sig, signal.SIG_IGN)
