"""A ``jax.profiler`` trace of chosen global steps (``--profile_steps A:B``), written to
``<output>/profile``: an ``.xplane.pb`` for TensorBoard's profile plugin and a
``perfetto_trace.json.gz`` for Perfetto.

``A:B`` reads as a Python slice of the run's steps counted from 0: the trace starts once
global step A is done and ends once step B is (steps A+1 to B, 1-based as the console
counts them).

Tracing switches Python's profiling on and off in every thread; CPython can crash when a
thread starts or ends at that moment, so the trace starts and stops only once the run's
checkpoint writer threads have finished (``settle``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax

from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training.state import PackedState


class Profiler(Hook):
    def __init__(self, output: Path, steps: str, echo: Callable[[str], None],
                 settle: Callable[[], None]):
        self.first, self.last = map(int, steps.split(":"))  # checked by the config
        self.directory, self.echo, self.settle = output / "profile", echo, settle
        self.tracing, self.traced = False, 0  # the newest global step traced

    def _start_if_due(self, global_step: int) -> None:
        if global_step == self.first and not self.tracing:
            self.settle()
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.tracing = True

    def start_stage(self, stage: Stage, position: Position, resuming: bool) -> None:
        self._start_if_due(position.global_step)

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        self.traced = info.global_step
        if self.tracing and info.global_step >= self.last:
            jax.block_until_ready(state.leaves)  # the traced steps' device work, whole
            self._stop()
        self._start_if_due(info.global_step)

    def _stop(self) -> None:
        self.settle()
        jax.profiler.stop_trace()
        self.tracing = False
        self.echo(f"Profile of global steps {self.first + 1}-{self.traced} written to "
                  f"{self.directory} (tensorboard --logdir, or perfetto_trace.json.gz in Perfetto)")

    def close(self) -> None:
        if self.tracing:  # the stage (or the run) ended inside the range
            self._stop()
