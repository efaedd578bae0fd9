"""The run's data loaders and their position: which batch comes next, for each stage.

A stage whose steps accumulate micro-batches reads effective batches from a loader of its
own (one per accumulation count). Where each loader is follows from the run's ``Position``
(the data epoch and the batches of it trained), so a checkpoint's loader state is derived
from the position it records, and a resumed loader continues from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fluxflow_jax.data import Batch, DataLoader
from fluxflow_jax.pipeline.config import RunConfig
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.setup import make_loader
from fluxflow_jax.pipeline.stages import Stage


class RunData:
    """The loaders of a run (made once per accumulation count), positioned by ``Position``."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.main: DataLoader = make_loader(config)
        self._loaders = {1: self.main}
        self.skips_reported = self.main.bad_samples.count  # found by the header scan

    def loader_for(self, accumulation: int) -> DataLoader:
        """The loader of steps with ``accumulation`` micro-batches per update: its batches
        are their effective batches."""
        if accumulation not in self._loaders:
            self._loaders[accumulation] = make_loader(self.config, accumulation)
        return self._loaders[accumulation]

    def loader(self, stage: Stage) -> DataLoader:
        return self.loader_for(stage.config.gradient_accumulation_steps)

    def _next_loader(self, stages: list[Stage], position: Position) -> DataLoader:
        """The loader of the stage running at ``position`` (the last one once all ran)."""
        return self.loader(stages[min(position.stage, len(stages) - 1)])

    def state(self, stages: list[Stage], position: Position) -> dict[str, Any]:
        """The loader state a checkpoint at ``position`` records: where the next batch is."""
        return self._next_loader(stages, position).position_state(position.data_epoch,
                                                                  position.batch)

    def restore(self, stages: list[Stage], position: Position, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's loader ``state`` (checked against the settings)."""
        self._next_loader(stages, position).restore(state)

    @contextmanager
    def epoch(self, stage: Stage, position: Position) -> Iterator[Iterator[Batch]]:
        """The rest of the current data epoch's batches. Leaving them (at an epoch's or a
        stage's end, with batches read ahead) puts the loader at the start of the data
        epoch the position has moved to."""
        loader = self.loader(stage)
        batches = loader.epoch(position.data_epoch)
        try:
            yield batches
        finally:
            batches.close()
            loader.seek(position.data_epoch)

    def bad_samples_news(self) -> str | None:
        """The bad samples found since the last report, if any (then counted as reported)."""
        report = self.main.bad_samples
        if report.count <= self.skips_reported:
            return None
        line = report.summary(self.skips_reported)
        self.skips_reported = report.count
        return line
