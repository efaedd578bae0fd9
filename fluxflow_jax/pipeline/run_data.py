"""The run's data loaders and their position: which batch comes next, for each stage.

Each stage reads its step's dataset through a loader of its own per accumulation count
(``setup.Loaders``; steps with the same data and effective batch share one), whose batches
are the stage's effective batches. Where each loader is follows from the run's ``Position``
(the data epoch and the batches of it trained), so a checkpoint's loader state is derived
from the position it records, and a resumed loader continues from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fluxflow_jax.data import Batch, DataLoader
from fluxflow_jax.pipeline.config import RunConfig, StepConfig
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.setup import Loaders
from fluxflow_jax.pipeline.stages import Stage


class RunData:
    """The loaders of a run, positioned by ``Position``."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.loaders = Loaders(config)
        self.main: DataLoader = self.loaders.for_step(config.steps()[0], 1)
        # Skipped samples reported so far, per loader.
        self.skips_reported: dict[DataLoader, int] = {}

    def batches_per_epoch(self, step: StepConfig, accumulation: int) -> int:
        """The batches of one epoch of ``step`` with ``accumulation`` micro-batches each."""
        return self.loaders.for_step(step, accumulation).batches_per_epoch()

    def loader(self, stage: Stage) -> DataLoader:
        return self.loaders.for_step(stage.step, stage.config.gradient_accumulation_steps)

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

    def bad_samples_news(self, loaders: list[DataLoader]) -> list[str]:
        """The bad samples ``loaders`` found since the last report, one line per loader
        with news (then counted as reported)."""
        lines = []
        for loader in dict.fromkeys(loaders):
            report, reported = loader.bad_samples, self.skips_reported.get(loader, 0)
            if report.count > reported:
                lines.append(report.summary(reported))
                self.skips_reported[loader] = report.count
        return lines
