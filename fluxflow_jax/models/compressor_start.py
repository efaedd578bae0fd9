"""A compressor that starts as a pooling of the image ("pass-through" start).

With PyTorch's initialisation the encoder's output does not depend on the image: each
Bezier-activated layer shrinks the signal, and after the ten of them only noise and the
position table reach the latent tokens, which the autoencoder then learns its way out of
slowly (docs/learning.md). This start rewrites the layers up to the posterior so that each
Bezier activation begins as ``silu`` of one input channel: its four control-point channels
share one weight that passes channel ``f`` through (the identity for the 3x3 and 1x1
convolutions, a 2x2 average for the stride-2 ones), and equal control points make the
curve constant in ``t``. The latent grid then starts as the image average-pooled to its
resolution, scaled to dominate the tokens' position table, and the encoder learns features
on top of it. Only weights change, never the architecture: PyTorch loads the result as any
other checkpoint.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.models.compressor import FluxCompressor

_SIGNAL = 0.1  # the pooled image's scale inside the encoder: silu is near-linear there
_LATENT = 3.0  # its scale in the latent grid, which is added to the tokens
_ROLES = 5  # t, p0..p3 per Bezier output channel


def _pass_channels(conv: nnx.Conv, gain: float) -> None:
    """Set ``conv``'s control-point outputs to ``gain`` x its matching input channel (the
    centre 2x2 taps averaged for 8x8 kernels, the centre tap otherwise); t keeps its draw."""
    kernel = conv.kernel[...]
    height, width, inputs, outputs = kernel.shape
    groups = kernel.reshape(height, width, inputs, outputs // _ROLES, _ROLES)
    taps = jnp.zeros((height, width))
    if height == 8:  # stride 2, padding 3: input rows 2o and 2o+1 sit at taps 3 and 4
        taps = taps.at[3:5, 3:5].set(gain / 4)
    else:
        taps = taps.at[height // 2, width // 2].set(gain)
    shared = jnp.einsum("hw,if->hwif", taps, jnp.eye(inputs, outputs // _ROLES))
    groups = groups.at[..., 1:].set(shared[..., None])
    conv.kernel[...] = groups.reshape(kernel.shape)
    if conv.bias is not None:
        conv.bias[...] = conv.bias[...].reshape(-1, _ROLES).at[:, 1:].set(0.0).reshape(-1)


def start_as_pass_through(compressor: FluxCompressor) -> None:
    """Rewrite a freshly initialised compressor's encoder (in place) to start as a pooling
    of the image (module docstring). The gains keep ``silu(u) ~ u / 2`` near-linear inside
    the encoder, then lift the pooled image to ``_LATENT`` in the latent grid."""
    scale = 1.0  # the images' own
    for first, down in zip(compressor.encoder_first_step, compressor.encoder_z):
        _pass_channels(first, 2 * _SIGNAL / scale)
        _pass_channels(down, 2.0)
        scale = _SIGNAL
    _pass_channels(compressor.latent_proj[0], 2.0)
    _pass_channels(compressor.latent_proj[1], 2 * _LATENT / _SIGNAL)
    _pass_channels(compressor.mu_proj[0], 2 * _SIGNAL / _LATENT)
    _pass_channels(compressor.mu_proj[1], 2.0)
