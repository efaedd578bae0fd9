"""A stage's train step: ``step(state, batch, key) -> (state, metrics)``, jitted once.

A stage is composition, not code: ``StageConfig`` names the parts that run (the VAE-GAN
update, the flow update, or both on the same batch), the frozen components and each
optimizer group's optimizer and scheduler. ``TrainStep`` turns it into one jitted function
with the state donated. The whole batch is guarded: if any loss or gradient of any update is
not finite, the returned state is the old one, bitwise, apart from the batch and skip
counters (so optimizer moments, schedules, EMA and loss histories do not move either).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from fluxflow_jax import parallel
from fluxflow_jax.checks import in_interval, integer_at_least
from fluxflow_jax.models.bundle import COMPONENTS, FluxFlowModels
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.models.text_encoder import LANGUAGE_MODEL, in_language_model
from fluxflow_jax.suggest import did_you_mean
from fluxflow_jax.training import modes
from fluxflow_jax.training.accumulation import MicroBatches
from fluxflow_jax.training.compiler import compiler_options
from fluxflow_jax.training.flow_step import (POSTERIOR_KEYS, TEXT_FEATURES, TEXT_KEYS,
                                             FlowOptions, flow_update, text_inputs)
from fluxflow_jax.training.groups import OptimizerGroup
from fluxflow_jax.training.lpips import LPIPS
from fluxflow_jax.training.modes import GROUPS
from fluxflow_jax.training.optimizers import default_optimizer_config, optimizer_config_problems
from fluxflow_jax.training.performance import MemoryUse, flops_per_device, memory_use
from fluxflow_jax.training.precision import PRECISIONS, compute_dtype
from fluxflow_jax.training.schedules import default_scheduler_config, scheduler_config_problems
from fluxflow_jax.training.state import (Networks, PackedState, TrainState,
                                         new_train_state, with_average)
from fluxflow_jax.training.vae_step import VAEOptions, unused_expander_leaf, vae_gan_update

# What a stage may freeze: a component, or the text encoder's DistilBERT alone (its head
# still trains).
FREEZABLE = (*COMPONENTS, LANGUAGE_MODEL)
# The compressor's share of the vae group's learning rate (0: the compressor stays put).
COMPRESSOR_LR_SCALE = in_interval("[0, inf)", 0.05)


class StageConfigError(ValueError):
    """A stage that cannot be built; the message lists every problem."""


@dataclass(frozen=True)
class StageConfig:
    """Everything static about one training stage.

    ``optimizers`` / ``schedulers`` map a group name to its reference-style config; a group
    left out gets the reference's per-model default. ``total_steps`` is the stage length the
    schedules are laid out over.
    """

    vae: VAEOptions | None = None
    flow: FlowOptions | None = None
    frozen: frozenset[str] = frozenset()
    optimizers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    schedulers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    total_steps: int = 1
    gradient_clip_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1  # micro-batches per update (see accumulation)
    compressor_lr_scale: float = 1.0  # the compressor's share of the vae group's rate

    def required_components(self) -> set[str]:
        return modes.required_components(self.vae, self.flow)

    def problems(self) -> list[str]:
        out = []
        if self.vae is None and self.flow is None:
            out.append("the stage trains nothing: give it VAE options, flow options or both")
        out += [f"vae: {p}" for p in (self.vae.problems() if self.vae else [])]
        out += [f"flow: {p}" for p in (self.flow.problems() if self.flow else [])]
        out += [f"cannot freeze unknown component '{name}'{did_you_mean(name, FREEZABLE)}; "
                f"valid: {list(FREEZABLE)}" for name in sorted(self.frozen)
                if name not in FREEZABLE]
        out += [f"{kind}: unknown optimizer group '{name}'{did_you_mean(name, GROUPS)}; "
                f"valid: {list(GROUPS)}" for kind, configs in
                (("optimizers", self.optimizers), ("schedulers", self.schedulers))
                for name in configs if name not in GROUPS]
        length_problem = integer_at_least(1)("total_steps", self.total_steps)
        out += [length_problem] if length_problem else []
        accumulation_problem = integer_at_least(1)("gradient_accumulation_steps",
                                                   self.gradient_accumulation_steps)
        out += [accumulation_problem] if accumulation_problem else []
        out += self._compressor_scale_problems()
        out += [f"optimizers.{name}: {p}" for name, config in self.optimizers.items()
                if name in GROUPS for p in optimizer_config_problems(config)]
        out += [f"schedulers.{name}: {p}" for name, config in self.schedulers.items()
                if name in GROUPS for p in scheduler_config_problems(
                    config, None if length_problem else self.total_steps)]
        return out

    def _compressor_scale_problems(self) -> list[str]:
        scale = self.compressor_lr_scale
        problem = COMPRESSOR_LR_SCALE("compressor_lr_scale", scale)
        if problem:
            return [problem]
        if scale != 1 and "compressor" not in self.group_components().get("vae", ()):
            return [f"compressor_lr_scale ({scale}) scales the compressor's updates, which "
                    "this step does not train: turn on train_vae (and leave the compressor "
                    "unfrozen) or remove the key"]
        return []

    @property
    def language_model_frozen(self) -> bool:
        """Whether the text encoder's DistilBERT learns nothing here: it then runs in eval
        mode (no dropout), so its features may come cached (``TEXT_FEATURES``)."""
        return bool({LANGUAGE_MODEL, "text_encoder"} & self.frozen)

    def group_components(self) -> dict[str, tuple[str, ...]]:
        """The components each active optimizer group trains (frozen ones left out)."""
        trained = {g: tuple(c for c in cs if c not in self.frozen)
                   for g, cs in modes.group_components(self.vae, self.flow).items()}
        return {g: cs for g, cs in trained.items() if cs}


def ema_components(stage: StageConfig) -> tuple[str, ...]:
    """The components the stage keeps an exponential moving average of."""
    decays = modes.ema_decays(stage.vae, stage.flow)
    return tuple(c for group, components in stage.group_components().items()
                 if decays[group] is not None for c in components)


def _build_groups(stage: StageConfig) -> dict[str, OptimizerGroup]:
    unused = unused_expander_leaf(stage.vae) if stage.vae else (lambda path: False)
    ema = modes.ema_decays(stage.vae, stage.flow)

    def frozen_leaf(component: str, path: tuple) -> bool:
        if component == "expander":
            return unused(path)
        return (component == "text_encoder" and stage.language_model_frozen
                and in_language_model(path))
    return {
        name: OptimizerGroup.build(
            name, components,
            stage.optimizers.get(name) or default_optimizer_config(name),
            stage.schedulers.get(name) or default_scheduler_config(name),
            stage.total_steps, clip_norm=stage.gradient_clip_norm,
            frozen_leaf=frozen_leaf,
            ema_decay=ema[name], scales={"compressor": stage.compressor_lr_scale})
        for name, components in stage.group_components().items()}


class TrainStep:
    """The jitted step of one stage; ``init_state(models)`` builds the state it takes.

    ``step(state, batch, key)`` donates ``state``: use the returned one. A ``PackedState``
    comes back packed, the fast path for a loop of steps (see ``PackedState``). ``batch`` holds
    ``images`` [B, H, W, C] in [-1, 1] and, for the flow part, ``input_ids`` and
    ``attention_mask`` [B, L]. With a ``mesh`` (``fluxflow_jax.parallel.data_mesh()``) the
    step is data parallel: B is the global batch, split over the devices, and the state is
    replicated, or with ``shard_params`` split over them too (``parallel.sharded_state``).
    With ``gradient_accumulation_steps`` N, B is the effective batch: N micro-batches of
    B / N make one update (``accumulation``).
    """

    def __init__(self, models: FluxFlowModels, stage: StageConfig, *,
                 lpips: LPIPS | None = None, mesh: Mesh | None = None,
                 shard_params: bool = False, precision: str = "fp32", remat: bool = False):
        problems = stage.problems()
        if precision not in PRECISIONS:
            problems.append(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        missing = sorted(stage.required_components() - set(models.present()))
        problems += [f"the stage needs the {name}, which the models lack" for name in missing]
        needs_lpips = modes.uses_lpips(stage.vae, stage.flow)
        if needs_lpips and lpips is None:
            problems.append("use_lpips is on but no LPIPS network was given (LPIPS.from_file())")
        if problems:
            raise StageConfigError("invalid stage:\n  - " + "\n  - ".join(problems))
        self.stage = stage
        self.config = models.config
        self.groups = _build_groups(stage)
        # Dropout only where weights learn: a frozen language model (its head has no
        # dropout) gives the features it gives at inference.
        text_dropout = "text_encoder" in self.groups and not stage.language_model_frozen
        self.networks = Networks.from_models(
            models, train_mode=("text_encoder",) if text_dropout else (),
            compute_dtype=compute_dtype(precision), remat=remat)
        self.alignment_active = (stage.flow.alignment_active(models.config) if stage.flow
                                 else False)
        self._lpips = nnx.split(lpips) if needs_lpips else None
        self.mesh = mesh
        self.micro = MicroBatches(stage.gradient_accumulation_steps, mesh)
        self.shard_params = shard_params and mesh is not None
        self.compilations: list[Compilation] = []
        self._executables: dict[tuple, tuple[jax.stages.Compiled, Compilation]] = {}
        self._jitted: jax.stages.Wrapped | None = None  # made for the first state seen
        self._treedef: Any = None  # that state's structure
        if mesh is not None and self._lpips:
            self._lpips = (self._lpips[0],
                           jax.device_put(self._lpips[1], parallel.replicated(mesh)))

    def state_placement(self, state: Any) -> Any:
        """Where a state of this step lives: on the default device; over the mesh, whole on
        each device or (``shard_params``) split by ``parallel.sharded_state``."""
        if self.mesh is None:
            return jax.devices()[0]
        if self.shard_params:
            return parallel.sharded_state(state, self.mesh)
        return parallel.replicated(self.mesh)

    def _jit_for(self, state: Any) -> jax.stages.Wrapped:
        """The jitted step over the state's flat leaves (donated), made for the first state
        seen. Over a mesh the batch is split and the state placed by ``state_placement``,
        which for sharded parameters needs the state's structure."""
        if self._jitted is None:
            self._treedef = jax.tree.structure(state)
            if self.mesh is None:
                self._jitted = jax.jit(self._flat_step, donate_argnums=0)
            else:
                whole = parallel.replicated(self.mesh)
                placed = self.state_placement(state)
                if self.shard_params:
                    placed = jax.tree.leaves(placed)
                self._jitted = jax.jit(
                    self._flat_step, donate_argnums=0,
                    in_shardings=(placed, parallel.batch_sharding(self.mesh), whole, whole),
                    out_shardings=(placed, whole))
        return self._jitted

    def init_state(self, models: FluxFlowModels, *, previous: TrainState | None = None,
                   carried_averages: tuple[str, ...] = ()) -> TrainState:
        """A fresh state from the models' current weights (copied; on the default device, or
        replicated over the mesh when there is one).

        ``previous``, the last state of the stage before, hands over the weights, counters
        and averages instead: only the optimizer states and loss histories start anew.
        ``carried_averages`` are averaged components kept beyond this stage's own (an average
        of an earlier stage, carried unchanged so it can still be exported, whole). The stage's
        own averages hold only the leaves it trains.
        """
        state = new_train_state(models, {})
        if previous is not None:
            state = state.replace(step=previous.step, skipped=previous.skipped,
                                  params=previous.params, buffers=previous.buffers,
                                  ema=previous.ema)
        averaging = {c: group for group in self.groups.values() if group.ema_decay is not None
                     for c in group.components}
        ema = {c: with_average(state, c) for c in carried_averages if c not in averaging}
        ema.update({c: group.averaged(c, with_average(state, c))
                    for c, group in averaging.items()})
        state = state.replace(ema=ema)
        state = state.replace(opt_states={name: group.init(state.params)
                                          for name, group in self.groups.items()})
        # Committed to its devices, as a restored checkpoint is: the step then compiles once
        # for both (jit keys its cache on committedness).
        return jax.device_put(_unaliased(state), self.state_placement(state))

    def __call__(self, state: TrainState | PackedState, batch: Mapping[str, jax.Array],
                 key: jax.Array) -> tuple[TrainState | PackedState, dict[str, jax.Array]]:
        """One step; the new state comes back in the form given (``PackedState``: the fast
        path a training loop takes)."""
        packed = state if isinstance(state, PackedState) else PackedState.pack(state)
        batch = dict(batch)
        known = self._executables.get(_shapes(batch))
        executable = known[0] if known else self.compile(packed.unpack(), batch, key)
        if packed.treedef is not self._treedef and packed.treedef != self._treedef:
            raise ValueError("the state's structure is not the one this step was compiled "
                             "for; build it with this step's init_state()")
        leaves, metrics = executable(packed.leaves, batch, key,
                                     self._lpips[1] if self._lpips else None)
        new = PackedState(leaves, self._treedef)
        return (new if isinstance(state, PackedState) else new.unpack()), metrics

    def compile(self, state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array
                ) -> jax.stages.Compiled:
        """Compile the step ahead of time for the shapes of ``batch`` (arrays or
        ``jax.ShapeDtypeStruct``s); later calls with such batches run it without tracing.
        Each compilation is recorded in ``compilations`` with its time and XLA's FLOP count.
        """
        batch = dict(batch)
        rows = len(next(iter(batch.values())))
        if self.mesh is not None:
            parallel.check_batch_divides(rows, self.mesh)
        problem = self.micro.check(rows)
        if problem:
            raise ValueError(problem)
        start = time.perf_counter()
        platform = (self.mesh.devices.flat[0] if self.mesh is not None
                    else jax.devices()[0]).platform
        executable = self.lower(state, batch, key).compile(
            compiler_options=compiler_options(platform))
        compilation = Compilation(shapes=_shapes(batch), seconds=time.perf_counter() - start,
                                  flops=flops_per_device(executable),
                                  memory=memory_use(executable))
        self.compilations.append(compilation)
        self._executables[compilation.shapes] = (executable, compilation)
        return executable

    def compiled_for(self, batch: Mapping[str, Any]) -> bool:
        """Whether batches shaped like ``batch`` have their program already."""
        return _shapes(batch) in self._executables

    def cost(self, batch: Mapping[str, Any]) -> Compilation:
        """The compilation that serves batches shaped like ``batch`` (compiled already)."""
        return self._executables[_shapes(batch)][1]

    def executable(self, batch: Mapping[str, Any]) -> jax.stages.Compiled:
        """The program that serves batches shaped like ``batch`` (compiled already), e.g. to
        read its optimised HLO (``as_text()``)."""
        return self._executables[_shapes(batch)][0]

    def lower(self, state: TrainState, batch: Mapping[str, Any], key: jax.Array
              ) -> jax.stages.Lowered:
        """The step lowered for these arguments (arrays or ``jax.ShapeDtypeStruct``s), e.g.
        to read its StableHLO."""
        return self._jit_for(state).lower(jax.tree.leaves(state), dict(batch), key,
                                          self._lpips[1] if self._lpips else None)

    def _flat_step(self, leaves: list[jax.Array], batch: dict[str, jax.Array],
                   key: jax.Array, lpips_state) -> tuple[list[jax.Array], dict[str, jax.Array]]:
        state, metrics = self._step(jax.tree.unflatten(self._treedef, leaves), batch, key,
                                    lpips_state)
        return jax.tree.leaves(state), metrics

    def _step(self, state: TrainState, batch: dict[str, jax.Array], key: jax.Array,
              lpips_state) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_batch(batch, self.stage, self.config)
        lpips = nnx.merge(self._lpips[0], lpips_state) if self._lpips else None
        vae_key, flow_key = jax.random.split(key)
        updates = []
        if self.stage.vae is not None:
            updates.append(vae_gan_update(self.stage.vae, self.networks, self.groups, state,
                                          batch["images"], vae_key, lpips, self.micro))
        if self.stage.flow is not None:
            trained = updates[-1].commit() if updates else state  # after the VAE-GAN update
            updates.append(flow_update(self.stage.flow, self.networks, self.groups, trained,
                                       batch, flow_key, self.alignment_active, self.micro))
        metrics = {name: value for update in updates for name, value in update.metrics.items()}
        finite = jnp.all(jnp.stack([update.finite for update in updates]))
        new_state = jax.lax.cond(finite, updates[-1].commit, lambda: state).replace(
            step=state.step + 1, skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics["skipped"] = (~finite).astype(jnp.float32)
        return new_state, {k: v.astype(jnp.float32) for k, v in metrics.items()}


@dataclass(frozen=True)
class Compilation:
    """One ahead-of-time compilation of a step: for which batch shapes, how long it took,
    the FLOPs one call costs each device and the memory it holds on each device (XLA's
    analyses; None if unknown)."""

    shapes: tuple
    seconds: float
    flops: float | None
    memory: MemoryUse | None

    @property
    def temp_bytes(self) -> int | None:
        """The temporary (activation) memory, beyond the step's inputs and outputs."""
        return None if self.memory is None else self.memory.temporary


def _unaliased(state: TrainState) -> TrainState:
    """The state with a copy of each array that another leaf already holds: a step donates
    every leaf, and one buffer cannot be donated twice (a handed-over average starts as the
    parameters themselves). Copying only those, not the whole state, keeps the peak memory
    of building a state at one state's worth (1.7 GB less for the reference flow stage)."""
    seen: set[int] = set()

    def own(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.Array) and id(leaf) not in seen:
            seen.add(id(leaf))
            return leaf
        return jnp.copy(leaf)

    return jax.tree.map(own, state)


def _shapes(batch: Mapping[str, Any]) -> tuple:
    """What a compiled step is specialised to: each batch entry's shape and dtype."""
    return tuple((name, tuple(x.shape), str(x.dtype)) for name, x in sorted(batch.items()))


def metric_names(stage: StageConfig) -> tuple[str, ...]:
    """The keys a stage's metrics dict holds."""
    return modes.metric_names(stage.vae, stage.flow)


def _check_batch(batch: Mapping[str, jax.Array], stage: StageConfig,
                 config: FluxFlowConfig) -> None:
    """Shape errors named in the batch's terms, at trace time, instead of deep in a model.
    A flow-only stage may take the images' cached posterior instead of the images, and a
    flow stage with its language model frozen the captions' cached features."""
    cached = stage.vae is None and POSTERIOR_KEYS[0] in batch
    if TEXT_FEATURES in batch and not (stage.flow and stage.language_model_frozen):
        raise ValueError(f"batch['{TEXT_FEATURES}'] (cached language model features) needs a "
                         "flow stage whose language model is frozen; give the captions "
                         f"({list(TEXT_KEYS)}) instead")
    wanted = (POSTERIOR_KEYS if cached else ("images",)) + (
        text_inputs(batch) if stage.flow else ())
    missing = [key for key in wanted if key not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing}; this stage reads {list(wanted)}")
    if cached:
        return
    images = batch["images"]
    if images.ndim != 4 or images.shape[-1] != config.in_channels:
        raise ValueError(f"batch['images'] must be [B, H, W, {config.in_channels}] (NHWC), "
                         f"got shape {tuple(images.shape)}")
    if stage.vae is not None and stage.vae.train_reconstruction:
        scale = 2**config.downscales
        if images.shape[1] % scale or images.shape[2] % scale or \
                config.upscales != config.downscales:
            raise ValueError(
                f"reconstruction needs the decoder to return the input size: images of "
                f"{images.shape[1]}x{images.shape[2]} must have sides divisible by "
                f"{scale} (2^downscales), and upscales ({config.upscales}) must equal "
                f"downscales ({config.downscales})")
