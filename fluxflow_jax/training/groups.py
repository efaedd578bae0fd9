"""Optimizer groups: the parameters one optimizer updates, and how frozen ones stay put.

A group ("vae", "discriminator", "flow", "text_encoder") spans whole components. Each of its
parameter leaves is labelled trainable or frozen; the optax transform is a
``multi_transform`` that runs the configured optimizer (clipped, scheduled, plateau-scaled)
on trainable leaves and ``set_to_zero`` on frozen ones, which therefore hold no optimizer
state. Frozen leaves are never differentiated either: the step takes gradients of
``trainable(params)`` only, and ``apply`` fills in zeros for the rest and leaves frozen
leaves untouched, so they stay bitwise identical.

A component may train at a fraction of its group's learning rate (``scales``): its
updates are multiplied after the optimizer, weight decay included, as a PyTorch parameter
group with its own learning rate would have them. The scaling holds no state, so the
optimizer state is the same whatever the scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fluxflow_jax.training.ema import ema_update
from fluxflow_jax.training.optimizers import make_optimizer
from fluxflow_jax.training.schedules import (PlateauState, make_schedule, reduce_on_plateau,
                                             resolve_scheduler_config)

TRAINABLE, FROZEN = "trainable", "frozen"
Params = dict[str, nnx.State]
# (component, parameter path inside it) -> the leaf is frozen in this stage.
FrozenLeaf = Callable[[str, tuple], bool]


def _path_names(keypath: tuple) -> tuple:
    """A jax key path as plain names, without the trailing Variable ``value`` attribute."""
    names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in keypath)
    return names[:-1] if names and names[-1] == "value" else names


def _field_of(tree: Any, state_type: type, name: str, default: Any = None) -> Any:
    """The ``name`` field of the one ``state_type`` named tuple inside an optax state."""
    return optax.tree_utils.tree_get(
        tree, name, default,
        filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == state_type.__name__)


_BLOCKED_FROM = 2**16  # leaves this large are summed in blocks on CPU (global_norm)


def global_norm(tree: Any) -> jax.Array:
    """The float32 L2 norm of all of ``tree``'s leaves together (``optax.tree.norm``).

    On CPUs a leaf of 2^16 or more entries has its squares summed in blocks of 16, then the
    block sums in blocks of 16, and so on: XLA:CPU compiles one sum over many entries to a
    slow tree of reduce-windows (0.99 ms for the text encoder's 30522x64 embedding gradient,
    0.36 ms in blocks), as accurate as the blocks. Elsewhere every level would be a kernel
    of its own, so accelerators and small leaves keep one sum.
    """
    blocked = jax.default_backend() == "cpu"

    def sum_of_squares(leaf: jax.Array) -> jax.Array:
        squares = jnp.square(leaf.astype(jnp.float32))
        return (_sum_in_blocks(squares.ravel()) if blocked and leaf.size >= _BLOCKED_FROM
                else jnp.sum(squares))

    return jnp.sqrt(sum((sum_of_squares(leaf) for leaf in jax.tree.leaves(tree)),
                        jnp.zeros([], jnp.float32)))


def _sum_in_blocks(x: jax.Array, block: int = 16) -> jax.Array:
    while x.size > block:
        x = jnp.pad(x, (0, -x.size % block)).reshape(-1, block).sum(axis=1)
    return x.sum()


def clip_by_measured_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` (same state, same arithmetic) that takes the norm as
    the ``grad_norm`` extra argument when the caller has it.

    Train steps measure each group's gradient norm for the NaN guard and the log anyway; a
    second pass over the gradients costs most on the text encoder's 30522-row embedding.
    """

    def update(updates, state, params=None, *, grad_norm=None, **extra):
        del params, extra
        norm = global_norm(updates) if grad_norm is None else grad_norm
        keep = norm < max_norm
        return jax.tree.map(
            lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm),
            updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def scale_components(inner: optax.GradientTransformation, scales: Mapping[str, float]
                     ) -> optax.GradientTransformationExtraArgs:
    """``inner`` with each named component's updates multiplied by its scale.

    ``inner`` updates a dict {component: tree}. Its state is returned as is (no empty
    state of a chain link), so a checkpoint resumes whatever the scales.
    """
    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, **extra):
        updates, state = inner.update(updates, state, params, **extra)
        return {c: jax.tree.map(lambda u, s=scales[c]: u * jnp.asarray(s, u.dtype), tree)
                if c in scales else tree for c, tree in updates.items()}, state

    return optax.GradientTransformationExtraArgs(inner.init, update)


