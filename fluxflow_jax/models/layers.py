"""Flax NNX building blocks configured to behave like their PyTorch counterparts.

Inputs are NHWC. Each constructor reproduces PyTorch's default initialisation (or the
reference's xavier init where it uses one) and PyTorch's numerics: LayerNorm/GroupNorm
epsilon and exact (two-pass) variance, symmetric explicit padding, and ConvTranspose with
PyTorch's [in, out, kh, kw] kernel semantics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


class ConvTranspose(nnx.Module):
    """``nn.ConvTranspose2d`` for ``kernel_size - 2 * padding == stride``: [B, H, W, in] ->
    [B, stride*H, stride*W, out], computed as ``stride**2`` ordinary convolutions.

    Output pixel (s*m + r) only meets the kernel taps congruent to (r + padding) mod s, so
    each output phase r is a stride-1 correlation of the input with those taps, reversed;
    the phases are interleaved afterwards. The textbook form (a convolution over the input
    with s-1 zeros inserted between pixels) multiplies zeros in 1 - 1/s**2 of its products,
    and XLA:CPU runs such input-dilated convolutions through a slow generic loop: on the
    expander's 16x16 upsampling the phase form is 7x faster forward and backward on CPU.

    The kernel is stored as flax's ``transpose_kernel=True`` layout [kh, kw, out, in] (the
    PyTorch weight [in, out, kh, kw] permuted), drawn before the bias with PyTorch's fan-in
    taken from ``out``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int,
                 padding: int, rngs: nnx.Rngs):
        if kernel_size - 2 * padding != stride:
            raise ValueError(f"kernel {kernel_size}, padding {padding}: only the exact "
                             f"{stride}x upsampling (kernel - 2 padding == stride) is supported")
        kernel_init, bias_init = _torch_default_inits(out_channels * kernel_size**2, False)
        self.stride, self.padding = stride, padding
        self.kernel = nnx.Param(kernel_init(
            rngs.params(), (kernel_size, kernel_size, out_channels, in_channels)))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,)))

    def _phase(self, r: int) -> tuple[slice, tuple[int, int]]:
        """(the kernel taps output phase r uses, applied reversed; its input padding
        (low, high), which keeps the phase's output the input's size)."""
        s, first = self.stride, (r + self.padding) % self.stride
        taps = len(range(first, self.kernel.shape[0], s))
        low = taps - 1 - (r + self.padding) // s
        return slice(first, None, s), (low, taps - 1 - low)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.result_type(x, self.kernel[...])
        kernel = self.kernel[...].astype(dtype).transpose(0, 1, 3, 2)  # [kh, kw, in, out]
        x = x.astype(dtype)
        b, h, w, _ = x.shape
        s = self.stride
        rows = []
        for rh in range(s):
            taps_h, pad_h = self._phase(rh)
            phases = []
            for rw in range(s):
                taps_w, pad_w = self._phase(rw)
                phases.append(jax.lax.conv_general_dilated(
                    x, kernel[taps_h, taps_w][::-1, ::-1], (1, 1), (pad_h, pad_w),
                    dimension_numbers=("NHWC", "HWIO", "NHWC")))
            rows.append(jnp.stack(phases, axis=3))  # [B, H, W, s(rw), out]
        y = jnp.stack(rows, axis=2)  # [B, H, s(rh), W, s(rw), out]
        return y.reshape(b, s * h, s * w, -1) + self.bias[...].astype(dtype)


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

    In float32 and float64 the softmax is normalised after the product with the values:
    exp(scores - max) v / sum(exp(scores - max)), the scale applied to q, the max held
    constant for the gradient (softmax does not depend on it). That makes two passes fewer
    over the [B, heads, S, S] scores, the memory-bound part. On XLA:CPU, against
    ``jax.nn.dot_product_attention`` (``tools/attention_speed.py``): forward 1.8x and
    gradient 3.5x as fast for the tiny encoder's 256 tokens x 8 heads of width 2, 1.4x and
    1.1x for 1024 tokens x 8 heads of width 64. Narrower dtypes keep softmax then product,
    with the softmax in float32 (``softmax``), so the value matmuls stay in the narrow
    dtype. A single key (the flow's cross-attention to its one text token) has weight 1
    whatever the query, so its value is the output, and the query gets no gradient, as in
    PyTorch.
    """
    if k.shape[1] == 1:
        return jnp.broadcast_to(v, (*q.shape[:-1], v.shape[-1]))
    if q.dtype not in (jnp.float32, jnp.float64):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        return jnp.einsum("bhqk,bkhd->bqhd", softmax(scores), v)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
    row_max = jax.lax.stop_gradient(reduce_last_axis(scores, jnp.maximum, jnp.max))
    weights = jnp.exp(scores - row_max)
    weighted = jnp.einsum("bhqk,bkhd->bhqd", weights, v)
    return jnp.einsum("bhqd->bqhd", weighted / reduce_last_axis(weights, jnp.add, jnp.sum))


def reduce_last_axis(x: jax.Array, pair: Callable[[jax.Array, jax.Array], jax.Array],
                     reduce: Callable[..., jax.Array], width: int = 32) -> jax.Array:
    """``reduce(x, axis=-1, keepdims=True)`` after folding the axis in halves with ``pair``
    (``jnp.add`` for a sum) down to ``width`` entries.

    XLA:CPU rewrites a reduction over more than 32 entries as a tree of reduce-windows, and
    those run slowly: over [4, 8, 256, 256] scores a max took 0.83 ms and a sum 0.24 ms,
    folded 0.16 ms and 0.14 ms. The folds are elementwise, so every backend fuses them.
    """
    while x.shape[-1] > width:
        half = x.shape[-1] // 2
        folded = pair(x[..., :half], x[..., half:2 * half])
        x = jnp.concatenate([folded, x[..., 2 * half:]], axis=-1) if x.shape[-1] % 2 else folded
    return reduce(x, axis=-1, keepdims=True)


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
