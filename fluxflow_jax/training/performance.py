"""How fast a step runs against what the hardware could do: images/s and MFU.

MFU (model FLOPs utilisation) is the FLOPs XLA's cost analysis counts for one call of the
compiled step on one device, divided by the step's time and that device's peak. The peak is
looked up by device kind (dense, no sparsity) for the step's precision: bf16 tensor-core
peaks for ``bf16``, and for ``fp32`` the TF32 peaks on GPUs (XLA runs float32 matmuls and
convolutions as TF32 there by default) or the bf16 ones on TPUs (which do the same with
bf16 passes). CPUs have no entry: their MFU is not reported unless a peak is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

# device_kind substring -> {precision: peak FLOP/s per device}; first match wins.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989e12, "fp32": 494e12}),
    ("H100", {"bf16": 989e12, "fp32": 494e12}),  # SXM; PCIe parts are ~25% lower
    ("A100", {"bf16": 312e12, "fp32": 156e12}),
    ("L4", {"bf16": 121e12, "fp32": 60e12}),
    ("TPU v6", {"bf16": 918e12, "fp32": 918e12}),
    ("TPU v5p", {"bf16": 459e12, "fp32": 459e12}),
    ("TPU v5", {"bf16": 197e12, "fp32": 197e12}),  # v5e / v5 lite
    ("TPU v4", {"bf16": 275e12, "fp32": 275e12}),
)


def flops_per_device(executable: jax.stages.Compiled) -> float | None:
    """FLOPs of one call of ``executable`` on one device (a partitioned program is each
    device's share), from XLA's cost analysis; None where the backend gives none."""
    try:
        cost = executable.cost_analysis()
    except Exception:  # backends may not implement it; MFU is then unknown, not an error
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = cost.get("flops") if cost else None
    return float(flops) if flops and flops > 0 else None


@dataclass(frozen=True)
class MemoryUse:
    """What one call of a compiled program holds on each device, by XLA's memory analysis:
    its ``arguments`` (for a train step the state and the batch), the ``outputs`` not
    written into donated arguments, and ``temporary`` scratch (activations kept for the
    backward pass, workspaces)."""

    arguments: int
    outputs: int
    temporary: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporary


def memory_use(executable: jax.stages.Compiled) -> MemoryUse | None:
    """``executable``'s memory per device; None where the backend gives no analysis."""
    try:
        stats = executable.memory_analysis()
        return MemoryUse(
            arguments=int(stats.argument_size_in_bytes),
            outputs=int(stats.output_size_in_bytes - stats.alias_size_in_bytes),
            temporary=int(stats.temp_size_in_bytes))
    except Exception:  # not every backend analyses memory: unknown, not an error
        return None


def peak_flops(device: jax.Device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for ``precision``; None when unknown (CPUs)."""
    kind = getattr(device, "device_kind", "")
    for name, peaks in PEAK_FLOPS:
        if name in kind:
            return peaks.get(precision)
    return None


def utilisation(flops_per_call: float | None, seconds: float, peak: float | None
                ) -> float | None:
    """MFU of a call that took ``seconds``: achieved FLOP/s over the peak."""
    if not flops_per_call or not peak or seconds <= 0:
        return None
    return flops_per_call / seconds / peak
