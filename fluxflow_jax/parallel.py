"""Data parallelism: one mesh axis, "data", over every device (of every host).

A train step is jitted with the batch split along its first axis over ``data`` and the
state (parameters, optimizer moments, EMA) replicated; XLA then inserts the gradient
all-reduce itself, so the step's code is the single-device code. This is what ``pmap`` gave,
expressed the way current JAX builds ``pmap`` itself.

With sharded parameters (FSDP/ZeRO-3 style) each device holds only a 1/N slice of every
large state leaf, split over the same ``data`` axis: XLA all-gathers a weight where the
step uses it and reduce-scatters its gradient, so the state's memory per device shrinks N
times for the price of those collectives. The step's code is still the single-device code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# Leaves smaller than this stay whole on every device when parameters are sharded: biases
# and norms cost more in collectives than they save in memory.
MIN_SHARDED_ELEMENTS = 4096


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays held whole on every device."""
    return NamedSharding(mesh, PartitionSpec())


def sharded_spec(shape: Sequence[int], devices: int,
                 min_elements: int = MIN_SHARDED_ELEMENTS) -> PartitionSpec:
    """How a state leaf of ``shape`` is split over ``devices``: along its largest axis that
    ``devices`` divides; whole (replicated) when it is small or no axis divides."""
    if math.prod(shape) < min_elements:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % devices == 0:
            return PartitionSpec(*(DATA_AXIS if a == axis else None for a in range(len(shape))))
    return PartitionSpec()


def sharded_state(tree: Any, mesh: Mesh, min_elements: int = MIN_SHARDED_ELEMENTS) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (arrays or shape structs) by ``sharded_spec``."""
    devices = mesh.devices.size
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, sharded_spec(leaf.shape, devices, min_elements)), tree)


def whole(array: jax.Array) -> jax.Array:
    """``array`` itself where each of its devices holds it whole, else a gathered copy."""
    sharding = array.sharding
    if sharding.is_fully_replicated or not isinstance(sharding, NamedSharding):
        return array
    return whole_copy(array)


def whole_copy(array: jax.Array) -> jax.Array:
    """A copy of ``array`` held whole on each of its devices, gathered if it was sharded:
    what host code (saving, sampling) reads, on any number of hosts."""
    sharding = array.sharding
    if sharding.is_fully_replicated or not isinstance(sharding, NamedSharding):
        return jnp.copy(array)
    return jax.device_put(array, NamedSharding(sharding.mesh, PartitionSpec()))


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    """A clear error instead of XLA's when the global batch cannot be split evenly."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(f"the global batch of {batch_size} cannot be split over {devices} "
                         f"devices; use a batch size divisible by {devices}")


def join_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None) -> None:
    """Join a multi-host run (``jax.distributed.initialize``); call before any other JAX use.

    What is not given comes from the environment: ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, else JAX's cluster detection (SLURM, Open MPI,
    Cloud TPU pods, Kubernetes). Afterwards ``jax.devices()`` lists every process's devices.
    """
    from_env = lambda name: int(os.environ[name]) if os.environ.get(name) else None
    jax.distributed.initialize(
        coordinator_address=coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=num_processes or from_env("JAX_NUM_PROCESSES"),
        process_id=process_id if process_id is not None else from_env("JAX_PROCESS_ID"))
