"""Bezier activations: a cubic Bezier curve whose parameter and control points are inputs.

``BezierActivation`` reads every 5 consecutive channels as (t, p0, p1, p2, p3) and returns
one channel, so layers feeding it produce 5x their output width. ``TrainableBezier`` learns
the control points and takes t = sigmoid(x).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.models import init

PreActivation = Literal["sigmoid", "tanh", "silu", "relu"] | None

_PRE_ACTIVATIONS = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    None: lambda x: x,
}


def bezier(t: jax.Array, p0: jax.Array, p1: jax.Array, p2: jax.Array,
           p3: jax.Array) -> jax.Array:
    """(1-t)^3 p0 + 3(1-t)^2 t p1 + 3(1-t) t^2 p2 + t^3 p3, summed left to right."""
    s = 1.0 - t
    s2 = s * s
    t2 = t * t
    return s2 * s * p0 + 3.0 * s2 * t * p1 + 3.0 * s * t2 * p2 + t2 * t * p3


def bezier_activation(x: jax.Array, t_pre: PreActivation = "sigmoid",
                      p_pre: PreActivation = None) -> jax.Array:
    """Channel-last Bezier activation: [..., 5F] -> [..., F].

    Channel 5f + k has role k (0 = t, 1..4 = p0..p3): groups of five are interleaved, as in
    the reference's channel-first ``view(B, F, 5, ...)``.
    """
    if x.shape[-1] % 5:
        raise ValueError(f"Bezier activation needs a channel count divisible by 5, "
                         f"got {x.shape[-1]}")
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // 5, 5)
    t = _PRE_ACTIVATIONS[t_pre](grouped[..., 0])
    p = _PRE_ACTIVATIONS[p_pre](grouped[..., 1:])
    return bezier(t, p[..., 0], p[..., 1], p[..., 2], p[..., 3])


class TrainableBezier(nnx.Module):
    """Bezier with learned control points p0..p3 and t = sigmoid(x).

    The control points are (features,) vectors over the input's last axis: in channel-last
    layout both reference variants (channel-only (C,) and per-channel (C, 1, 1)) are this.
    ``torch_shape`` keeps the reference's parameter shape for serialisation.
    """

    def __init__(self, features: int, control_points: tuple[float, float, float, float] = (
            1e-8, 0.25, 0.75, 1.0), *, torch_shape: tuple[int, ...] | None = None):
        self.torch_shape = torch_shape or (features,)
        for name, value in zip(("p0", "p1", "p2", "p3"), control_points):
            setattr(self, name, nnx.Param(init.constant(value)(None, (features,))))

    def __call__(self, x: jax.Array) -> jax.Array:
        return bezier(jax.nn.sigmoid(x), self.p0[...], self.p1[...], self.p2[...], self.p3[...])
