"""Held-out validation after a batch: every ``output.validation_interval`` batches, at epoch
ends whose transition compares a validation metric, and at each stage's end."""

from __future__ import annotations

from collections.abc import Callable

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline import validation
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.validation import Validation
from fluxflow_jax.training.state import PackedState, viewing


class Validate(Hook):
    """Measures the current weights, as ``info.validation``; shows them, and keeps the
    newest value of a transition metric among them. ``at_stage_end``: this one runs after
    the transitions, at a stage end no earlier validation of the batch covered."""

    def __init__(self, measure: Validation, models: FluxFlowModels,
                 echo: Callable[[str], None], *, at_stage_end: bool = False):
        self.measure, self.models, self.echo = measure, models, echo
        self.at_stage_end = at_stage_end

    def _due(self, info: StepInfo) -> bool:
        if self.at_stage_end:
            return info.done and info.validation is None
        return self.measure.due(info.stage.transition, info.position.stage_batches,
                                info.epoch_end)

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        if not self._due(info):
            return
        with info.speed.excluded(), viewing(state.unpack(), self.models) as models:
            values = self.measure(models, info.stage.config)
        info.validation = values
        self.echo(validation.summary(values))
        metric = info.stage.transition.metric
        if metric in values:
            info.position.history = [values[metric]]
