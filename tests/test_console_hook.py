"""The console hook's progress line: its elapsed time counts from the stage's start (or
resume), across epochs, not from the epoch's."""

from __future__ import annotations

from fluxflow_jax.pipeline.config import load_config
from fluxflow_jax.pipeline.console import RunningAverage
from fluxflow_jax.pipeline.hooks import StepInfo, console
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.speed import SpeedMeter
from fluxflow_jax.pipeline.stages import build_stages
from pipeline_helpers import write_config


def test_elapsed_time_counts_from_the_stage_start(tmp_path, monkeypatch):
    config = load_config(write_config(tmp_path, [
        {"name": "s", "n_epochs": 3, "train_vae": True}], output={"log_interval": 1}))
    [stage] = build_stages(config, batches_per_epoch=4)
    clock = [100.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    hook = console.Console(lines.append, 1)
    position = Position()
    hook.start_stage(stage, position, resuming=False)
    for _ in range(2 * stage.batches_per_epoch + 1):  # into the third epoch
        clock[0] += 1.5
        position.advance()
        info = StepInfo(stage, position, RunningAverage(10), SpeedMeter(None), clock[0],
                        False, config.output)
        hook(None, info)
        if info.epoch_end:
            position.epoch, position.batch = position.epoch + 1, 0
    assert lines[-1].startswith("[0000:00:13.500] Step s (1/1) | Epoch 3/3 | Batch 1/4"), \
        lines[-1]
