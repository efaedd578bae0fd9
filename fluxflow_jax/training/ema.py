"""Exponential moving average of parameters, as a pure function of pytrees."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_update(average, params, decay: float | jax.Array):
    """average <- decay * average + (1 - decay) * params, leaf by leaf.

    Non-float leaves (counters) follow the parameters unchanged, like the reference EMA,
    which leaves non-float buffers as they are.
    """
    def update(avg, new):
        if not jnp.issubdtype(jnp.result_type(new), jnp.floating):
            return new
        return (decay * avg + (1 - decay) * new).astype(avg.dtype)

    return jax.tree.map(update, average, params)
