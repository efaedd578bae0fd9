"""Conditioning blocks: SPADE (beta-only), gated context injection, context attention mixer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.models import init, layers


def largest_group_count(channels: int, limit: int = 32) -> int:
    """Largest g <= limit dividing ``channels`` (SPADE's GroupNorm group count)."""
    return next(g for g in range(min(limit, channels), 0, -1) if channels % g == 0)


class SPADE(nnx.Module):
    """Parameter-free GroupNorm plus a spatial shift predicted from a context map.

    out = GN(x) + beta(ctx), with ctx bilinearly resized (half-pixel centres) to x's size.
    """

    def __init__(self, context_channels: int, features: int, *, hidden: int = 128,
                 rngs: nnx.Rngs):
        self.norm = layers.group_norm(features, largest_group_count(features), affine=False,
                                      rngs=rngs)
        self.mlp_shared = layers.conv(context_channels, hidden, 3, padding=1, rngs=rngs)
        self.mlp_beta = layers.conv(hidden, features, 3, padding=1, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        normalized = self.norm(x)
        if context is None:
            return normalized
        if context.shape[1:3] != x.shape[1:3]:
            context = jax.image.resize(context, (*context.shape[:1], *x.shape[1:3],
                                                 context.shape[-1]),
                                       method="bilinear", antialias=False)
        return normalized + self.mlp_beta(jax.nn.relu(self.mlp_shared(context)))


class GatedContextInjection(nnx.Module):
    """x * sigmoid(gate(c)) + bias(c) for tokens x [B, T, D] and a context vector c [B, C]."""

    def __init__(self, context_dim: int, target_dim: int, *, rngs: nnx.Rngs):
        self.gate = layers.linear(context_dim, target_dim, rngs=rngs)
        self.bias = layers.linear(context_dim, target_dim, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        return x * jax.nn.sigmoid(self.gate(context))[:, None] + self.bias(context)[:, None]


class ContextAttentionMixer(nnx.Module):
    """Attention over a few tokens with a learned CLS token prepended.

    Returns (pooled [B, D], tokens [B, K, D]); pooled is the CLS output.
    """

    def __init__(self, d_model: int, heads: int = 4, *, rngs: nnx.Rngs):
        self.heads = heads
        self.cls = nnx.Param(init.zeros(None, (1, 1, d_model)))
        self.q_proj = layers.linear(d_model, d_model, xavier=True, rngs=rngs)
        self.k_proj = layers.linear(d_model, d_model, xavier=True, rngs=rngs)
        self.v_proj = layers.linear(d_model, d_model, xavier=True, rngs=rngs)
        self.out_proj = layers.linear(d_model, d_model, xavier=True, rngs=rngs)
        self.norm_in = layers.layer_norm(d_model, rngs=rngs)
        self.norm_out = layers.layer_norm(d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = self.norm_in(x)
        cls = jnp.broadcast_to(self.cls[...].astype(y.dtype), (y.shape[0], 1, y.shape[-1]))
        y = jnp.concatenate([cls, y], axis=1)
        mixed = layers.multi_head_attention(self.q_proj(y), self.k_proj(y), self.v_proj(y),
                                            self.heads)
        out = self.norm_out(self.out_proj(mixed))
        return out[:, 0], out[:, 1:]
