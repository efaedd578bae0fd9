"""Epoch and stage ends: the position moves past a finished epoch, and the stage ends when
its transition holds, its epochs are done or its ``max_steps`` is reached."""

from __future__ import annotations

import time
from collections.abc import Callable

from fluxflow_jax.pipeline.console import format_duration
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.position import SMOOTHING, Position
from fluxflow_jax.pipeline.run_data import RunData
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training.state import PackedState


def transition_due(stage: Stage, position: Position) -> tuple[bool, str]:
    """At an epoch end (``position.epoch`` epochs done): whether the stage ends, and why (or,
    for a threshold not met yet, where the metric stands). Updates ``position.met``."""
    rule, status = stage.transition, ""
    if rule.mode == "loss_threshold" and position.epoch >= rule.min_epochs:
        values = position.history[-SMOOTHING:]
        if values:
            smoothed = sum(values) / len(values)
            met = smoothed > rule.threshold if rule.comparison == ">" else \
                smoothed < rule.threshold
            position.met = position.met + 1 if met else 0
            if position.met >= rule.patience:
                return True, (f"{rule.metric}={smoothed:.4f} {rule.comparison} "
                              f"{rule.threshold} at {position.met} epoch end(s) in a row "
                              "(threshold met)")
            status = (f"{rule.metric}={smoothed:.4f} (target {rule.comparison} "
                      f"{rule.threshold}, epoch {position.epoch}/{stage.epochs})")
    if position.epoch >= stage.epochs:
        return True, f"completed {position.epoch} epoch(s)"
    return False, status


class Transitions(Hook):
    """Sets ``info.done`` and ``info.reason``; reports each epoch's time and bad samples."""

    def __init__(self, echo: Callable[[str], None], data: RunData):
        self.echo, self.data = echo, data

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        position = info.position
        if info.epoch_end:
            position.epoch += 1
            position.data_epoch += 1
            position.batch = 0
            position.averages = {}  # the console window restarts every epoch
            self.echo(f"Epoch {position.epoch} completed in "
                      f"{format_duration(time.perf_counter() - info.epoch_started)}")
            for news in self.data.bad_samples_news([self.data.loader(info.stage)]):
                self.echo(f"Epoch {position.epoch}: {news}")
            info.done, info.reason = transition_due(info.stage, position)
            if info.reason and not info.done:
                self.echo(f"Transition check: {info.reason}")
        if info.capped and not info.done:
            info.done, info.reason = True, f"reached max_steps ({info.stage.max_batches} batches)"
        if info.done and not info.epoch_end:  # the next stage starts a fresh data epoch
            position.data_epoch += 1
