"""The training run: its stages in order, each trained by the loop (``loop.train_stage``)
with the run's hooks after every batch (``hooks``, assembled in ``Run.hooks``).

A resumed run continues from the newest intact checkpoint's record exactly: the same
batches, the same random keys (folded from the seed and the global step), the same updates.
SIGTERM and SIGINT make the current batch the last, with a checkpoint (``interrupts``); a
damaged newest checkpoint gives way to the newest intact one. Each step shape is compiled
before its first batch and refused if it cannot fit in memory (``memory``).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from fluxflow_jax import parallel
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.checkpoints import RunCheckpoints
from fluxflow_jax.pipeline.config import RunConfig
from fluxflow_jax.pipeline.hooks import Hook
from fluxflow_jax.pipeline.hooks.checkpoint import Checkpoint
from fluxflow_jax.pipeline.hooks.console import Console
from fluxflow_jax.pipeline.hooks.graphs import Graphs
from fluxflow_jax.pipeline.hooks.metrics_file import MetricsFile
from fluxflow_jax.pipeline.hooks.preemption import Preemption
from fluxflow_jax.pipeline.hooks.profiler import Profiler
from fluxflow_jax.pipeline.hooks.samples import SampleImages
from fluxflow_jax.pipeline.hooks.stage_export import StageExport
from fluxflow_jax.pipeline.hooks.tensorboard import TensorBoard, tensorboard_enabled
from fluxflow_jax.pipeline.hooks.transitions import Transitions, transition_due
from fluxflow_jax.pipeline.hooks.validation import Validate
from fluxflow_jax.pipeline.interrupts import StopSignals
from fluxflow_jax.pipeline.loop import train_stage
from fluxflow_jax.pipeline.memory import TRAIN_LEVERS, check_fits
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.resume import check_own_checkpoints, differences, refusal
from fluxflow_jax.pipeline.run_data import RunData
from fluxflow_jax.pipeline.samples import Samples, samples_enabled
from fluxflow_jax.pipeline.setup import (check_output_path, check_text_inputs, initial_models,
                                         load_lpips, make_mesh)
from fluxflow_jax.pipeline.stages import Stage, build_stages
from fluxflow_jax.pipeline.validation import Validation
from fluxflow_jax.training.performance import peak_flops
from fluxflow_jax.training.state import TrainState
from fluxflow_jax.training.train_step import Compilation, TrainStep

__all__ = ["Position", "Run", "transition_due"]


class Run:
    """One training run of ``config``: constructing it builds and checks everything (data,
    stages, devices, models); ``run()`` trains to the end, resuming from the output's
    checkpoints."""

    def __init__(self, config: RunConfig, *, resume: bool = True,
                 echo: Callable[[str], None] = print):
        # Every process trains; only process 0 prints and writes files (orbax coordinates
        # the checkpoints of all of them).
        self.writer = jax.process_index() == 0
        self.config, self.echo = config, echo if self.writer else (lambda line: None)
        self.output = Path(config.output.output_path)
        check_output_path(config)
        self.data = RunData(config)
        self.stages = build_stages(config, self.data.batches_per_epoch)
        for news in self.data.bad_samples_news(self.data.loaders.made()):  # the header scans
            self.echo(f"Before training: {news}")
        self.mesh = make_mesh(config)
        self.models: FluxFlowModels = initial_models(config)
        if resume:  # before anything is written there
            check_own_checkpoints(self.output, [s.name for s in self.stages],
                                  self.models.config)
        check_text_inputs(self.models.config, config.data, self.data.main.tokenizer,
                          self.stages)
        self.lpips = load_lpips(config, self.stages)
        self.validation = (None if config.output.validation_interval is None
                           else Validation(config, self.data.main.tokenizer, self.lpips))
        self.samples = (Samples(config, self.data.main, self.models.config)
                        if samples_enabled(config.output) else None)
        self.resume = resume
        self.base_key = jax.random.PRNGKey(config.training.seed)
        self.sharding = parallel.batch_sharding(self.mesh) if self.mesh else None
        self.devices = list(self.mesh.devices.flat) if self.mesh else jax.devices()[:1]
        self.precision = config.training.compute_precision
        self.peak_flops = peak_flops(jax.devices()[0], self.precision)
        self.tensorboard = tensorboard_enabled(config.output)
        self.checkpoints: RunCheckpoints | None = None  # opened by run()
        # SIGTERM / SIGINT stop the run at the next batch end (one process only: the
        # processes of a multi-host run would have to agree on the batch).
        self.stop = StopSignals()

    def hooks(self) -> list[Hook]:
        """What runs after each batch, in order (``fluxflow_jax.pipeline.hooks``)."""
        output, writer = self.config.output, self.writer
        console = Console(self.echo, len(self.stages))
        echo = console.echo
        checkpoint = Checkpoint(self.checkpoints, self.stages, self.data, self.models.config)
        validation = self.validation
        hooks = [
            output.profile_steps and Profiler(self.output, output.profile_steps, echo,
                                              self.checkpoints.wait),
            console,
            validation and Validate(validation, self.models, echo),
            Transitions(echo, self.data),
            validation and Validate(validation, self.models, echo, at_stage_end=True),
            MetricsFile(self.output) if writer else None,
            StageExport(self.output, self.models, self.config.data, writer),
            Graphs(self.output) if output.generate_diagrams and writer else None,
            self.samples and SampleImages(self.samples, self.models, output),
            TensorBoard(self.output) if self.tensorboard and writer else None,
            checkpoint,
            Preemption(self.stop, checkpoint),
        ]
        return [hook for hook in hooks if hook]

    # -- the run ----------------------------------------------------------------------

    def run(self) -> Position:
        """Train every remaining stage; the final position."""
        note = self.models.config.torch_note()
        if note:  # said once here rather than by every export
            self.echo(f"Warning: {note}")
        self.output.mkdir(parents=True, exist_ok=True)
        checkpoint_dir = self.output / "checkpoints"
        if not self.resume and checkpoint_dir.exists() and self.writer:
            self.echo(f"--no_resume: removing the previous run's checkpoints in "
                      f"{checkpoint_dir}")
            shutil.rmtree(checkpoint_dir)
        if jax.process_count() > 1:  # no process opens the checkpoints before that
            multihost_utils.sync_global_devices("fluxflow_jax: checkpoints ready")
        self.checkpoints = RunCheckpoints(checkpoint_dir, self.config.output.keep_last)
        # Closing waits for the checkpoint writes (a stop signal waits with it).
        with self.stop if jax.process_count() == 1 else contextlib.nullcontext(), \
                self.checkpoints:
            position, state = self._start()
            hooks = self.hooks()
            for stage in self.stages[position.stage:]:
                state = train_stage(self, stage, position, state, hooks)
            self.echo("PIPELINE TRAINING COMPLETE" if self.config.is_pipeline
                      else "TRAINING COMPLETE")
            return position

    def _start(self) -> tuple[Position, TrainState | None]:
        """The position and state of the newest intact checkpoint (damaged newer ones are
        named in one line and set aside), or a fresh start."""
        if self.checkpoints.latest() is None:
            return Position(), None
        latest, (position, state, record), damaged = self.checkpoints.newest_intact(
            self._restore, fix="pass --no_resume to train afresh (deleting them)")
        if damaged:
            self.echo(self.checkpoints.fallback_line(latest, damaged))
            for err in damaged if self.writer else ():
                self.checkpoints.set_aside(err.step)
        self.data.restore(self.stages, position, record["loader"])
        if position.stage >= len(self.stages):
            self.echo(f"The run in {self.output} is complete (checkpoint {latest}); pass "
                      "--no_resume to train it again from the start")
        else:
            self.echo(f"Resuming from checkpoint {latest}: step {position.stage + 1}/"
                      f"{len(self.stages)} ('{self.stages[position.stage].label}'), epoch "
                      f"{position.epoch + 1}, batch {position.batch}, global step "
                      f"{position.global_step}")
        return position, state

    def _restore(self, step: int) -> tuple[Position, TrainState, dict[str, Any]]:
        """Checkpoint ``step``'s position, state and record, checked against this run."""
        record = self.checkpoints.record(step)
        found = differences(record, [s.name for s in self.stages], self.models.config)
        if found:
            raise refusal(self.output, found)
        position = Position(**record["position"])
        stage = self.stages[position.state_stage]
        like = self.train_step(stage).init_state(self.models,
                                                 carried_averages=stage.ema_components)
        state, _ = self.checkpoints.restore(like, step)
        return position, state, record

    def train_step(self, stage: Stage) -> TrainStep:
        return TrainStep(self.models, stage.config, lpips=self.lpips, mesh=self.mesh,
                         shard_params=self.config.training.shard_params,
                         precision=self.precision, remat=self.config.training.remat)

    # -- memory -------------------------------------------------------------------------

    def check_memory(self, stage: Stage, compilation: Compilation) -> None:
        """Raise ``DoesNotFit`` if ``stage``'s compiled step cannot fit on the devices."""
        model, training = self.models.config, self.config.training
        shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}"
                           for name, shape, _ in compilation.shapes if name == "images")
        check_fits(compilation.memory, self.devices,
                   f"the train step of '{stage.label}' (batch_size {stage.feed.batch_size}, "
                   f"{shapes}, img_size {self.config.data.img_size}, vae_dim "
                   f"{model.vae_dim}, flow_dim {model.flow_dim}, text_dim {model.text_dim}, "
                   f"precision {self.precision}, remat {str(training.remat).lower()}, "
                   f"shard_params {str(training.shard_params).lower()})", TRAIN_LEVERS)

    def compile_stages(self) -> list[tuple[Stage, Compilation]]:
        """Each stage's step compiled for the first batch, from an abstract state (nothing
        allocated): the memory estimates ``validate --memory`` prints."""
        compiled = []
        for stage in self.stages:
            with self.data.epoch(stage, Position()) as batches:
                inputs = next(batches).step_inputs()
            step = self.train_step(stage)
            like = jax.eval_shape(lambda step=step, stage=stage: step.init_state(
                self.models, carried_averages=stage.ema_components))
            step.compile(like, inputs, self.base_key)
            compiled.append((stage, step.compilations[-1]))
        return compiled
