"""Checking a whole run before it starts, and printing its plan.

``check_run`` builds everything a run needs that can be checked without training (the data
loader, the stages, the devices, the LPIPS weights, the initial checkpoint and its fit with
the model section, the text inputs, the output folder's checkpoints) and collects every
problem; ``describe`` renders the stages for ``fluxflow-jax validate``, and says whether
PyTorch ``fluxflow`` can rebuild the architecture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
from flax import nnx

from fluxflow_jax.data import DataLoader
from fluxflow_jax.models.bundle import COMPONENT_CLASSES
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.models.text_encoder import LANGUAGE_MODEL, in_language_model
from fluxflow_jax.pipeline.config import ConfigError, RunConfig
from fluxflow_jax.pipeline.resume import check_own_checkpoints
from fluxflow_jax.pipeline.samples import sample_sizes, samples_enabled
from fluxflow_jax.pipeline.setup import (Loaders, check_output_path, check_text_inputs,
                                         load_lpips, make_mesh, model_config)
from fluxflow_jax.pipeline.stages import Stage, build_stages
from fluxflow_jax.pipeline.validation import Validation
from fluxflow_jax.training import modes
from fluxflow_jax.training.train_step import StageConfig


class Plan(NamedTuple):
    loader: DataLoader | None
    stages: list[Stage]
    model: FluxFlowConfig | None  # the architecture trained (None: not known)
    problems: list[str]


def check_run(config: RunConfig) -> Plan:
    """Everything checkable before training; the stages are built with one batch per epoch
    when the data cannot be read, so their own problems are still reported."""
    problems: list[str] = []

    def attempt(build: Callable[[], Any]) -> Any:
        try:
            return build()
        except ConfigError as err:
            problems.extend(err.problems)
            return None

    loaders = Loaders(config)
    readable = {feed: attempt(lambda feed=feed: loaders.get(feed)) is not None
                for feed in dict.fromkeys(config.feed(step) for step in config.steps())}
    loader = loaders.get(config.feed(config.steps()[0])) if all(readable.values()) else None
    stages = attempt(lambda: build_stages(config, lambda step, accumulation: loaders.for_step(
        step, accumulation).batches_per_epoch() if readable[config.feed(step)] else 1)) or []
    model = attempt(lambda: model_config(config))
    attempt(lambda: make_mesh(config))
    output_ok = attempt(lambda: check_output_path(config) or True)
    if output_ok and stages and model is not None:  # another run's checkpoints there?
        attempt(lambda: check_own_checkpoints(Path(config.output.output_path),
                                              [s.name for s in stages], model))
    if model is not None and samples_enabled(config.output):
        attempt(lambda: sample_sizes(config, model))
    attempt(lambda: load_lpips(config, stages, fetch=False))
    if loader is not None and model is not None:
        attempt(lambda: check_text_inputs(model, config.data, loader.tokenizer, stages))
    if loader is not None and config.output.validation_interval is not None:
        attempt(lambda: Validation(config, loader.tokenizer, lpips=None))
    return Plan(loader, stages, model, problems)


@functools.cache  # tracing the full-size model takes seconds; a process may plan it often
def parameter_counts(model: FluxFlowConfig) -> dict[str, int]:
    """Parameters per component of an architecture, and of the text encoder's DistilBERT
    (``LANGUAGE_MODEL``) alone (nothing allocated); do not modify."""
    counts = {}
    for name, cls in COMPONENT_CLASSES.items():
        module = nnx.eval_shape(lambda cls=cls: cls(model, rngs=nnx.Rngs(0)))
        params = nnx.state(module, nnx.Param)
        counts[name] = sum(leaf.size for leaf in jax.tree.leaves(params))
        if name == "text_encoder":
            counts[LANGUAGE_MODEL] = sum(
                leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if in_language_model(tuple(getattr(k, "key", k) for k in path)))
    return counts


def _accumulation(config: RunConfig, stage: Stage) -> list[str]:
    """The line on a step's micro-batches, if it accumulates gradients."""
    count = stage.config.gradient_accumulation_steps
    if count == 1:
        return []
    size = stage.feed.batch_size
    return [f"  batches: {count} micro-batches of {size} per update "
            f"(effective batch {count * size})"]


