"""The training loop of one stage: batches in, step, metrics out, then each hook.

Each batch is dispatched without waiting for the device; metrics are fetched (one sync) only
where a hook reads them (log points, checkpoints, epoch and stage ends, a stop). Everything
periodic (console, metrics files, validation, transitions, exports, checkpoints, samples, a
stop signal) is a hook (``fluxflow_jax.pipeline.hooks``), called after every batch.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from typing import TYPE_CHECKING

import jax
import numpy as np

from fluxflow_jax.data import prefetch_to_device
from fluxflow_jax.pipeline.console import RunningAverage, averaging_window, compile_line
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.latent_cache import LatentCache
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.speed import SpeedMeter
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.pipeline.text_cache import TextCache
from fluxflow_jax.training.state import PackedState, TrainState
from fluxflow_jax.training.train_step import TrainStep

if TYPE_CHECKING:
    from fluxflow_jax.pipeline.run import Run


def train_stage(run: Run, stage: Stage, position: Position, state: TrainState | None,
                hooks: Sequence[Hook]) -> TrainState:
    """Train ``stage`` from ``position`` until a hook ends it (or the run); its last state."""
    step = run.train_step(stage)
    if state is None or position.state_stage != stage.index:
        state = step.init_state(run.models, previous=state,
                                carried_averages=stage.ema_components)
        position.state_stage = stage.index
    resuming = bool(position.batch or position.epoch or position.stage_batches)
    step_inputs = _cached_inputs(run, stage, step, state)
    packed, info = PackedState.pack(state), None
    for hook in hooks:
        hook.start_stage(stage, position, resuming)
    try:
        while info is None or not info.done:  # one epoch (or the rest of one) per pass
            window = RunningAverage(averaging_window(run.config.output.log_interval))
            window.restore(position.averages)
            speed, pending, epoch_started = SpeedMeter(run.peak_flops), [], time.perf_counter()
            with run.data.epoch(stage, position) as loader_batches, closing(prefetch_to_device(
                    loader_batches, 2, run.sharding, inputs=lambda b: [
                        step_inputs(b.step_inputs(i)) for i in range(len(b.scales))])
                    ) as batches:
                for _, device_inputs in batches:
                    packed = _train_batch(run, step, stage, packed, device_inputs,
                                          position.global_step, pending, speed)
                    position.advance()
                    info = StepInfo(stage, position, window, speed, epoch_started,
                                    run.stop.received is not None, run.config.output)
                    if info.sync:
                        _collect(pending, stage, position, window)
                    for hook in hooks:
                        hook(packed, info)
                    if info.epoch_end or info.done:
                        break
    finally:
        gc.unfreeze()  # this stage's step and programs may be collected after it
        for hook in hooks:
            hook.close()
    for hook in hooks:
        hook.finish_stage(stage, info.reason)
    return packed.unpack()


def _cached_inputs(run: Run, stage: Stage, step: TrainStep, state: TrainState
                   ) -> Callable[[dict], dict]:
    """The step's inputs from a batch's: with ``cache_latents``, the images' cached
    posteriors instead of the images; with ``cache_text``, the captions' cached language
    model features instead of their tokens."""
    caches = [cache(run.output / folder, step.networks, state.params[component],
                    state.buffers[component], run.models.config.model_version)
              for wanted, cache, folder, component in (
                  (stage.step.cache_latents, LatentCache, "latent_cache", "compressor"),
                  (stage.step.cache_text, TextCache, "text_cache", "text_encoder"))
              if wanted]

    def inputs(batch: dict) -> dict:
        for cache in caches:
            batch = cache.inputs(batch)
        return batch
    return inputs


def _train_batch(run: Run, step: TrainStep, stage: Stage, state: PackedState,
                 device_inputs: list, global_step: int, pending: list, speed: SpeedMeter
                 ) -> PackedState:
    """Dispatch one batch's updates (each repeat, each image scale); random keys are folded
    from the seed and the global step, so a resumed run draws the same ones."""
    calls = device_inputs * run.config.training.training_steps  # each repeat, each scale
    flops: float | None = 0.0
    for inputs, call_key in zip(calls, call_keys(run.base_key, global_step, len(calls))):
        if not step.compiled_for(inputs):
            _compile(run, step, stage, state, inputs, call_key, speed)
        state, metrics = step(state, inputs, call_key)
        pending.append(metrics)
        cost = step.cost(inputs).flops
        flops = None if cost is None or flops is None else flops + cost
    speed.batch(stage.feed.batch_size * stage.config.gradient_accumulation_steps, flops)
    return state


@functools.partial(jax.jit, static_argnums=2)
def call_keys(base_key: jax.Array, global_step: int | jax.Array, count: int
              ) -> tuple[jax.Array, ...]:
    """The keys of a batch's ``count`` step calls: the seed's key folded with the global
    step, then with each call's index. One dispatch for all of them rather than one per
    fold: for a small model the host's dispatches are a noticeable share of a step."""
    key = jax.random.fold_in(base_key, global_step)
    return tuple(jax.random.fold_in(key, i) for i in range(count))


def _compile(run: Run, step: TrainStep, stage: Stage, state: PackedState, inputs: dict,
             key: jax.Array, speed: SpeedMeter) -> None:
    """Compile the step for ``inputs``' shapes and check that it fits in memory before
    its first run."""
    step.compile(state.unpack(), inputs, key)
    compilation = step.compilations[-1]
    speed.exclude(compilation.seconds)
    run.echo(compile_line(stage.label, compilation))
    run.check_memory(stage, compilation)
    freeze_heap()


def freeze_heap() -> None:
    """Put every live object out of the cyclic collector's reach (until ``gc.unfreeze``).

    Once a step has compiled, ~300k long-lived objects (modules, graphs, traced programs)
    exist, and each full collection walks them all: ~0.2 s, several times per few hundred
    steps (~4 ms per step on average for the tiny flow step). Frozen, they are skipped;
    objects freed by reference counting are still freed at once.
    """
    gc.collect()
    gc.freeze()


def _collect(pending: list, stage: Stage, position: Position, window: RunningAverage) -> None:
    """Fetch the metrics dispatched since the last fetch (the loop's one device sync)."""
    for metrics in jax.device_get(pending):
        values = {k: float(v) for k, v in metrics.items()}
        position.skipped += int(values.pop("skipped"))
        window.update(values)
        metric = stage.transition.metric
        if metric is not None and np.isfinite(values.get(metric, np.nan)):
            position.record(values[metric])
    pending.clear()
