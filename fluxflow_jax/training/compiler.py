"""The XLA options train steps are compiled with, per platform.

On CPUs, XLA hands convolutions, matmuls and elementwise chains to the YNNPACK library
("ynn fusions") by default, and there each convolution runs on one thread: on the 2-core
development machine one 3x3 conv (4x64x64, 48 -> 96 channels) took 15.8 ms through YNNPACK
on one core or on two, and 8.5 ms without it. With YNNPACK's fusions off, XLA's own kernels
and XNNPACK run them: the same lowered tiny VAE-GAN step, compiled both ways and timed
interleaved in one process, ran in 0.65 s instead of 0.77-0.81 s; the flow step ~5% faster.
Other platforms get no options.
"""

from __future__ import annotations

from typing import Any

CPU_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(platform: str) -> dict[str, Any]:
    """Options for ``Lowered.compile(compiler_options=...)`` on ``platform`` ("cpu", ...)."""
    return dict(CPU_OPTIONS) if platform == "cpu" else {}
