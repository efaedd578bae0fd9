"""From configured steps to runnable stages: modes, freezing, optimizers, transitions.

Each step becomes a ``StageConfig`` for ``TrainStep`` plus what the run loop needs around it
(how many epochs and batches at most, the transition rule, the EMAs carried). Freezing
persists: a step's frozen set is the previous step's, plus what it freezes, minus what it
unfreezes (``freeze_vae: false`` unfreezes the VAE). A step whose modes train a component
frozen in an earlier step unfreezes it, and says so (the reference silently trains nothing
there, which its documented examples never mean); freezing and training a component in the
same step is an error. Every problem of every step is collected into one ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fluxflow_jax.models.text_encoder import LANGUAGE_MODEL
from fluxflow_jax.pipeline import validation
from fluxflow_jax.pipeline.config import (FLOW_LOSS_KEYS, VAE_LOSS_KEYS, ConfigError, Feed,
                                          RunConfig, StepConfig, TransitionConfig)
from fluxflow_jax.suggest import did_you_mean
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.modes import METRIC_ALIASES, STEP_MODES
from fluxflow_jax.training.optim_file import (OptimSchedFileError, per_model_optimization,
                                              read_optim_sched_file)
from fluxflow_jax.training.train_step import (StageConfig, ema_components,
                                               metric_names)
from fluxflow_jax.training.vae_step import VAEOptions

# Names a freeze list may use (the reference's included) -> component, or the text
# encoder's DistilBERT alone (LANGUAGE_MODEL).
COMPONENT_NAMES = {"compressor": "compressor", "expander": "expander",
                   "flow_processor": "flow_processor", "flow": "flow_processor",
                   "text_encoder": "text_encoder", "discriminator": "discriminator",
                   "D_img": "discriminator", LANGUAGE_MODEL: LANGUAGE_MODEL}
FREEZE_FLAGS = {"freeze_vae": ("compressor", "expander"), "freeze_flow": ("flow_processor",),
                "freeze_text_encoder": ("text_encoder",)}


@dataclass(frozen=True)
class Stage:
    """One step, ready to run."""

    index: int  # 0-based position in the pipeline
    name: str  # the step's name ("" in standard mode: unsuffixed file names)
    step: StepConfig
    config: StageConfig
    epochs: int  # at most; a transition may end the stage earlier
    max_batches: int | None  # the stage ends after this many batches
    batches_per_epoch: int
    transition: TransitionConfig  # metric resolved to the train step's name
    ema_components: tuple[str, ...]  # averages kept in the state (this and earlier stages)
    feed: Feed  # the data the stage reads, and its batch size
    notes: tuple[str, ...] = ()  # what the stage does that its config does not say outright

    @property
    def label(self) -> str:
        return self.name or "standard"

    def planned_batches(self) -> int:
        """Batches the stage runs when no transition ends it early."""
        total = self.epochs * self.batches_per_epoch
        return min(total, self.max_batches) if self.max_batches else total


def _modes_on(step: StepConfig) -> list[str]:
    """The step's mode keys that are on."""
    return [key for key in STEP_MODES if getattr(step, key) is True]


def _trained(step: StepConfig) -> set[str]:
    """Components a step's modes count as training (``STEP_MODES``)."""
    return {c for key in _modes_on(step) for c in STEP_MODES[key][1]}


def _frozen_after(step: StepConfig, before: frozenset[str], problems: list[str]
                  ) -> tuple[frozenset[str], frozenset[str]]:
    """(the step's frozen set, the components the step itself freezes)."""
    frozen, own = set(before), set()
    for listed, add in ((step.freeze, True), (step.unfreeze, False)):
        for name in listed:
            if name not in COMPONENT_NAMES:
                problems.append(f"unknown component '{name}' in "
                                f"{'freeze' if add else 'unfreeze'}"
                                f"{did_you_mean(name, COMPONENT_NAMES)}; valid: "
                                f"{sorted(COMPONENT_NAMES)}")
    for flag, components in FREEZE_FLAGS.items():
        value = getattr(step, flag)
        if value is not None:
            frozen = frozen | set(components) if value else frozen - set(components)
            own |= set(components) if value else set()
    listed = {COMPONENT_NAMES[n] for n in step.freeze if n in COMPONENT_NAMES}
    unlisted = {COMPONENT_NAMES[n] for n in step.unfreeze if n in COMPONENT_NAMES}
    frozen = (frozen | listed) - unlisted
    return frozenset(frozen), frozenset((own | listed) - unlisted)


