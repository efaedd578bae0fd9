"""The training run: its stages in order, each a loop of batches around the stage's jitted
step, with the console, metrics, checkpoints, exports and transitions around it.

The loop is thin. Each batch is dispatched without waiting for the device; metrics are
fetched (one sync) only at log points and epoch ends. After a batch the loop decides once
whether a checkpoint is due (every ``checkpoint_save_interval`` batches, at epoch ends,
at stage ends) and saves the state with a record of where the run is: the next batch to
run, the data loader's position, the transition history and console averages. A resumed run
continues from that record exactly: the same batches, the same random keys (folded from
the seed and the global step), the same updates. SIGTERM and SIGINT make the current batch
the last, with a checkpoint (``interrupts``); a damaged newest checkpoint gives way to the
newest intact one. Each step shape is compiled before its first batch and refused if it
cannot fit in memory (``memory``).

Stage ends write the stage's weights (``flxflow_step_<name>_final.safetensors`` and its
text encoder and discriminator) and the latest ``flxflow_final.safetensors`` layout, both
loadable by PyTorch ``fluxflow``, before the checkpoint that records the stage as done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fluxflow_jax import parallel
from fluxflow_jax.data import DataLoader, prefetch_to_device
from fluxflow_jax.evaluation.checkpoint import data_record
from fluxflow_jax.interop import save_fluxflow, save_step_files
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.checkpoints import RunCheckpoints
from fluxflow_jax.pipeline.config import RunConfig
from fluxflow_jax.pipeline.console import (ProgressBar, RunningAverage, averaging_window,
                                           compile_line, format_duration, progress_line)
from fluxflow_jax.pipeline.interrupts import Interrupted, StopSignals
from fluxflow_jax.pipeline.memory import TRAIN_LEVERS, check_fits
from fluxflow_jax.pipeline.latent_cache import LatentCache
from fluxflow_jax.pipeline.metrics_log import MetricsLog
from fluxflow_jax.pipeline.samples import Samples, samples_enabled
from fluxflow_jax.pipeline.setup import (check_output_path, check_text_inputs, initial_models,
                                         load_lpips, make_loader, make_mesh)
from fluxflow_jax.pipeline.speed import Speed, SpeedMeter
from fluxflow_jax.pipeline.stages import Stage, build_stages
from fluxflow_jax.pipeline import validation
from fluxflow_jax.pipeline.resume import (check_own_checkpoints, differences, refusal,
                                          run_record)
from fluxflow_jax.pipeline.validation import Validation
from fluxflow_jax.training.performance import peak_flops
from fluxflow_jax.training.state import PackedState, TrainState, write_to_models
from fluxflow_jax.training.train_step import Compilation, TrainStep

log = logging.getLogger(__name__)
SMOOTHING = 20  # transition metric: mean of the last SMOOTHING values


@dataclass
class Position:
    """Where a run is: what the next batch is, and what the loop has accumulated so far."""

    stage: int = 0  # the stage running (or next to run)
    state_stage: int = 0  # the stage whose train state the checkpoint holds
    epoch: int = 0  # epochs of the stage finished
    batch: int = 0  # batches of the current epoch finished
    stage_batches: int = 0
    global_step: int = 0  # batches of the whole run finished
    data_epoch: int = 0  # the loader epoch the current epoch reads
    skipped: int = 0  # updates the non-finite guard discarded
    history: list[float] = field(default_factory=list)  # transition metric, newest last
    met: int = 0  # consecutive epoch ends the threshold held at
    averages: dict[str, list[float]] = field(default_factory=dict)  # console window
    stages_completed: list[str] = field(default_factory=list)


def freeze_heap() -> None:
    """Put every live object out of the cyclic collector's reach (until ``gc.unfreeze``).

    Once a step has compiled, ~300k long-lived objects (modules, graphs, traced programs)
    exist, and each full collection walks them all: ~0.2 s, several times per few hundred
    steps (~4 ms per step on average for the tiny flow step). Frozen, they are skipped;
    objects freed by reference counting are still freed at once.
    """
    gc.collect()
    gc.freeze()


def console_metrics(stage: Stage) -> set[str]:
    """The metrics the progress line shows: the losses this stage trains."""
    vae, flow, shown = stage.config.vae, stage.config.flow, set()
    if vae is not None:
        shown |= {"loss_kl"} | ({"loss_recon"} if vae.train_reconstruction else set())
        shown |= {"loss_gen", "loss_disc"} if vae.use_gan else set()
        shown |= {"loss_lpips"} if vae.use_lpips and vae.train_reconstruction else set()
    if flow is not None:
        shown.add("flow_loss")
    return shown


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
        self.loader: DataLoader = make_loader(config)
        self.skips_reported = self.loader.bad_samples.count  # found by the header scan
        if self.skips_reported:
            self.echo(f"Before training: {self.loader.bad_samples.summary()}")
        self._loaders = {1: self.loader}  # by accumulation steps (see loader_for)
        self.stages = build_stages(
            config, lambda accumulation: self.loader_for(accumulation).batches_per_epoch())
        self.mesh = make_mesh(config)
        self.models: FluxFlowModels = initial_models(config)
        if resume:  # before anything is written there
            check_own_checkpoints(self.output, [s.name for s in self.stages],
                                  self.models.config)
        check_text_inputs(self.models.config, config.data, self.loader.tokenizer,
                          self.stages)
        self.lpips = load_lpips(config, self.stages)
        self.validation = (None if config.output.validation_interval is None
                           else Validation(config, self.loader.tokenizer, self.lpips))
        output = config.output
        self.samples = (Samples(config, self.loader, self.models.config)
                        if samples_enabled(output) else None)
        self.resume = resume
        self.base_key = jax.random.PRNGKey(config.training.seed)
        self.sharding = parallel.batch_sharding(self.mesh) if self.mesh else None
        self.devices = list(self.mesh.devices.flat) if self.mesh else jax.devices()[:1]
        self.precision = config.training.compute_precision
        self.peak_flops = peak_flops(jax.devices()[0], self.precision)
        self.checkpoints: RunCheckpoints | None = None  # opened by run()
        # SIGTERM / SIGINT stop the run at the next batch end (one process only: the
        # processes of a multi-host run would have to agree on the batch).
        self.stop = StopSignals()

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
            for stage in self.stages[position.stage:]:
                state = self._run_stage(stage, position, state)
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
        self._stage_loader(self.stages[min(position.stage, len(self.stages) - 1)]).restore(
            record["loader"])
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
        like = self._train_step(stage).init_state(self.models,
                                                  carried_averages=stage.ema_components)
        state, _ = self.checkpoints.restore(like, step)
        return position, state, record

    def loader_for(self, accumulation: int) -> DataLoader:
        """The loader of steps with ``accumulation`` micro-batches per update (made once):
        its batches are their effective batches."""
        if accumulation not in self._loaders:
            self._loaders[accumulation] = make_loader(self.config, accumulation)
        return self._loaders[accumulation]

    def _stage_loader(self, stage: Stage) -> DataLoader:
        return self.loader_for(stage.config.gradient_accumulation_steps)

    def _train_step(self, stage: Stage) -> TrainStep:
        return TrainStep(self.models, stage.config, lpips=self.lpips, mesh=self.mesh,
                         shard_params=self.config.training.shard_params,
                         precision=self.precision, remat=self.config.training.remat)

    # -- one stage ----------------------------------------------------------------------

    def _run_stage(self, stage: Stage, position: Position, state: TrainState | None
                   ) -> TrainState:
        count = len(self.stages)
        resuming = position.stage == stage.index and (position.batch or position.epoch or
                                                      position.stage_batches)
        if not resuming:
            self.echo("=" * 60)
            self.echo(f"PIPELINE STEP {stage.index + 1}/{count}: {stage.label}")
            if stage.step.description:
                self.echo(f"Description: {stage.step.description}")
            self.echo(f"Duration: {stage.epochs} epoch(s) of {stage.batches_per_epoch} "
                      f"batches" + (f", at most {stage.max_batches} batches"
                                    if stage.max_batches else ""))
            for note in stage.notes:
                self.echo(note)
        step = self._train_step(stage)
        if state is None or position.state_stage != stage.index:
            state = step.init_state(self.models, previous=state,
                                    carried_averages=stage.ema_components)
            position.state_stage = stage.index
        metrics_log = MetricsLog(self.output, stage.name,
                                 position.global_step if resuming else None) \
            if self.writer else None
        cache = (LatentCache(self.output / "latent_cache", step.networks,
                             state.params["compressor"], state.buffers["compressor"],
                             self.models.config.model_version)
                 if stage.step.cache_latents else None)
        packed = PackedState.pack(state)
        try:
            while True:
                packed, done, reason = self._run_epoch(stage, step, packed, position,
                                                       metrics_log, cache)
                if done:
                    break
        finally:
            gc.unfreeze()  # this stage's step and programs may be collected after it
            if metrics_log:
                metrics_log.close()
        self.echo(f"Step '{stage.label}' finished: {reason}")
        return packed.unpack()

    def _run_epoch(self, stage: Stage, step: TrainStep, state: PackedState,
                   position: Position, metrics_log: MetricsLog | None,
                   cache: LatentCache | None) -> tuple[PackedState, bool, str]:
        """Run (the rest of) one epoch; (state, whether the stage is done, why). With a
        ``cache``, the step reads the images' cached posteriors instead of the images."""
        step_inputs = cache.inputs if cache else (lambda inputs: inputs)
        window = RunningAverage(averaging_window(self.config.output.log_interval))
        window.restore(position.averages)
        shown = console_metrics(stage)
        started = time.perf_counter()
        speed = SpeedMeter(self.peak_flops)
        pending: list[dict[str, jax.Array]] = []
        bar = ProgressBar(stage.batches_per_epoch)
        loader = self._stage_loader(stage)
        batches = prefetch_to_device(
            loader.epoch(position.data_epoch), 2, self.sharding,
            inputs=lambda b: [step_inputs(b.step_inputs(i)) for i in range(len(b.scales))])
        done, reason = False, ""
        try:
            for batch, device_inputs in batches:
                state = self._train_batch(step, stage, state, device_inputs, position,
                                          pending, speed)
                position.batch += 1
                position.stage_batches += 1
                position.global_step += 1
                bar.update(position.batch)
                epoch_end = position.batch >= stage.batches_per_epoch
                capped = bool(stage.max_batches) and position.stage_batches >= stage.max_batches
                logged = (position.batch - 1) % self.config.output.log_interval == 0
                interval = position.stage_batches % \
                    self.config.output.checkpoint_save_interval == 0
                stopping = self.stop.received is not None
                if logged or epoch_end or capped or interval or stopping:
                    self._collect(pending, stage, position, window)
                if logged:
                    bar.clear()
                    self._log(stage, position, window, shown, metrics_log, started,
                              speed.read())
                loader_state = batch.loader_state
                shown_at = (position.epoch + 1, position.batch)  # for sample names
                validated = bool(self.validation) and self.validation.due(
                    stage.transition, position.stage_batches, epoch_end)
                if validated:
                    bar.clear()
                    with speed.excluded():
                        self._validate(stage, state, position, metrics_log)
                if epoch_end:
                    done, reason = self._close_epoch(stage, position, started)
                    loader_state = loader.position_state(position.data_epoch)
                if capped and not done:
                    done, reason = True, f"reached max_steps ({stage.max_batches} batches)"
                if done and self.validation and not validated:  # the stage's end
                    bar.clear()
                    with speed.excluded():
                        self._validate(stage, state, position, metrics_log, at=shown_at)
                if done and not epoch_end:  # the next stage starts a fresh data epoch
                    position.data_epoch += 1
                if done:  # where the next stage's loader (its batch size) starts
                    following = self.stages[min(stage.index + 1, len(self.stages) - 1)]
                    loader_state = self._stage_loader(following).position_state(
                        position.data_epoch)
                sampling = bool(self.samples) and (done or epoch_end or
                                                   self._samples_due(position))
                if done or interval or epoch_end or sampling or stopping:
                    jax.block_until_ready(state.leaves)  # the batches so far count as trained
                    with speed.excluded():
                        self._write(stage, state.unpack(), position, loader_state, window,
                                    done=done, epoch_end=epoch_end,
                                    save=interval or epoch_end or done or stopping,
                                    sample_at=shown_at if sampling else None)
                if stopping:
                    raise Interrupted(self.stop.received, position.global_step,
                                      self.checkpoints.directory)
                if epoch_end or done:
                    break
        finally:
            batches.close()
            bar.clear()
        loader.seek(position.data_epoch)  # the loop may leave an epoch's iterator early
        return state, done, reason

    def _write(self, stage: Stage, state: TrainState, position: Position,
               loader_state: dict[str, Any], window: RunningAverage, *, done: bool,
               epoch_end: bool, save: bool, sample_at: tuple[int, int] | None) -> None:
        """What a batch end writes, in this order: the stage's weights when it ends, a
        checkpoint, samples (named after ``sample_at``, the 1-based epoch and batch)."""
        if done:
            self._finish_stage(stage, state, position)
        if save:
            if not (epoch_end or done):  # mid-epoch: the console window goes on
                position.averages = window.values()
            self._save(state, position, loader_state)
        if sample_at:
            if not done:  # a stage end has just written its weights
                write_to_models(state, self.models)
            self.samples.write(self.models, stage, *sample_at)

    def _close_epoch(self, stage: Stage, position: Position, started: float
                     ) -> tuple[bool, str]:
        """Move the position past a finished epoch; whether the stage ends there, and why."""
        position.epoch += 1
        position.data_epoch += 1
        position.batch = 0
        position.averages = {}  # the console window restarts every epoch
        self.echo(f"Epoch {position.epoch} completed in "
                  f"{format_duration(time.perf_counter() - started)}")
        report = self.loader.bad_samples
        if report.count > self.skips_reported:
            self.echo(f"Epoch {position.epoch}: {report.summary(self.skips_reported)}")
            self.skips_reported = report.count
        done, reason = transition_due(stage, position)
        if reason and not done:
            self.echo(f"Transition check: {reason}")
        return done, reason

    def _validate(self, stage: Stage, state: PackedState, position: Position,
                  metrics_log: MetricsLog | None, at: tuple[int, int] | None = None) -> None:
        """The held-out metrics of the current weights: logged, shown, and the newest
        value of a transition metric among them. ``at``: the 1-based epoch and batch
        they were measured after, when the position has moved past that epoch's end."""
        values = self.validation(write_to_models(state.unpack(), self.models), stage.config)
        epoch, batch = at or (position.epoch + 1, position.batch)
        if metrics_log:
            metrics_log.log(epoch - 1, batch - 1, position.global_step, values)
        self.echo(validation.summary(values))
        metric = stage.transition.metric
        if metric in values:
            position.history = [values[metric]]

    def _samples_due(self, position: Position) -> bool:
        """At every samples_per_checkpoint-th interval checkpoint of the stage."""
        interval = self.config.output.checkpoint_save_interval
        return position.stage_batches % interval == 0 and \
            (position.stage_batches // interval) % self.config.output.samples_per_checkpoint == 0

    def _train_batch(self, step: TrainStep, stage: Stage, state: PackedState,
                     device_inputs: list, position: Position, pending: list,
                     speed: SpeedMeter) -> PackedState:
        key = jax.random.fold_in(self.base_key, position.global_step)
        flops: float | None = 0.0
        for repeat in range(self.config.training.training_steps):
            for scale, inputs in enumerate(device_inputs):
                call_key = jax.random.fold_in(key, repeat * len(device_inputs) + scale)
                if not step.compiled_for(inputs):
                    self._compile(step, stage, state, inputs, call_key, speed)
                state, metrics = step(state, inputs, call_key)
                pending.append(metrics)
                cost = step.cost(inputs).flops
                flops = None if cost is None or flops is None else flops + cost
        speed.batch(self.config.training.batch_size * stage.config.gradient_accumulation_steps,
                    flops)
        return state

    def _compile(self, step: TrainStep, stage: Stage, state: PackedState, inputs: dict,
                 key: jax.Array, speed: SpeedMeter) -> None:
        """Compile the step for ``inputs``' shapes and check that it fits in memory before
        its first run."""
        step.compile(state.unpack(), inputs, key)
        compilation = step.compilations[-1]
        speed.exclude(compilation.seconds)
        self.echo(compile_line(stage.label, compilation))
        self.check_memory(stage, compilation)
        freeze_heap()

    def check_memory(self, stage: Stage, compilation: Compilation) -> None:
        """Raise ``DoesNotFit`` if ``stage``'s compiled step cannot fit on the devices."""
        model, training = self.models.config, self.config.training
        shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}"
                           for name, shape, _ in compilation.shapes if name == "images")
        check_fits(compilation.memory, self.devices,
                   f"the train step of '{stage.label}' (batch_size {training.batch_size}, "
                   f"{shapes}, img_size {self.config.data.img_size}, vae_dim "
                   f"{model.vae_dim}, flow_dim {model.flow_dim}, text_dim {model.text_dim}, "
                   f"precision {self.precision}, remat {str(training.remat).lower()}, "
                   f"shard_params {str(training.shard_params).lower()})", TRAIN_LEVERS)

    def compile_stages(self) -> list[tuple[Stage, Compilation]]:
        """Each stage's step compiled for the first batch, from an abstract state (nothing
        allocated): the memory estimates ``validate --memory`` prints."""
        compiled = []
        for stage in self.stages:
            loader = self._stage_loader(stage)
            batches = loader.epoch(0)
            try:
                inputs = next(batches).step_inputs()
            finally:
                batches.close()
                loader.seek(0)
            step = self._train_step(stage)
            like = jax.eval_shape(lambda step=step, stage=stage: step.init_state(
                self.models, carried_averages=stage.ema_components))
            step.compile(like, inputs, self.base_key)
            compiled.append((stage, step.compilations[-1]))
        return compiled

    def _collect(self, pending: list, stage: Stage, position: Position,
                 window: RunningAverage) -> None:
        """Fetch the metrics dispatched since the last fetch (the loop's one device sync)."""
        for metrics in jax.device_get(pending):
            values = {k: float(v) for k, v in metrics.items()}
            position.skipped += int(values.pop("skipped"))
            window.update(values)
            metric = stage.transition.metric
            if metric is not None and np.isfinite(values.get(metric, np.nan)):
                position.history = (position.history + [values[metric]])[-SMOOTHING:]
        pending.clear()

    def _log(self, stage: Stage, position: Position, window: RunningAverage, shown: set[str],
             metrics_log: MetricsLog | None, started: float, speed: Speed) -> None:
        averages = window.averages()
        self.echo(progress_line(
            time.perf_counter() - started, stage.label, stage.index + 1, len(self.stages),
            position.epoch + 1, stage.epochs, position.batch, stage.batches_per_epoch,
            {k: v for k, v in averages.items() if k in shown}, speed.seconds_per_batch,
            position.skipped, images_per_second=speed.images_per_second, mfu=speed.mfu))
        if metrics_log:
            extras = {"batch_time": speed.seconds_per_batch, "skipped": position.skipped,
                      "images_per_second": speed.images_per_second}
            metrics_log.log(position.epoch, position.batch - 1, position.global_step,
                            averages, extras={**extras, **({"mfu": speed.mfu}
                                                           if speed.mfu is not None else {})})

    # -- checkpoints and exports ---------------------------------------------------------

    def _record(self, position: Position, loader_state: dict[str, Any]) -> dict[str, Any]:
        return {**run_record([s.name for s in self.stages], self.models.config),
                "position": dataclasses.asdict(position), "loader": loader_state}

    def _save(self, state: TrainState, position: Position,
              loader_state: dict[str, Any]) -> None:
        self.checkpoints.save(position.global_step, state, self._record(position,
                                                                        loader_state))

    def _finish_stage(self, stage: Stage, state: TrainState, position: Position) -> None:
        """Export the stage's weights; the position moves on to the next stage."""
        info = {"step": stage.label, "global_step": position.global_step,
                **data_record(self.config.data)}
        # Every process gathers the weights (a computation over all devices); one writes.
        if stage.name and stage.ema_components:  # the averages, for `export --step --ema`
            averaged = write_to_models(state, self.models, ema=True)
            if self.writer:
                save_step_files(self.output, averaged, stage.name, ema=True)
        models = write_to_models(state, self.models)
        if self.writer:
            if stage.name:
                save_step_files(self.output, models, stage.name)
            save_fluxflow(self.output, models, training_info=info, warn_torch=False)
        position.stages_completed.append(stage.label)
        position.stage += 1
        position.epoch = position.batch = position.stage_batches = position.met = 0
        position.history, position.averages = [], {}
        if self.config.output.generate_diagrams and self.writer:
            self._draw_graphs()

    def _draw_graphs(self) -> None:
        from fluxflow_jax.pipeline.graphs import write_graphs  # loads matplotlib

        try:
            write_graphs(self.output)
        except (ValueError, OSError) as err:  # a missing graph never stops training
            log.warning("training graphs not drawn: %s", err)
