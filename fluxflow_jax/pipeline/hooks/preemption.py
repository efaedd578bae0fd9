"""A stop signal (SIGTERM, SIGINT; ``fluxflow_jax.pipeline.interrupts``) ends the run after
the batch running, once its checkpoint is written."""

from __future__ import annotations

from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.hooks.checkpoint import Checkpoint
from fluxflow_jax.pipeline.interrupts import Interrupted, StopSignals
from fluxflow_jax.training.state import PackedState


class Preemption(Hook):
    """Saves (unless the batch's checkpoint is written already) and raises ``Interrupted``."""

    def __init__(self, signals: StopSignals, checkpoint: Checkpoint):
        self.signals, self.checkpoint = signals, checkpoint

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        if not info.stopping:
            return
        if not info.saved:
            self.checkpoint.save(state, info)
        raise Interrupted(self.signals.received, info.global_step,
                          self.checkpoint.checkpoints.directory)
