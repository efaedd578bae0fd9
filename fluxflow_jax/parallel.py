"""Data parallelism: one mesh axis, "data", over every device (of every host).

A train step is jitted with the batch split along its first axis over ``data`` and the
state (parameters, optimizer moments, EMA) replicated; XLA then inserts the gradient
all-reduce itself, so the step's code is the single-device code. This is what ``pmap`` gave,
expressed the way current JAX builds ``pmap`` itself.
"""

from __future__ import annotations

import os
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
