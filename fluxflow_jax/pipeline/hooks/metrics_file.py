"""The stage's metrics file (``graph/training_metrics_<stage>.jsonl``): a record at each log
point, and one per validation."""

from __future__ import annotations

from pathlib import Path

from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.metrics_log import MetricsLog
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training.state import PackedState


class MetricsFile(Hook):
    def __init__(self, output: Path):
        self.output = output
        self.log: MetricsLog | None = None

    def start_stage(self, stage: Stage, position: Position, resuming: bool) -> None:
        # A resumed stage drops the records past its checkpoint, written before a kill.
        self.log = MetricsLog(self.output, stage.name,
                              position.global_step if resuming else None)

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        if info.logged:
            averages, speed = info.report
            extras = {"batch_time": speed.seconds_per_batch, "skipped": info.position.skipped,
                      "images_per_second": speed.images_per_second}
            if speed.mfu is not None:
                extras["mfu"] = speed.mfu
            self.log.log(info.epoch, info.batch - 1, info.global_step, averages,
                         extras=extras)
        if info.validation is not None:
            self.log.log(info.epoch, info.batch - 1, info.global_step, info.validation)

    def close(self) -> None:
        if self.log:
            self.log.close()
            self.log = None
