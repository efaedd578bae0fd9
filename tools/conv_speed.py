"""One 3x3 convolution's forward and backward, XLA (JAX) against PyTorch, on this machine.

    python tools/conv_speed.py [--batch 4] [--size 64] [--cin 48] [--cout 96] [--xla-defaults]

The training steps are mostly convolutions; this isolates how fast each library runs one,
so a step's speed-up over PyTorch can be read against it. Rows: forward; input gradient;
weight gradient (JAX, each jitted alone); forward + both gradients (JAX jitted as one,
PyTorch eager autograd). JAX compiles with the train steps' options
(``fluxflow_jax.training.compiler``; ``--xla-defaults``: XLA's own). Times are medians of 15
calls after one untimed call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from fluxflow_jax.training.compiler import compiler_options


def median_ms(run: Callable[[], object], calls: int = 15) -> float:
    run()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jax_rows(x: np.ndarray, kernel: np.ndarray, grad: np.ndarray, options: dict
             ) -> dict[str, Callable]:
    x, kernel, grad = map(jnp.asarray, (x, kernel, grad))

    def compiled(function: Callable, *args: jax.Array) -> Callable:
        return jax.jit(function).lower(*args).compile(compiler_options=options)

    forward = compiled(conv, x, kernel)
    input_grad = compiled(lambda g: jax.vjp(lambda v: conv(v, kernel), x)[1](g)[0], grad)
    weight_grad = compiled(lambda g: jax.vjp(lambda k: conv(x, k), kernel)[1](g)[0], grad)
    both = compiled(lambda v, k, g: jax.vjp(conv, v, k)[1](g), x, kernel, grad)
    return {"forward": lambda: forward(x, kernel).block_until_ready(),
            "input gradient": lambda: input_grad(grad).block_until_ready(),
            "weight gradient": lambda: weight_grad(grad).block_until_ready(),
            "forward + both gradients": lambda: jax.block_until_ready(both(x, kernel, grad))}


def torch_rows(x: np.ndarray, kernel: np.ndarray, grad: np.ndarray) -> dict[str, Callable]:
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    kernel = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()).requires_grad_()
    grad = torch.from_numpy(grad.transpose(0, 3, 1, 2).copy())

    def forward() -> None:
        with torch.no_grad():
            torch.nn.functional.conv2d(x, kernel, padding=1)

    def both() -> None:
        x.grad = kernel.grad = None
        torch.nn.functional.conv2d(x, kernel, padding=1).backward(grad)

    return {"forward": forward, "forward + both gradients": both}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("batch", 4), ("size", 64), ("cin", 48), ("cout", 96)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--xla-defaults", action="store_true",
                        help="compile with XLA's default options, not the train steps'")
    args = parser.parse_args()
    options = {} if args.xla_defaults else compiler_options(jax.devices()[0].platform)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.size, args.size, args.cin)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, args.cin, args.cout)) * 0.05).astype(np.float32)
    grad = rng.normal(size=(args.batch, args.size, args.size, args.cout)).astype(np.float32)
    gflop = 2 * args.batch * args.size**2 * 9 * args.cin * args.cout / 1e9  # one conv
    print(f"3x3 conv, NHWC {args.batch}x{args.size}x{args.size}x{args.cin} -> {args.cout}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}")
    for library, rows in (("jax", jax_rows(x, kernel, grad, options)),
                          ("torch", torch_rows(x, kernel, grad))):
        for name, run in rows.items():
            ms = median_ms(run)
            work = gflop * (3 if name.startswith("forward +") else 1)
            print(f"{library:6s} {name:25s} {ms:8.2f} ms  {work / ms * 1e3:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
