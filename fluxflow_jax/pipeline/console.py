"""The training progress line, in the reference's layout under our metric names.

Example: ``[0000:15:23.123] Step vae_gan (2/3) | Epoch 5/20 | Batch 127/500 | VAE: 0.0234 |
KL: 12.4500 | G: 0.1560 | D: 0.0890 | LPIPS: 0.0812 | 2.5 img/s | 3.20s/batch``, with
``MFU 41.3%`` before the last part on accelerators whose peak is known.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from typing import TYPE_CHECKING, Mapping, TextIO

if TYPE_CHECKING:  # the console needs no JAX to format a line
    from fluxflow_jax.training.train_step import Compilation


def format_duration(seconds: float) -> str:
    """``HHHH:MM:SS.mmm``. Rounded to the millisecond first, so 59.9999 s carries to
    ``0000:01:00.000`` instead of showing 60 seconds; hours widen past 9999, never wrap."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"a duration must be a number >= 0, got {seconds}")
    millis = round(seconds * 1000)
    minutes, millis = divmod(millis, 60_000)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:04d}:{minutes:02d}:{millis // 1000:02d}.{millis % 1000:03d}"


def progress_line(elapsed: float, step_name: str, step_index: int, step_count: int,
                  epoch: int, epochs: int, batch: int, batches: int,
                  losses: Mapping[str, float], seconds_per_batch: float,
                  skipped: int = 0, *, images_per_second: float | None = None,
                  mfu: float | None = None) -> str:
    """One progress line. Positions are printed as given (pass 1-based step and epoch
    numbers); ``losses`` maps each shown loss's label to its average, in display order
    (``modes.shown`` says which, for a stage); ``skipped`` batches are shown when there are
    any, the speed (images/s, MFU) when known."""
    parts = [f"[{format_duration(elapsed)}] Step {step_name} ({step_index}/{step_count})",
             f"Epoch {epoch}/{epochs}", f"Batch {batch}/{batches}"]
    parts += [f"{label}: {value:.4f}" for label, value in losses.items()]
    if skipped > 0:
        parts.append(f"skipped {skipped}")
    if images_per_second is not None:
        parts.append(f"{images_per_second:.1f} img/s")
    if mfu is not None:
        parts.append(f"MFU {mfu:.1%}")
    parts.append(f"{seconds_per_batch:.2f}s/batch")  # last, as in the reference's line
    return " | ".join(parts)


def compile_line(step_name: str, compilation: Compilation) -> str:
    """The log line of one compilation of a step: for which inputs, how long, how costly."""
    shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}"
                       for name, shape, _ in compilation.shapes)
    cost = (f", {compilation.flops / 1e9:.4g} GFLOP per call and device"
            if compilation.flops else "")
    memory = (f", {compilation.temp_bytes / 2**20:,.0f} MiB activations"
              if compilation.temp_bytes is not None else "")
    return (f"Compiled step {step_name} for {shapes} in {compilation.seconds:.1f}s"
            f"{cost}{memory}")


def averaging_window(log_interval: int) -> int:
    """The reference's console averaging window: max(2 * log_interval, 10) batches."""
    return max(2 * log_interval, 10)


class RunningAverage:
    """Per-metric mean of the last ``window`` finite values. Non-finite values (a skipped
    batch) are left out, so one bad batch does not blank the line for a whole window."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"the window must be at least 1, got {window}")
        self.window = window
        self._values: dict[str, deque[float]] = {}

    def update(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            number = float(value)
            if math.isfinite(number):
                self._values.setdefault(name, deque(maxlen=self.window)).append(number)

    def values(self) -> dict[str, list[float]]:
        """The values averaged now, for a checkpoint."""
        return {name: list(values) for name, values in self._values.items()}

    def restore(self, values: Mapping[str, list[float]]) -> None:
        self._values = {name: deque(v, maxlen=self.window) for name, v in values.items()}

    def averages(self) -> dict[str, float]:
        """The mean of each metric that has at least one finite value."""
        return {name: sum(values) / len(values) for name, values in self._values.items()}


class ProgressBar:
    """``[#####.....] 37/100`` redrawn in place on a terminal; silent otherwise (logs)."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.width = max(total, 1), width
        self.stream = stream if stream is not None else sys.stderr
        self.active = self.stream.isatty()

    def update(self, done: int) -> None:
        if self.active:
            filled = self.width * min(done, self.total) // self.total
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r[{bar}] {done}/{self.total}")
            self.stream.flush()

    def clear(self) -> None:
        """Erase the bar (before a log line, and at the end)."""
        if self.active:
            self.stream.write("\r" + " " * (self.width + 24) + "\r")
            self.stream.flush()
