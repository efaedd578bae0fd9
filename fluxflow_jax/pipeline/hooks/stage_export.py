"""A stage's end writes its weights (``flxflow_step_<name>_final.safetensors``, its text
encoder and discriminator, and their averages) and the latest ``flxflow_final.safetensors``,
all loadable by PyTorch ``fluxflow``; the position then moves to the next stage."""

from __future__ import annotations

from pathlib import Path

from fluxflow_jax.evaluation.checkpoint import data_record
from fluxflow_jax.interop import save_fluxflow, save_step_files
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import DataConfig
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.training.state import PackedState, write_to_models


class StageExport(Hook):
    """Every process gathers the weights (a computation over all devices); ``writer``
    (process 0) writes them."""

    def __init__(self, output: Path, models: FluxFlowModels, data: DataConfig, writer: bool):
        self.output, self.models, self.data, self.writer = output, models, data, writer

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        if not info.done:
            return
        stage, position = info.stage, info.position
        with info.writing(state):
            unpacked = state.unpack()
            if stage.name and stage.ema_components:  # the averages, for `export --step --ema`
                averaged = write_to_models(unpacked, self.models, ema=True)
                if self.writer:
                    save_step_files(self.output, averaged, stage.name, ema=True)
            models = write_to_models(unpacked, self.models)
            if self.writer:
                if stage.name:
                    save_step_files(self.output, models, stage.name)
                save_fluxflow(self.output, models, training_info={
                    "step": stage.label, "global_step": position.global_step,
                    **data_record(self.data)}, warn_torch=False)
        position.stages_completed.append(stage.label)
        position.next_stage()
