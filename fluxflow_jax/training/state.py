"""The train state pytree, and the networks' static structure it is applied through.

Train steps are pure functions of a ``TrainState``: every array training touches (parameters,
spectral-norm vectors, optimizer and schedule states, EMA, loss histories, counters) lives
here, keyed by component and optimizer group, so one state serves the VAE-GAN and the flow
stage alike and checkpoints capture a run completely. The modules' structure stays outside,
in ``Networks``: static graph definitions that turn state back into callable modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fluxflow_jax import parallel
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.training.balancing import LossHistory, new_history
from fluxflow_jax.training.precision import cast_parameters

# The losses the VAE-GAN step balances adaptively, in history-row order.
BALANCED_LOSSES = ("recon", "kl", "gan")


@struct.dataclass
class TrainState:
    step: jax.Array  # batches processed so far (int32)
    skipped: jax.Array  # batches whose update the non-finite guard discarded (int32)
    params: dict[str, nnx.State]  # component -> nnx.Param leaves
    buffers: dict[str, nnx.State]  # component -> other variables (spectral u/v, rotary table)
    opt_states: dict[str, Any]  # optimizer group -> optax state
    ema: dict[str, nnx.State]  # component -> averages of the leaves its stage trains
    loss_history: LossHistory  # recent values of BALANCED_LOSSES


class Update(NamedTuple):
    """One part of a train step (the VAE-GAN or the flow update), computed from a state.

    ``commit()`` returns that state with the part's optimizer steps, averages and histories
    made. The step commits only when every part was ``finite``, inside a ``lax.cond``: the
    old state then passes through untouched, and the updates read the parameters and
    moments they overwrite in place (no select over every leaf, which made XLA copy each
    donated leaf first).
    """

    metrics: dict[str, jax.Array]
    finite: jax.Array
    commit: Callable[[], "TrainState"]


@dataclass(frozen=True)
class PackedState:
    """A ``TrainState`` as its flat list of arrays: what the compiled step takes and returns.

    The training loop keeps its state packed between steps. Passed as a tree, the state's
    ~500 arrays are flattened out of nnx Variables before every call and rebuilt into new
    Variables after it, 5-8 ms of host time per step while the device waits (a tenth or more
    of the tiny flow step on a CPU). ``unpack`` builds the tree only where it is read: checkpoints,
    exports and samples. It shares the arrays, so it is stale once the next step donates them.
    """

    leaves: list[jax.Array]
    treedef: Any  # the TrainState's jax.tree structure

    @classmethod
    def pack(cls, state: "TrainState") -> "PackedState":
        leaves, treedef = jax.tree.flatten(state)
        return cls(leaves, treedef)

    def unpack(self) -> "TrainState":
        return jax.tree.unflatten(self.treedef, self.leaves)


def split_models(models: FluxFlowModels) -> tuple[dict[str, nnx.State], dict[str, nnx.State]]:
    """(params, buffers) of every present component, as copies: a step donates its state,
    and the modules must stay usable afterwards."""
    params, buffers = {}, {}
    for name, module in models.present().items():
        _, params[name], buffers[name] = nnx.split(module, nnx.Param, ...)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return copy(params), copy(buffers)


def new_train_state(models: FluxFlowModels, opt_states: dict[str, Any]) -> TrainState:
    """A state from the models' weights, with no averages yet."""
    params, buffers = split_models(models)
    return TrainState(
        step=jnp.zeros([], jnp.int32), skipped=jnp.zeros([], jnp.int32), params=params,
        buffers=buffers, opt_states=opt_states, ema={},
        loss_history=new_history(len(BALANCED_LOSSES)))


def with_average(state: TrainState, component: str) -> nnx.State:
    """A component's weights with its averaged leaves in place of the current ones: an
    average holds only the leaves its stage trains, since a frozen leaf's average is the
    leaf itself."""
    params = state.params[component]
    return nnx.merge_state(params, state.ema[component]) if component in state.ema else params


@dataclass(frozen=True, eq=False)
class Networks:
    """Graph definitions of the components, each in the mode its stage runs it in, and the
    arithmetic they are bound for (``compute_dtype``; None: the parameters' own)."""

    graphdefs: dict[str, nnx.GraphDef]
    compute_dtype: Any = None

    @classmethod
    def from_models(cls, models: FluxFlowModels, train_mode: Collection[str] = (), *,
                    compute_dtype: Any = None, remat: bool = False) -> "Networks":
        """Components named in ``train_mode`` run in train mode (dropout on), the others in
        eval mode; with ``remat`` their blocks recompute activations in the backward pass
        instead of storing them. The given modules are not changed."""
        graphdefs = {}
        for name, module in models.present().items():
            twin = nnx.merge(*nnx.split(module), copy=True)  # only its mode will differ
            if name in train_mode:
                twin.train()
            else:
                twin.eval()
            twin.set_attributes(remat=remat, raise_if_not_found=False)
            graphdefs[name] = nnx.graphdef(twin)
        return cls(graphdefs, compute_dtype)

    def bind(self, name: str, params: dict[str, nnx.State], buffers: dict[str, nnx.State],
             *, compute: bool = True) -> nnx.Module:
        """The component as a module over the given state (inside a traced function), its
        parameters cast to the compute dtype unless ``compute`` is off (e.g. for spectral
        power iterations, whose vectors stay float32).

        The module gets its own variables: calls that update state in place (spectral
        norm) change the module, never the ``params`` / ``buffers`` passed in.
        """
        dtype = self.compute_dtype if compute else None
        return nnx.merge(self.graphdefs[name], cast_parameters(name, params[name], dtype),
                         buffers[name], copy=True)

    def inputs(self, x: jax.Array) -> jax.Array:
        """A network input in the compute dtype."""
        return x if self.compute_dtype is None else x.astype(self.compute_dtype)

    def outputs(self, x: jax.Array) -> jax.Array:
        """A network output back in float32 for the losses (float64 runs stay float64)."""
        return x if self.compute_dtype is None else x.astype(jnp.float32)


def write_to_models(state: TrainState, models: FluxFlowModels, *,
                    ema: bool = False) -> FluxFlowModels:
    """Put a state's weights into ``models`` (copies: the state may be donated later), e.g.
    to save, export or sample from them. With ``ema``, components that have an average get
    it instead of their current weights. Sharded weights are gathered: the modules hold
    each weight whole on every device."""
    for name, module in models.present().items():
        params = with_average(state, name) if ema else state.params[name]
        nnx.update(module, jax.tree.map(parallel.whole_copy, params),
                   jax.tree.map(parallel.whole_copy, state.buffers[name]))
    return models


@contextlib.contextmanager
def viewing(state: TrainState, models: FluxFlowModels, *,
            ema: bool = False) -> Iterator[FluxFlowModels]:
    """``models`` holding the state's own weights (not copies; sharded ones gathered) for
    the block, e.g. to sample from them between two steps; with ``ema``, averaged leaves in
    place of the trained ones, as ``write_to_models`` puts them. Afterwards the models hold
    the weights they held before, since the next step donates the state's arrays."""
    present = models.present()
    # A new tree: the Variables nnx.state returns would follow the module's updates.
    held = {name: jax.tree.map(lambda leaf: leaf, nnx.state(module))
            for name, module in present.items()}
    try:
        for name, module in present.items():
            params = with_average(state, name) if ema else state.params[name]
            nnx.update(module, jax.tree.map(parallel.whole, params),
                       jax.tree.map(parallel.whole, state.buffers[name]))
        yield models
    finally:
        for name, module in present.items():
            nnx.update(module, held[name])
