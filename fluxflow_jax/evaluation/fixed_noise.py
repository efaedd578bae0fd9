"""Noise fixed per held-out sample: a function of (seed, the sample's index, a stream), so
a sample meets the same noise in every evaluation, whatever batch it lands in."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_sample_keys(seed: int, indices: jax.Array, stream: int = 0) -> jax.Array:
    """One PRNG key per sample [len(indices)]; ``stream`` tells apart several draws for one
    sample (e.g. one per timestep)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda index: jax.random.fold_in(jax.random.fold_in(base, index),
                                                     stream))(indices)


def per_sample_noise(seed: int, indices: jax.Array, shape: tuple[int, ...],
                     dtype=jnp.float32, stream: int = 0) -> jax.Array:
    """Standard normal noise [len(indices), *shape], drawn from ``per_sample_keys``."""
    return jax.vmap(lambda key: jax.random.normal(key, shape, dtype))(
        per_sample_keys(seed, indices, stream))
