"""Noise fixed per held-out sample: a function of (seed, the sample's index, a stream), so
a sample meets the same noise in every evaluation, whatever batch it lands in."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_sample_noise(seed: int, indices: jax.Array, shape: tuple[int, ...],
                     dtype=jnp.float32, stream: int = 0) -> jax.Array:
    """Standard normal noise [len(indices), *shape]; ``stream`` tells apart several draws
    for one sample (e.g. one per timestep)."""
    def draw(index: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), stream)
        return jax.random.normal(key, shape, dtype)

    return jax.vmap(draw)(indices)
