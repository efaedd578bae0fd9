"""Stopping a training run cleanly on SIGTERM or SIGINT.

Schedulers send SIGTERM before they kill a job (SLURM at preemption or time limit,
Kubernetes and ``docker stop`` some seconds before SIGKILL), and Ctrl-C sends SIGINT. Either
asks the run to stop: the batch running finishes, a checkpoint is written, and the process
exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the status a shell
gives a process that signal ended. Later signals only say that stopping is under way:
breaking off a checkpoint write would leave it half-written (``kill -9`` still abandons the
run at once, and the newest complete checkpoint then remains).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by signal ``signum``: 128 + its number."""
    return 128 + signum


class Interrupted(Exception):
    """The run stopped on a signal after writing checkpoint ``step``; the message says
    what happened and how to resume."""

    def __init__(self, signum: int, step: int, checkpoints: os.PathLike | str):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after global step {step}: checkpoint {step} is "
                         f"saved in {checkpoints}; run the same command again to resume")
        self.exit_code = exit_code(signum)


class StopSignals:
    """While entered, SIGTERM and SIGINT ask for a stop (``received``) instead of ending the
    process. Only the main thread can handle signals; elsewhere it changes nothing."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first stop signal's number
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            line = (f"{name} received: stopping after the current batch, once its checkpoint "
                    "is written")
        else:
            line = (f"{name} received again: still finishing the batch and its checkpoint "
                    "(kill -9 abandons them; the newest complete checkpoint remains)")
        # os.write: a handler may run while the main thread is inside print().
        os.write(sys.stderr.fileno(), f"{line}\n".encode())
