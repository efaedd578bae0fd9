"""A stage's end writes its weights (``flxflow_step_<name>_final.safetensors``, its text
encoder and discriminator, and their averages) and the latest ``flxflow_final.safetensors``,
all loadable by PyTorch ``fluxflow``; the position then moves to the next stage."""

from __future__ import annotations

from pathlib import Path

from fluxflow_jax.evaluation.checkpoint import data_record
from fluxflow_jax.interop import save_fluxflow, save_step_files
from fluxflow_jax.interop.checkpoint import layout_files
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import DataConfig
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training.state import PackedState, TrainState, viewing, write_to_models


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
            models = write_to_models(unpacked, self.models)
            if self.writer:
                save_fluxflow(self.output, models, training_info={
                    "step": stage.label, "global_step": position.global_step,
                    **data_record(self.data)}, warn_torch=False)
            if stage.name:
                self._save_step_files(unpacked, stage)
        position.stages_completed.append(stage.label)
        position.next_stage()

    def _save_step_files(self, state: TrainState, stage: Stage) -> None:
        """The step's files, as links to the latest files just written; where the step
        keeps averages, also its averaged files (for `export --step --ema`), those whose
        components have no average again as links."""
        latest = {components: self.output / name
                  for components, name in layout_files().items()}
        if self.writer:
            save_step_files(self.output, self.models, stage.name, copies_of=latest)
        if not stage.ema_components:
            return
        with viewing(state, self.models, ema=True) as averaged:
            if self.writer:
                save_step_files(self.output, averaged, stage.name, ema=True, copies_of={
                    components: path for components, path in latest.items()
                    if not set(components) & set(stage.ema_components)})
