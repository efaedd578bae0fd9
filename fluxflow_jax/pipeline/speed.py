"""Training speed between two log points: seconds per batch, images/s and MFU.

The loop syncs with the device only at log points, so the wall time between two of them is
the device's time for the batches dispatched in between. Time that is not training is left
out: compiling (a stage's first batch, a new image size; logged on its own), and writing
checkpoints, samples and exports (the loop waits for the batches before them first, so
their device time still counts).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fluxflow_jax.training.performance import utilisation


@dataclass(frozen=True)
class Speed:
    seconds_per_batch: float
    images_per_second: float
    mfu: float | None  # None: no FLOP count or no known device peak


class SpeedMeter:
    """Counts batches, images and FLOPs (per device) since the last ``read``."""

    def __init__(self, peak_flops: float | None):
        self.peak_flops = peak_flops
        self._reset()

    def _reset(self) -> None:
        self._start = time.perf_counter()
        self._batches = self._images = 0
        self._flops: float | None = 0.0
        self._excluded_seconds = 0.0

    def batch(self, images: int, flops: float | None) -> None:
        """One batch dispatched: ``images`` in it, ``flops`` its cost on one device."""
        self._batches += 1
        self._images += images
        self._flops = None if flops is None or self._flops is None else self._flops + flops

    def exclude(self, seconds: float) -> None:
        """Seconds spent on something else than training (e.g. compiling)."""
        self._excluded_seconds += seconds

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """A block whose wall time is not training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.exclude(time.perf_counter() - start)

    def read(self) -> Speed:
        """The speed since the last read; starts a new span."""
        seconds = max(time.perf_counter() - self._start - self._excluded_seconds, 1e-9)
        batches = max(self._batches, 1)
        speed = Speed(seconds / batches, self._images / seconds,
                      utilisation(self._flops, seconds, self.peak_flops))
        self._reset()
        return speed
