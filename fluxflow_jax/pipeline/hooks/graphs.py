"""The training graphs (``fluxflow_jax.pipeline.graphs``), redrawn at each stage's end."""

from __future__ import annotations

import logging
from pathlib import Path

from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.training.state import PackedState

log = logging.getLogger(__name__)


class Graphs(Hook):
    def __init__(self, output: Path):
        self.output = output

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        if not info.done:
            return
        from fluxflow_jax.pipeline.graphs import write_graphs  # loads matplotlib

        with info.speed.excluded():
            try:
                write_graphs(self.output)
            except (ValueError, OSError) as err:  # a missing graph never stops training
                log.warning("training graphs not drawn: %s", err)