def _options(step: StepConfig) -> tuple[VAEOptions | None, FlowOptions | None]:
    """The step's loss options; ``use_ema: false`` turns off both groups' averages."""
    averages = {} if step.use_ema else {"ema_decay": None}
    parts = {STEP_MODES[key][0] for key in _modes_on(step)}
    vae = flow = None
    if "vae" in parts:
        reconstruction = (step.train_vae if step.train_reconstruction is None
                          else step.train_reconstruction)
        vae = VAEOptions(train_reconstruction=reconstruction, use_gan=step.gan_training,
                         train_spade=step.train_spade, use_lpips=step.use_lpips,
                         **{**{k: v for k, v in step.losses.items() if k in VAE_LOSS_KEYS},
                            **averages})
    if "flow" in parts:
        flow = FlowOptions(**{**{FLOW_LOSS_KEYS[k]: v for k, v in step.losses.items()
                                 if k in FLOW_LOSS_KEYS}, **averages})
    return vae, flow


def _optimization(run: RunConfig, step: StepConfig, problems: list[str]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each group's optimizer and scheduler config: inline, else the step's (or the run's)
    per-model JSON file, else the per-model default. Defaults train at the step's ``lr``
    (else the run's), shared out as the reference does (the text encoder gets a tenth); a
    step's ``lr_min`` also sets the default cosine schedules' floor."""
    path = step.optim_sched_config or run.training.optim_sched_config
    content: Mapping[str, Any] = {}
    if path:
        try:
            content = read_optim_sched_file(path)
        except OptimSchedFileError as err:
            problems.append(str(err))
    lr = step.lr if step.lr is not None else run.training.lr
    lr_min = step.lr_min if step.lr_min is not None else run.training.lr_min
    merged = per_model_optimization(content, lr, lr_min)
    schedulers = merged.schedulers
    if step.lr_min is not None:
        schedulers = {group: {**config, "eta_min_factor": step.lr_min}
                      if group not in content.get("schedulers", {})
                      and config.get("type") == "CosineAnnealingLR" else config
                      for group, config in schedulers.items()}
    # An optimizer named without a learning rate trains at the default's.
    inline = {group: {"lr": merged.optimizers[group]["lr"], **config}
              if group in merged.optimizers else config
              for group, config in step.optimizers.items()}
    return ({**merged.optimizers, **inline}, {**schedulers, **step.schedulers})


def accumulation_steps(run: RunConfig, step: StepConfig) -> int:
    """Micro-batches per update in a step: its own setting, else the run's."""
    return step.gradient_accumulation_steps or run.training.gradient_accumulation_steps


def _epochs(step: StepConfig) -> int:
    """The most epochs a step runs: n_epochs, or the transition's max_epochs if fewer."""
    epochs = step.n_epochs or 1
    return min(epochs, step.transition_on.max_epochs or epochs)


def _transition(step: StepConfig, stage: StageConfig, validated: tuple[str, ...],
                problems: list[str]) -> TransitionConfig:
    """The step's transition rule, its metric one the stage reports (``validated``: its
    validation metrics)."""
    rule = step.transition_on
    if rule.min_epochs > _epochs(step):
        problems.append(f"transition_on.min_epochs ({rule.min_epochs}) is more than the "
                        f"epochs the step can run ({_epochs(step)})")
    if rule.mode == "epoch":
        stray = [k for k in ("metric", "threshold") if getattr(rule, k) is not None]
        if stray:
            problems.append(f"transition_on.{stray[0]} only applies with mode: "
                            "loss_threshold (add it, or remove the key)")
        return rule
    reported = [m for m in metric_names(stage) if m != "skipped"] + list(validated)
    if rule.metric is None:
        problems.append("a loss-threshold transition needs 'metric' (one of "
                        f"{reported})")
    if rule.threshold is None:
        problems.append("a loss-threshold transition needs 'threshold', e.g. 0.01")
    if rule.metric is None:
        return rule
    metric = METRIC_ALIASES.get(rule.metric, rule.metric)
    if metric not in reported:
        hint = (" (validation metrics need output.validation_interval)"
                if metric.startswith(validation.PREFIX) and not validated else "")
        problems.append(f"transition metric '{rule.metric}' is not reported by this step"
                        f"{did_you_mean(rule.metric, reported)}; it reports {reported}"
                        f"{hint}")
    return dataclasses.replace(rule, metric=metric)


def _step_problems(step: StepConfig, pipeline: bool) -> list[str]:
    problems = []
    if pipeline and step.n_epochs is None:
        problems.append("n_epochs is required (the most epochs the step runs), e.g. "
                        "n_epochs: 10")
    if not _modes_on(step):
        *most, last = STEP_MODES
        problems.append(f"at least one training mode must be on: {', '.join(most)} or "
                        f"{last} (use_lpips alone trains nothing)")
    return problems


def build_stages(run: RunConfig,
                 batches_per_epoch: int | Callable[[StepConfig, int], int]) -> list[Stage]:
    """The run's stages, checked; ``ConfigError`` lists every problem of every step.

    ``batches_per_epoch(step, n)``: the epoch's batches of the step's data with ``n``
    accumulation steps' effective batch (an int: the same for every step and ``n``)."""
    if isinstance(batches_per_epoch, int):
        batches_per_epoch = lambda step, n, batches=batches_per_epoch: batches
    all_problems: list[str] = []
    stages: list[Stage] = []
    frozen: frozenset[str] = frozenset()
    ema: list[str] = []
    seen_names: dict[str, int] = {}
    scales = 1 + len(run.data.reduced_min_sizes)
    steps = run.steps()
    for index, step in enumerate(steps):
        name = step.name if not run.is_pipeline or step.name else f"step_{index + 1}"
        problems = _step_problems(step, run.is_pipeline)
        if run.is_pipeline and name in seen_names:
            problems.append(f"step name '{name}' is also step {seen_names[name] + 1}'s; "
                            "names must differ (they name the step's files)")
        if any(c in name for c in "/\\") or name.startswith("."):
            problems.append(f"step name '{name}' must not contain '/' or '\\' or start "
                            "with '.' (it names files)")
        seen_names.setdefault(name, index)
        frozen, own = _frozen_after(step, frozen, problems)
        both = _trained(step) & own
        if both:
            problems.append(f"cannot freeze and train the same component: {sorted(both)}; "
                            "remove it from the freeze list (or freeze_vae/freeze_flow) or "
                            "turn off the mode that trains it")
        thawed = sorted((_trained(step) & frozen) - own)
        frozen -= set(thawed)
        notes = (f"Step '{name or 'standard'}' trains {', '.join(thawed)}, frozen by an earlier "
                 "step: unfrozen from here on",) if thawed else ()
        vae, flow = _options(step)
        if step.cache_latents and (vae is not None or flow is None
                                   or "compressor" not in frozen):
            problems.append("cache_latents needs a flow step whose compressor is frozen and "
                            "that trains no VAE part: add freeze_vae: true (or freeze: "
                            "[compressor]) and turn off train_vae/gan_training/train_spade, "
                            "or set cache_latents: false")
        optimizers, schedulers = _optimization(run, step, problems)
        epochs = _epochs(step)
        accumulation = accumulation_steps(run, step)
        epoch_batches = batches_per_epoch(step, accumulation)
        caps = [c for c in (step.max_steps, run.training.max_steps) if c]
        max_batches = min(caps) if caps else None
        batches = epochs * epoch_batches
        updates = (min(batches, max_batches) if max_batches else batches) * scales * \
            run.training.training_steps
        clip = step.initial_clipping_norm or run.training.initial_clipping_norm
        config = StageConfig(vae=vae, flow=flow, frozen=frozen, optimizers=optimizers,
                             schedulers=schedulers, total_steps=max(1, updates),
                             gradient_clip_norm=clip, gradient_accumulation_steps=accumulation,
                             compressor_lr_scale=step.compressor_lr_scale)
        if step.cache_text and (flow is None or not config.language_model_frozen):
            problems.append("cache_text needs a flow step whose language model is frozen: add "
                            "freeze: [language_model] (or freeze_text_encoder: true), or set "
                            "cache_text: false")
        if vae is not None or flow is not None:
            problems += config.problems()
        transition = _transition(step, config, validation.names(run, config), problems)
        if vae is not None or flow is not None:
            ema += [c for c in ema_components(config) if c not in ema]
        all_problems += [f"{step.origin or run.source}: step '{name or 'standard'}' "
                         f"({index + 1}/{len(steps)}): {p}" for p in problems]
        stages.append(Stage(index, name, step, config, epochs, max_batches, epoch_batches,
                            transition, tuple(ema), run.feed(step), notes))
    if all_problems:
        raise ConfigError(all_problems)
    return stages
