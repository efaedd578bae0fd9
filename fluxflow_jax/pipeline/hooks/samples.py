"""Sample images (``fluxflow_jax.pipeline.samples``) at epoch and stage ends, and every
``output.sample_interval`` global steps, or, without one, at every
``samples_per_checkpoint``-th interval checkpoint of a stage."""

from __future__ import annotations

from contextlib import nullcontext

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import OutputConfig
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.samples import Samples
from fluxflow_jax.training.state import PackedState, viewing


class SampleImages(Hook):
    """Files are named after the 1-based epoch and batch the samples follow."""

    def __init__(self, samples: Samples, models: FluxFlowModels, output: OutputConfig):
        self.samples, self.models, self.output = samples, models, output

    def _periodic(self, info: StepInfo) -> bool:
        if self.output.sample_interval is not None:
            return info.global_step % self.output.sample_interval == 0
        interval, batches = self.output.checkpoint_save_interval, info.position.stage_batches
        return batches % interval == 0 and \
            (batches // interval) % self.output.samples_per_checkpoint == 0

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        if not (info.done or info.epoch_end or self._periodic(info)):
            return
        # A stage end has just written its weights into the models.
        weights = nullcontext(self.models) if info.done else viewing(state.unpack(),
                                                                      self.models)
        with info.writing(state), weights as models:
            info.samples = self.samples.write(models, info.stage, info.epoch + 1, info.batch)
