"""Gradient accumulation: one optimizer update from N micro-batches, inside one jitted step.

A step with N accumulation steps takes the effective batch (``batch_size`` x N samples, the
batch a run with N times the batch size would take), splits it into N micro-batches and runs
them one after another in a ``lax.scan``, so activations are held for one micro-batch at a
time. The losses are means over the batch, and micro-batches are equal in size, so the mean
of the micro-batch means (of losses and of gradients) is the whole batch's, to float rounding.

Over a data mesh, micro-batch i is every device's i-th share of its own rows: splitting moves
no data between devices (each device accumulates its own micro-batches, as data-parallel
trainers do). Random draws are made once for the effective batch and split the same way, so
each sample gets the noise it would get without accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fluxflow_jax import parallel


@dataclass(frozen=True)
class MicroBatches:
    """How a step's effective batch splits into ``count`` micro-batches (static)."""

    count: int = 1
    mesh: Mesh | None = None

    @property
    def _devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.devices.size

    def split(self, tree: Any) -> Any:
        """Arrays [count * B, ...] -> [count, B, ...]; over a mesh, each micro-batch is
        split over the devices as the effective batch was, without moving data."""
        def split_one(x: jax.Array) -> jax.Array:
            rows = x.shape[0]
            local = x.reshape(self._devices, self.count, rows // (self._devices * self.count),
                              *x.shape[1:])
            out = jnp.swapaxes(local, 0, 1).reshape(self.count, rows // self.count,
                                                    *x.shape[1:])
            if self.mesh is None:
                return out
            spec = PartitionSpec(None, parallel.DATA_AXIS)
            return jax.lax.with_sharding_constraint(out, NamedSharding(self.mesh, spec))

        return jax.tree.map(split_one, tree)

    def run(self, fn: Callable[[Any], tuple[Any, Any]], parts: Any) -> tuple[Any, Any]:
        """``fn(micro-batch) -> (averaged, stacked)`` over the micro-batches of ``parts``
        (from ``split``): the mean of the ``averaged`` trees and the ``stacked`` trees with
        a leading micro-batch axis. One micro-batch runs without a loop."""
        if self.count == 1:
            averaged, stacked = fn(jax.tree.map(lambda x: x[0], parts))
            return averaged, jax.tree.map(lambda x: x[None], stacked)
        first = jax.tree.map(lambda x: x[0], parts)
        shapes = jax.eval_shape(fn, first)[0]
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(total, part):
            averaged, stacked = fn(part)
            return jax.tree.map(jnp.add, total, averaged), stacked

        total, stacked = jax.lax.scan(body, zeros, parts)
        return jax.tree.map(lambda t: t / self.count, total), stacked

    def check(self, batch_size: int) -> str | None:
        """Why an effective batch of ``batch_size`` cannot be split (None: it can)."""
        if batch_size % self.count:
            return (f"the batch of {batch_size} is not {self.count} equal micro-batches "
                    f"(gradient_accumulation_steps); give batch_size x "
                    f"gradient_accumulation_steps samples")
        micro = batch_size // self.count
        if micro % self._devices:
            return (f"a micro-batch of {micro} cannot be split over {self._devices} devices; "
                    f"use a batch size divisible by {self._devices}")
        return None


def pooled_std(means: jax.Array, squared_deviations: jax.Array, count: int) -> jax.Array:
    """The standard deviation (ddof=1) of the union of equal-sized groups, from each group's
    mean and sum of squared deviations from it (Chan et al.'s pairwise update)."""
    mean = jnp.mean(means)
    total = jnp.sum(squared_deviations) + count * jnp.sum((means - mean) ** 2)
    return jnp.sqrt(total / (count * means.shape[0] - 1))
