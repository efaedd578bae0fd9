"""Where a run is: the record a checkpoint keeps, from which a resumed run continues."""

from __future__ import annotations

from dataclasses import dataclass, field

SMOOTHING = 20  # the transition metric's history: the last SMOOTHING values


@dataclass
class Position:
    """Where a run is: what the next batch is, and what the loop has accumulated so far."""

    stage: int = 0  # the stage running (or next to run)
    state_stage: int = 0  # the stage whose train state the checkpoint holds
    epoch: int = 0  # epochs of the stage finished
    batch: int = 0  # batches of the current epoch finished
    stage_batches: int = 0
    global_step: int = 0  # batches of the whole run finished
    data_epoch: int = 0  # the loader epoch the current epoch reads
    skipped: int = 0  # updates the non-finite guard discarded
    history: list[float] = field(default_factory=list)  # transition metric, newest last
    met: int = 0  # consecutive epoch ends the threshold held at
    averages: dict[str, list[float]] = field(default_factory=dict)  # console window
    stages_completed: list[str] = field(default_factory=list)

    def record(self, value: float) -> None:
        """A new value of the transition metric."""
        self.history = (self.history + [value])[-SMOOTHING:]

    def advance(self) -> None:
        """One batch trained."""
        self.batch += 1
        self.stage_batches += 1
        self.global_step += 1

    def next_stage(self) -> None:
        """The stage is done: the next one starts at its beginning."""
        self.stage += 1
        self.epoch = self.batch = self.stage_batches = self.met = 0
        self.history, self.averages = [], {}
