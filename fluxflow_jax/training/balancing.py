"""Adaptive loss balancing: each loss weighted by the inverse of its recent magnitude.

The state is a fixed-size ring buffer per loss (the last ``window`` values), a pytree that
lives in the train state, so balancing is functional and survives checkpoints. Unlike the
reference, averages are taken by magnitude, so a negative generator loss
cannot flip the adversarial objective, and weights are clamped to [0, max_weight].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_EPS = 1e-8


class LossHistory(NamedTuple):
    values: jax.Array  # [K, window] ring buffer per loss
    count: jax.Array  # [K] values pushed so far


def new_history(num_losses: int, window: int = 100) -> LossHistory:
    return LossHistory(jnp.zeros((num_losses, window), jnp.float32),
                       jnp.zeros((num_losses,), jnp.int32))


def push(history: LossHistory, losses: jax.Array, active: jax.Array) -> LossHistory:
    """Record ``losses`` [K] for the losses where ``active`` [K] is true."""
    window = history.values.shape[1]
    slot = history.count % window
    rows = jnp.arange(history.values.shape[0])
    current = history.values[rows, slot]
    values = history.values.at[rows, slot].set(
        jnp.where(active, losses.astype(jnp.float32), current))
    return LossHistory(values, history.count + active.astype(jnp.int32))


def magnitudes(history: LossHistory) -> jax.Array:
    """|mean| of each loss's recorded values (0 for a loss with none yet)."""
    window = history.values.shape[1]
    filled = jnp.minimum(history.count, window)
    total = jnp.sum(history.values, axis=1)  # unfilled slots hold zeros
    return jnp.abs(jnp.where(filled > 0, total / jnp.maximum(filled, 1), 0.0))


def adaptive_weights(history: LossHistory, enabled: jax.Array,
                     max_weight: float = 5.0) -> jax.Array:
    """Weights [K]: w_k = T / (a_k + eps), T the mean magnitude over losses seen so far.

    A loss with no history yet gets weight 1; a disabled loss gets 0; all are clamped to
    [0, max_weight].
    """
    a = magnitudes(history)
    seen = a > 0
    target = jnp.sum(jnp.where(seen, a, 0.0)) / jnp.maximum(jnp.sum(seen), 1)
    weights = jnp.where(seen, target / (a + _EPS), 1.0)
    return jnp.where(enabled, jnp.clip(weights, 0.0, max_weight), 0.0)
