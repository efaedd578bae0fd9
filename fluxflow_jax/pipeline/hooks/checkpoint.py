"""Run checkpoints: every ``checkpoint_save_interval`` batches of a stage, at epoch ends and
at stage ends, the state with a record of where the run is (the position, the loader's
state), from which a resumed run continues exactly."""

from __future__ import annotations

import dataclasses
from typing import Any

from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.pipeline.checkpoints import RunCheckpoints
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.resume import run_record
from fluxflow_jax.pipeline.run_data import RunData
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training.state import PackedState



class Checkpoint(Hook):
    def __init__(self, checkpoints: RunCheckpoints, stages: list[Stage], data: RunData,
                 model: FluxFlowConfig):
        self.checkpoints, self.stages, self.data = checkpoints, stages, data
        self.run = run_record([s.name for s in stages], model)  # what each record says

    def save(self, state: PackedState, info: StepInfo) -> None:
        """Checkpoint the state after ``info``'s batch (whatever is due)."""
        position = info.position
        if not (info.epoch_end or info.done):  # mid-epoch: the console window goes on
            position.averages = info.window.values()
        with info.writing(state):
            self.checkpoints.save(position.global_step, state.unpack(), {
                **self.run, "position": dataclasses.asdict(position),
                "loader": self.data.state(self.stages, position)})
        info.saved = True

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        if info.interval or info.epoch_end or info.done:
            self.save(state, info)
