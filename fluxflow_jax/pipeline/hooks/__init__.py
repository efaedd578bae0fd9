"""What runs after each batch of the training loop, each concern its own small hook.

A hook is called as ``hook(state, info)`` after every batch, in the order the run assembles
them (``Run.hooks``); ``info`` (``StepInfo``) says where the batch was and what is due, and
hooks that decide something (the stage ends, a validation ran) note it there for the hooks
after them. ``start_stage``, ``finish_stage`` and ``close`` bracket each stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import jax

from fluxflow_jax.pipeline.config import OutputConfig
from fluxflow_jax.pipeline.console import RunningAverage
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.speed import Speed, SpeedMeter
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training.state import PackedState


@dataclass
class StepInfo:
    """One batch just trained: where it was, what is due after it, and what hooks decided."""

    stage: Stage
    position: Position  # the run's position, which hooks move (epoch and stage ends)
    window: RunningAverage  # the console's averages of the epoch
    speed: SpeedMeter
    epoch_started: float  # ... at the epoch's start
    stopping: bool  # a stop signal arrived
    output: OutputConfig  # the intervals
    epoch: int = field(init=False)  # 0-based epoch of the stage the batch belongs to
    batch: int = field(init=False)  # 1-based batch of that epoch
    global_step: int = field(init=False)  # batches of the run trained, this one included
    logged: bool = field(init=False)  # a console line and metrics record are due
    interval: bool = field(init=False)  # an interval checkpoint is due
    epoch_end: bool = field(init=False)
    capped: bool = field(init=False)  # the stage's max_steps is reached
    done: bool = False  # the stage ends after this batch (set by the transitions hook)
    reason: str = ""  # why it ends
    validation: dict[str, float] | None = None  # held-out metrics measured after the batch
    saved: bool = False  # a checkpoint was written after the batch
    samples: list[Path] = field(default_factory=list)  # sample images written after it

    def __post_init__(self) -> None:
        position, stage, output = self.position, self.stage, self.output
        self.epoch, self.batch = position.epoch, position.batch
        self.global_step = position.global_step
        self.logged = (position.batch - 1) % output.log_interval == 0
        self.interval = position.stage_batches % output.checkpoint_save_interval == 0
        self.epoch_end = position.batch >= stage.batches_per_epoch
        self.capped = bool(stage.max_batches) and position.stage_batches >= stage.max_batches

    @property
    def sync(self) -> bool:
        """Whether the metrics of the batches so far must be fetched now."""
        return self.logged or self.epoch_end or self.capped or self.interval or self.stopping

    @cached_property
    def report(self) -> tuple[dict[str, float], Speed]:
        """The console window's averages and the speed since the last report (read once)."""
        return self.window.averages(), self.speed.read()

    @contextmanager
    def writing(self, state: PackedState) -> Iterator[None]:
        """A block that writes the state: the batches so far are waited for first (they
        count as trained), the block's own time is not training time."""
        jax.block_until_ready(state.leaves)
        with self.speed.excluded():
            yield


class Hook:
    """Periodic work after each batch; subclasses override what they need."""

    def start_stage(self, stage: Stage, position: Position, resuming: bool) -> None:
        """A stage starts (``resuming``: from a checkpoint within it)."""

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        """After one batch."""

    def finish_stage(self, stage: Stage, reason: str) -> None:
        """The stage ended normally, for ``reason``."""

    def close(self) -> None:
        """The stage is left, normally or not: release what it holds."""
