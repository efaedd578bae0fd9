"""Run checkpoints: every ``checkpoint_save_interval`` batches of a stage, at epoch ends and
at stage ends, the state with a record of where the run is (the position, the loader's
state), from which a resumed run continues exactly."""

from __future__ import annotations

import dataclasses
from typing import Any

from fluxflow_jax.pipeline.checkpoints import RunCheckpoints
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.run_data import RunData
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training.state import PackedState

RECORD_FORMAT = 1


def record(stages: list[Stage], position_record: dict[str, Any],
           loader_state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint says besides its arrays."""
    return {"format": RECORD_FORMAT, "stages": [s.name for s in stages],
            "position": position_record, "loader": loader_state}


class Checkpoint(Hook):
    def __init__(self, checkpoints: RunCheckpoints, stages: list[Stage], data: RunData):
        self.checkpoints, self.stages, self.data = checkpoints, stages, data

    def save(self, state: PackedState, info: StepInfo) -> None:
        """Checkpoint the state after ``info``'s batch (whatever is due)."""
        position = info.position
        if not (info.epoch_end or info.done):  # mid-epoch: the console window goes on
            position.averages = info.window.values()
        with info.writing(state):
            self.checkpoints.save(position.global_step, state.unpack(), record(
                self.stages, dataclasses.asdict(position),
                self.data.state(self.stages, position)))
        info.saved = True

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        if info.interval or info.epoch_end or info.done:
            self.save(state, info)
