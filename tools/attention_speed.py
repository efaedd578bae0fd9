"""Multi-head attention's forward and gradient: fluxflow-jax's form against
``jax.nn.dot_product_attention`` and PyTorch's ``scaled_dot_product_attention``.

    python tools/attention_speed.py [--batch 4] [--tokens 256] [--heads 8] [--head-width 2]

The defaults are the tiny config's encoder attention (64 px images, 16x16 latent tokens,
vae_dim 16 over 8 heads); the reference size is ``--batch 1 --tokens 1024 --heads 8
--head-width 64``. Its scores are [batch, heads, tokens, tokens], and the passes over them,
not the matmuls, are what the time goes to. JAX compiles with the train steps' options
(``fluxflow_jax.training.compiler``). Times are medians of 15 calls after one untimed call;
the gradient is of sum(sin(out)) with respect to q, k and v.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch

from conv_speed import median_ms
from fluxflow_jax.models.layers import attention
from fluxflow_jax.training.compiler import compiler_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-width", type=int, default=2)
    args = parser.parse_args()
    shape = (args.batch, args.tokens, args.heads, args.head_width)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    options = compiler_options(jax.devices()[0].platform)

    def timed(form) -> tuple[float, float]:
        forward = jax.jit(form).lower(q, k, v).compile(options)
        gradient = jax.jit(jax.grad(lambda *qkv: jnp.sum(jnp.sin(form(*qkv))), (0, 1, 2))
                           ).lower(q, k, v).compile(options)
        return (median_ms(lambda: forward(q, k, v).block_until_ready()),
                median_ms(lambda: jax.block_until_ready(gradient(q, k, v))))

    ours, xla = timed(attention), timed(jax.nn.dot_product_attention)
    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).requires_grad_()
                  for x in (q, k, v))

    def torch_gradient() -> None:
        torch.sin(torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)).sum().backward()

    with torch.no_grad():
        torch_forward = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv))
    print(f"attention {shape} (batch, tokens, heads, head width), float32, ms")
    print(f"{'':34s} {'forward':>8s} {'gradient':>9s}")
    print(f"{'fluxflow_jax.models.layers':34s} {ours[0]:8.2f} {ours[1]:9.2f}")
    print(f"{'jax.nn.dot_product_attention':34s} {xla[0]:8.2f} {xla[1]:9.2f}")
    print(f"{'torch scaled_dot_product_attention':34s} {torch_forward:8.2f} "
          f"{median_ms(torch_gradient):9.2f}")


if __name__ == "__main__":
    main()