def _dataset(config: RunConfig, stage: Stage) -> list[str]:
    """The line on a step's named dataset, if it reads one."""
    name = stage.feed.dataset
    if name is None:
        return []
    kind = config.training.pipeline.datasets[name].type
    return [f"  data: dataset '{name}' ({kind}), {stage.batches_per_epoch} batches of "
            f"{stage.feed.batch_size} per epoch"]


def _transition(stage: Stage) -> str:
    rule = stage.transition
    limit = f"after {stage.epochs} epoch(s)"
    if stage.max_batches:
        limit += f" or {stage.max_batches} batches"
    if rule.mode != "loss_threshold":
        return limit
    return (f"when the mean of the last 20 {rule.metric} < {rule.threshold} at "
            f"{rule.patience} epoch end(s) in a row (from epoch {max(rule.min_epochs, 1)}), "
            f"else {limit}")


def _compressor_scale(stage: StageConfig, components: tuple[str, ...]) -> str:
    """The plan's note on a group whose compressor trains at its own share of the rate."""
    scale = stage.compressor_lr_scale
    return (f", compressor at {scale}x that lr" if "compressor" in components and scale != 1
            else "")


def describe(config: RunConfig, plan: Plan) -> str:
    """The run's plan: data, parameters, and per stage what trains, how and for how long."""
    loader, stages = plan.loader, plan.stages
    counts = parameter_counts(plan.model)
    lines = [f"Config: {config.source} ({'pipeline' if config.is_pipeline else 'standard'} "
             f"mode, {len(stages)} step(s))",
             f"Data: {loader.batches_per_epoch()} batches of {stages[0].feed.batch_size} "
             f"per epoch, images {config.data.img_size} px",
             "Parameters: " + ", ".join(f"{name} {counts[name]:,}" for name in COMPONENT_CLASSES)
             + f"; total {sum(counts[name] for name in COMPONENT_CLASSES):,}",
             f"Arithmetic: {config.training.compute_precision}"
             + (", blocks rematerialised" if config.training.remat else "")
             + (", parameters sharded over the devices" if config.training.shard_params
                else ""),
             "Memory: `validate --memory` compiles each step to estimate it; `train` "
             "checks it before each step's first batch",
             f"Output: {config.output.output_path}",
             f"Warning: {plan.model.torch_note()}" if plan.model.torch_note() else
             "PyTorch: fluxflow 0.8.1 loads the exports (README, 'In PyTorch')"]
    if loader.bad_samples.count:  # found by the header scan: they will be skipped
        lines.insert(2, f"Data: {loader.bad_samples.summary()}")
    if config.output.validation_interval is not None:
        lines.append(f"Validation: every {config.output.validation_interval} batches and at "
                     f"step ends, on {config.data.validation_samples} held-out samples")
    for stage in stages:
        groups = stage.config.group_components()
        losses = modes.losses(stage.config.vae, stage.config.flow)
        lines += [f"Step {stage.index + 1}/{len(stages)} '{stage.label}'"
                  + (f": {stage.step.description}" if stage.step.description else ""),
                  f"  runs: up to {stage.planned_batches()} batches; ends {_transition(stage)}",
                  *_dataset(config, stage), *_accumulation(config, stage),
                  f"  losses: {', '.join(losses)}",
                  f"  frozen: {', '.join(sorted(stage.config.frozen)) or 'nothing'}"]
        lines += [f"  {note}" for note in stage.notes]
        for group, components in groups.items():
            optimizer = stage.config.optimizers.get(group, {})
            scheduler = stage.config.schedulers.get(group, {})
            trained = sum(counts.get(c, 0) for c in components)
            if group == "text_encoder" and LANGUAGE_MODEL in stage.config.frozen:
                components, trained = ("its head",), trained - counts[LANGUAGE_MODEL]
            lines.append(f"  {group}: trains {', '.join(components)} ({trained:,} "
                         f"parameters) with {optimizer.get('type', 'AdamW')} lr "
                         f"{optimizer.get('lr', 'default')}, "
                         f"{scheduler.get('type', 'CosineAnnealingLR')}"
                         + _compressor_scale(stage.config, components))
        if stage.ema_components:
            lines.append(f"  EMA kept: {', '.join(stage.ema_components)}")
    return "\n".join(lines)
