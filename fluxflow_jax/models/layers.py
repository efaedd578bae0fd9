"""Flax NNX building blocks configured to behave like their PyTorch counterparts.

Inputs are NHWC. Each constructor reproduces PyTorch's default initialisation (or the
reference's xavier init where it uses one) and PyTorch's numerics: LayerNorm/GroupNorm
epsilon and exact (two-pass) variance, symmetric explicit padding, and ConvTranspose with
PyTorch's [in, out, kh, kw] kernel semantics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.models import init


class Buffer(nnx.Variable):
    """A fixed, non-trainable array that is still part of the serialised state
    (PyTorch's persistent buffers, e.g. the rotary ``inv_freq``)."""


def _torch_default_inits(fan_in: int, xavier: bool):
    """(kernel_init, bias_init): PyTorch's kaiming-uniform(a=sqrt 5) or the reference's
    xavier-uniform with zero bias."""
    if xavier:
        return init.xavier_uniform(), init.zeros
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return init.uniform(bound), init.uniform(bound)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, xavier: bool = False,
           use_bias: bool = True) -> nnx.Linear:
    kernel_init, bias_init = _torch_default_inits(in_features, xavier)
    return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
                      bias_init=bias_init, rngs=rngs)


def conv(in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs,
         stride: int = 1, padding: int = 0, dilation: int = 1, use_bias: bool = True,
         xavier: bool = False) -> nnx.Conv:
    """``nn.Conv2d`` equivalent (symmetric integer padding)."""
    kernel_init, bias_init = _torch_default_inits(in_channels * kernel_size**2, xavier)
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
                    padding=((padding, padding), (padding, padding)),
                    kernel_dilation=dilation, use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=bias_init, rngs=rngs)


def conv_transpose(in_channels: int, out_channels: int, kernel_size: int, *, stride: int,
                   padding: int, rngs: nnx.Rngs) -> nnx.ConvTranspose:
    """``nn.ConvTranspose2d`` equivalent.

    With ``transpose_kernel=True`` the kernel is the PyTorch weight [in, out, kh, kw]
    transposed to [kh, kw, out, in]; PyTorch's padding p becomes k - 1 - p on each side of
    the stride-dilated input. PyTorch computes fan-in of this weight from dim 1 (out).
    """
    kernel_init, bias_init = _torch_default_inits(out_channels * kernel_size**2, False)
    pad = kernel_size - 1 - padding
    return nnx.ConvTranspose(in_channels, out_channels, (kernel_size, kernel_size),
                             strides=stride, padding=((pad, pad), (pad, pad)),
                             transpose_kernel=True, kernel_init=kernel_init,
                             bias_init=bias_init, rngs=rngs)


def layer_norm(features: int, *, rngs: nnx.Rngs, epsilon: float = 1e-5) -> nnx.LayerNorm:
    return nnx.LayerNorm(features, epsilon=epsilon, use_fast_variance=False,
                         scale_init=init.ones, bias_init=init.zeros, rngs=rngs)


def group_norm(features: int, groups: int, *, rngs: nnx.Rngs,
               affine: bool = True) -> nnx.GroupNorm:
    return nnx.GroupNorm(features, num_groups=groups, epsilon=1e-5, use_scale=affine,
                         use_bias=affine, use_fast_variance=False, scale_init=init.ones,
                         bias_init=init.zeros, rngs=rngs)


class Embedding(nnx.Module):
    """``nn.Embedding``: a lookup table, normal init (PyTorch's default std is 1).

    Unlike ``nnx.Embed``, whose output dtype is fixed when it is built, the lookup returns
    the table's current dtype, so a model cast to float64 computes in float64 throughout.
    """

    def __init__(self, num: int, features: int, *, rngs: nnx.Rngs, std: float = 1.0):
        self.embedding = nnx.Param(init.normal(std)(rngs.params(), (num, features)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, S, D] -> [B, S, heads, D/heads], heads as contiguous chunks of the feature axis."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(dh)) v over [B, S, heads, dh] inputs; no mask, no dropout.

    Written out rather than ``jax.nn.dot_product_attention``, whose logits are float32 even
    for float64 inputs: float64 parity with PyTorch must stay exact.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return jnp.einsum("bhqk,bkhd->bqhd", softmax(scores), v)


def softmax(scores: jax.Array) -> jax.Array:
    """Softmax over the last axis, computed in at least float32 (bfloat16 logits would
    lose the small probabilities), returned in the logits' dtype."""
    wide = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    return jax.nn.softmax(wide, axis=-1).astype(scores.dtype)


def checkpointed(fn, *args, remat: bool):
    """``fn(*args)``, the modules it uses passed among ``args``. With ``remat`` its
    activations are recomputed in the backward pass instead of being kept from the forward
    one (``jax.checkpoint``): less memory for one more forward of the block."""
    return nnx.remat(fn)(*args) if remat else fn(*args)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """``attention`` on [B, S, D] projections split into ``heads``; returns [B, S, D]."""
    out = attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return out.reshape(q.shape)
