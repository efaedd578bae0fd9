"""The console: each stage's header, a progress line at log points, a bar in between (on a
terminal), and the line that says why a stage ended."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from fluxflow_jax.pipeline.console import ProgressBar, progress_line
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training import StageConfig, modes
from fluxflow_jax.training.state import PackedState


def console_losses(stage: StageConfig, averages: Mapping[str, float]) -> dict[str, float]:
    """The progress line's losses, label -> average in the table's order: those the stage
    trains that have an average (the train step reports zeros for the others)."""
    return {label: averages[metric] for label, metric in modes.shown(stage.vae, stage.flow)
            if metric in averages}


class Console(Hook):
    """Prints through ``print_line``; ``echo`` is for the other hooks' lines (it clears the
    bar first)."""

    def __init__(self, print_line: Callable[[str], None], stage_count: int):
        self.print_line, self.stage_count = print_line, stage_count
        self.bar: ProgressBar | None = None
        self.started = time.perf_counter()

    def echo(self, line: str) -> None:
        if self.bar:
            self.bar.clear()
        self.print_line(line)

    def start_stage(self, stage: Stage, position: Position, resuming: bool) -> None:
        self.started = time.perf_counter()  # elapsed times count from the stage's start
        self.bar = ProgressBar(stage.batches_per_epoch)
        if resuming:
            return
        self.echo("=" * 60)
        self.echo(f"PIPELINE STEP {stage.index + 1}/{self.stage_count}: {stage.label}")
        if stage.step.description:
            self.echo(f"Description: {stage.step.description}")
        self.echo(f"Duration: {stage.epochs} epoch(s) of {stage.batches_per_epoch} batches"
                  + (f", at most {stage.max_batches} batches" if stage.max_batches else ""))
        for note in stage.notes:
            self.echo(note)

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        stage = info.stage
        self.bar.update(info.batch)
        if info.logged:
            averages, speed = info.report
            self.echo(progress_line(
                time.perf_counter() - self.started, stage.label, stage.index + 1,
                self.stage_count, info.epoch + 1, stage.epochs, info.batch,
                stage.batches_per_epoch, console_losses(stage.config, averages),
                speed.seconds_per_batch, info.position.skipped,
                images_per_second=speed.images_per_second, mfu=speed.mfu))
        if info.epoch_end or info.done:
            self.bar.clear()

    def finish_stage(self, stage: Stage, reason: str) -> None:
        self.echo(f"Step '{stage.label}' finished: {reason}")

    def close(self) -> None:
        if self.bar:
            self.bar.clear()
