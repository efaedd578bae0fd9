"""Validation during training: the held-out metrics of ``fluxflow-jax evaluate``, every
``output.validation_interval`` batches and at each stage's end, named ``val_<metric>``.

A stage is validated on what it trains: reconstructions when it trains the autoencoder,
the fixed-timestep flow loss and the caption scores of generated images when it trains the
flow. The metrics go to the stage's metrics file (and so to its graphs), and a transition
may compare one with a threshold (``transition_on: "val_psnr > 24"``).
"""

from __future__ import annotations

import re

from fluxflow_jax.data.loader import Tokenizer
from fluxflow_jax.evaluation import HeldOutError, evaluate, held_out, metric_names
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import ConfigError, RunConfig, TransitionConfig
from fluxflow_jax.pipeline.metrics_log import VALIDATION_PREFIX as PREFIX
from fluxflow_jax.training import modes
from fluxflow_jax.training.lpips import LPIPS
from fluxflow_jax.training.train_step import StageConfig


def parts(stage: StageConfig) -> tuple[str, ...]:
    """The evaluation parts that measure what ``stage`` trains."""
    return modes.validated_parts(stage.vae, stage.flow)


def names(run: RunConfig, stage: StageConfig) -> tuple[str, ...]:
    """The validation metrics ``stage`` reports (none when validation is off)."""
    if run.output.validation_interval is None:
        return ()
    return tuple(PREFIX + name for name in metric_names(parts(stage), with_lpips=True))


def summary(values: dict[str, float]) -> str:
    """The console line: the headline metrics (no chance levels or single timesteps)."""
    shown = {name: value for name, value in values.items()
             if not name.endswith("_chance") and not re.search(r"_t\d+$", name)}
    return "Validation: " + ", ".join(f"{name}={value:.4f}" for name, value in shown.items())


class Validation:
    """The held-out samples, drawn once, and the metrics of a stage's current weights."""

    def __init__(self, run: RunConfig, tokenizer: Tokenizer, lpips: LPIPS | None):
        self.interval: int = run.output.validation_interval
        try:
            self.held_out = held_out(run.data, tokenizer)
        except HeldOutError as err:
            raise ConfigError([f"output.validation_interval: {err}"]) from None
        self.lpips = lpips

    def due(self, transition: TransitionConfig, stage_batches: int, epoch_end: bool) -> bool:
        """After the stage's ``stage_batches``-th batch: at the interval, and at epoch ends
        where the transition compares a validation metric (so that it sees the weights it
        decides on). The run also validates at each stage's end."""
        return stage_batches % self.interval == 0 or (
            epoch_end and (transition.metric or "").startswith(PREFIX))

    def __call__(self, models: FluxFlowModels, stage: StageConfig) -> dict[str, float]:
        """``val_<metric>`` of ``models`` for what ``stage`` trains."""
        values = evaluate(models, self.held_out, parts=parts(stage), lpips=self.lpips)
        return {PREFIX + name: value for name, value in values.items()}