@dataclass(frozen=True, eq=False)
class OptimizerGroup:
    name: str
    components: tuple[str, ...]
    frozen_leaf: FrozenLeaf
    transform: optax.GradientTransformationExtraArgs
    schedule: optax.Schedule
    ema_decay: float | None = None

    @classmethod
    def build(cls, name: str, components: tuple[str, ...], optimizer: Mapping[str, Any],
              scheduler: Mapping[str, Any], total_steps: int, *,
              clip_norm: float | None = 1.0, frozen_leaf: FrozenLeaf = lambda c, p: False,
              ema_decay: float | None = None,
              scales: Mapping[str, float] | None = None) -> "OptimizerGroup":
        """The group's transform from the reference-style optimizer and scheduler configs.

        ``clip_norm`` clips the group's global gradient norm (None: no clipping).
        ``scales`` multiplies a component's updates (its learning rate and weight decay);
        components left out, or at 1, train at the group's rate.
        """
        base_lr = float(optimizer.get("lr", 1e-4))
        schedule = make_schedule(scheduler, base_lr, total_steps)
        chain = [clip_by_measured_norm(clip_norm)] if clip_norm is not None else []
        chain.append(make_optimizer(optimizer, schedule))
        if resolve_scheduler_config(scheduler, total_steps)["type"] == "ReduceLROnPlateau":
            chain.append(reduce_on_plateau(scheduler, base_lr))

        def labels(tree: Params) -> Params:
            return jax.tree_util.tree_map_with_path(
                lambda path, _: FROZEN if frozen_leaf(path[0].key, _path_names(path[1:]))
                else TRAINABLE, tree)

        trainable = optax.chain(*chain)
        own_scales = {c: float(s) for c, s in (scales or {}).items()
                      if c in components and s != 1.0}
        if own_scales:
            trainable = scale_components(trainable, own_scales)
        transform = optax.multi_transform(
            {TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)
        return cls(name, components, frozen_leaf, transform, schedule, ema_decay)

    # -- views of the parameters -------------------------------------------------------

    def _partition(self, component: str, tree: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(frozen, trainable) leaves of one component's tree."""
        return nnx.split_state(tree, lambda path, _: self.frozen_leaf(component, tuple(path)),
                               ...)

    def trainable(self, params: Params) -> Params:
        """The group's trainable leaves, by component: what the step differentiates."""
        return {c: self._partition(c, params[c])[1] for c in self.components}

    def with_trainable(self, params: Params, trainable: Params) -> Params:
        """``params`` with the group's trainable leaves replaced by ``trainable``."""
        out = dict(params)
        for c in self.components:
            out[c] = nnx.merge_state(self._partition(c, params[c])[0], trainable[c])
        return out

    # -- optimisation -----------------------------------------------------------------

    def init(self, params: Params) -> optax.OptState:
        return self.transform.init({c: params[c] for c in self.components})

    def apply(self, grads: Params, opt_state: optax.OptState, params: Params,
              metric: jax.Array, grad_norm: jax.Array | None = None
              ) -> tuple[Params, optax.OptState]:
        """One update from the trainable leaves' gradients; ``metric`` feeds a plateau
        scheduler (ignored by the others), ``grad_norm`` is the gradients' global norm when
        the step has already measured it (the clipping then reuses it)."""
        own = {c: params[c] for c in self.components}
        zeros = {c: jax.tree.map(jnp.zeros_like, self._partition(c, params[c])[0])
                 for c in self.components}
        full_grads = {c: nnx.merge_state(zeros[c], grads[c]) for c in self.components}
        updates, opt_state = self.transform.update(full_grads, opt_state, own, value=metric,
                                                   grad_norm=grad_norm)
        steps = self.trainable(updates)
        new = {c: jax.tree.map(lambda p, u: (p + u).astype(p.dtype), t, steps[c])
               for c, t in self.trainable(own).items()}
        return self.with_trainable(params, new), opt_state

    def learning_rate(self, opt_state: optax.OptState) -> jax.Array:
        """The LR of the next update: the schedule at the update count, times the plateau
        factor when there is one."""
        count = _field_of(opt_state, optax.ScaleByScheduleState, "count")
        scale = _field_of(opt_state, PlateauState, "scale", jnp.ones([], jnp.float32))
        return jnp.asarray(self.schedule(count), jnp.float32) * scale

    def averaged(self, component: str, tree: nnx.State) -> nnx.State:
        """The leaves of a component's tree its average holds: the ones the group trains."""
        return self._partition(component, tree)[1]

    def update_ema(self, ema: Params, params: Params) -> Params:
        """The averages (``averaged`` leaves) moved towards the current weights."""
        if self.ema_decay is None:
            return ema
        return {**ema, **{c: ema_update(ema[c], self.averaged(c, params[c]), self.ema_decay)
                          for c in self.components}}
