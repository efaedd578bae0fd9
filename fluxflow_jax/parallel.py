"""Data parallelism: one mesh axis, "data", over every device (of every host).

A train step is jitted with the batch split along its first axis over ``data`` and the
state (parameters, optimizer moments, EMA) replicated; XLA then inserts the gradient
all-reduce itself, so the step's code is the single-device code. This is what ``pmap`` gave,
expressed the way current JAX builds ``pmap`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays held whole on every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    """A clear error instead of XLA's when the global batch cannot be split evenly."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(f"the global batch of {batch_size} cannot be split over {devices} "
                         f"devices; use a batch size divisible by {devices}")
