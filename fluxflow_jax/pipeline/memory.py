"""Whether a compiled program fits in memory, checked before it first runs.

A step too large for its device otherwise runs until XLA's allocator fails with
RESOURCE_EXHAUSTED (or, on a CPU, until the kernel kills the process). XLA's memory analysis
of the compiled program (arguments, new outputs, temporaries per device) is compared with
what the devices have: on an accelerator its memory (``bytes_limit``); on CPUs the host's
available memory (MemAvailable), shared by every CPU device, plus what the arguments already
occupy there. The estimate leaves out allocator fragmentation and the data pipeline, so only
a program that cannot fit is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax

from fluxflow_jax.training.performance import MemoryUse

MIB = 2**20
TRAIN_LEVERS = ("lower training.batch_size or data.img_size, set training.precision: bf16 "
                "or training.remat: true, or spread the state over more devices "
                "(training.devices with training.shard_params: true)")

GENERATE_LEVERS = "choose a smaller --size or --batch_size, or a device with more memory"


class DoesNotFit(Exception):
    """A program that needs more memory than its devices have; the message says what was
    asked, what it needs, what is available and what to change."""


def host_available_bytes() -> int | None:
    """The host memory new allocations can get without swapping (Linux's MemAvailable);
    None where /proc/meminfo does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def capacity(use: MemoryUse, devices: Sequence[jax.Device]) -> tuple[int, int, str] | None:
    """(bytes needed, bytes available, where) for a program using ``use`` on each of
    ``devices``; None when the devices do not say how much memory they have."""
    if devices[0].platform == "cpu":  # the devices share the host's memory
        free = host_available_bytes()
        if free is None:
            return None
        # The arguments are allocated already, so MemAvailable no longer counts them.
        return (use.total * len(devices), free + use.arguments * len(devices),
                "available host memory")
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        return None
    return use.total, int(limit), f"{devices[0].device_kind} memory per device"


def fit_summary(use: MemoryUse | None, devices: Sequence[jax.Device]) -> str:
    """How much of the memory a program fitting on ``devices`` takes, in words."""
    known = None if use is None else capacity(use, devices)
    if known is None:
        return "its memory use or the devices' memory is unknown here"
    needed, available, where = known
    return f"needs {needed / MIB:,.0f} MiB of {available / MIB:,.0f} MiB {where}"


def check_fits(use: MemoryUse | None, devices: Sequence[jax.Device], what: str,
               levers: str) -> None:
    """Raise ``DoesNotFit`` when ``what`` (e.g. "the train step of 'vae' for batch_size 8,
    images 8x1024x1024x3, ...") cannot fit; ``levers`` says what to change."""
    if use is None:
        return
    known = capacity(use, devices)
    if known is None or known[0] <= known[1]:
        return
    needed, available, where = known
    raise DoesNotFit(
        f"{what} needs {needed / MIB:,.0f} MiB ({use.temporary / MIB:,.0f} MiB activations "
        f"and workspace, {(use.arguments + use.outputs) / MIB:,.0f} MiB state, batch and "
        f"outputs, per device, {len(devices)} device(s)), but only {available / MIB:,.0f} "
        f"MiB is {where}; to fit: {levers}")
