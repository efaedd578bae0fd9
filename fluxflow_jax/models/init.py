"""Parameter initialisers that draw their values on the host.

XLA compiles one program per random-initialiser shape (about 0.3 s each on CPU; even the
smallest FluxFlow model has a hundred distinct shapes), so building a model took longer than
training it for a few steps. These initialisers draw with numpy from a generator seeded by
the JAX key instead: no compilation, and the same values whether called eagerly, under
``jit`` or under ``eval_shape`` (where they go through ``jax.pure_callback``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Sampler = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


def _host_random(sample: Sampler) -> nnx.Initializer:
    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        shape = tuple(int(s) for s in shape)

        def draw(key_data) -> np.ndarray:
            rng = np.random.default_rng(np.asarray(key_data, np.uint32).ravel().tolist())
            return np.asarray(sample(rng, shape), dtype=dtype)

        key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype,
                                                               jax.dtypes.prng_key) else key
        if isinstance(key_data, jax.core.Tracer):
            return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), key_data)
        return jnp.asarray(draw(key_data))

    return init


def constant(value: float) -> nnx.Initializer:
    def init(key, shape, dtype=jnp.float32) -> jax.Array:
        return jnp.asarray(np.full(tuple(shape), value, dtype=dtype))

    return init


def uniform(bound: float) -> nnx.Initializer:
    """U(-bound, bound)."""
    return _host_random(lambda rng, shape: rng.uniform(-bound, bound, shape))


def normal(std: float) -> nnx.Initializer:
    return _host_random(lambda rng, shape: rng.normal(0.0, std, shape))


def xavier_uniform() -> nnx.Initializer:
    """Glorot uniform for kernels laid out [..receptive field.., in, out]."""

    def sample(rng, shape):
        receptive = math.prod(shape[:-2])
        bound = math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
        return rng.uniform(-bound, bound, shape)

    return _host_random(sample)


def unit_vector() -> nnx.Initializer:
    """A random direction (normalised Gaussian), as spectral norm starts its u and v."""

    def sample(rng, shape):
        x = rng.normal(size=shape)
        return x / max(np.linalg.norm(x), 1e-12)

    return _host_random(sample)


zeros = constant(0.0)
ones = constant(1.0)
