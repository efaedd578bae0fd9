"""FluxExpander: the VAE decoder (architectures v030, v060, v070 and v080 of fluxflow 0.8.1).

Latent tokens are laid back onto their grid and doubled in size ``upscales`` times by
residual blocks (SPADE conditioned on the latent grid itself, or in v070 on the context
channels of the tokens, a stride-2 16x16 transposed convolution, a dilated convolution),
then mapped to RGB and squashed by a learned Bezier.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.models import layers
from fluxflow_jax.models.bezier import TrainableBezier, bezier_activation
from fluxflow_jax.models.conditioning import SPADE, ContextAttentionMixer
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.models.geometry import resolve_grid


class ResidualUpsampleBlock(nnx.Module):
    def __init__(self, channels: int, context_channels: int, spade_hidden: int, *,
                 norm_without_context: bool, rngs: nnx.Rngs):
        self.norm_without_context = norm_without_context
        self.spade = SPADE(context_channels, channels, hidden=spade_hidden, rngs=rngs)
        self.upsample = layers.ConvTranspose(channels, 5 * channels, 16, stride=2, padding=7,
                                             rngs=rngs)
        self.refine = layers.conv(channels, 5 * channels, 5, padding=4, dilation=2, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        """[B, H, W, C] -> [B, 2H, 2W, C]; with context None, SPADE only normalises or,
        unless ``norm_without_context``, is skipped entirely."""
        skip_spade = context is None and not self.norm_without_context
        y = x if skip_spade else self.spade(x, context)
        y = bezier_activation(self.upsample(y), "tanh", "silu")
        y = bezier_activation(self.refine(y), "tanh", "silu")
        skip = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return y + 0.1 * skip


class FluxExpander(nnx.Module):
    def __init__(self, config: FluxFlowConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.remat = False  # recompute block activations in backward passes
        dim, arch = config.vae_dim, config.architecture
        self.upscale = nnx.List([
            ResidualUpsampleBlock(dim, arch.context_dims or dim, config.spade_hidden,
                                  norm_without_context=arch.spade_norm_without_context,
                                  rngs=rngs)
            for _ in range(config.upscales)])
        if config.architecture.expander_context_mixer:
            # Part of the v030 checkpoint layout, but never used by its forward pass.
            self.context_mixer = ContextAttentionMixer(dim, max(4, dim // 64), rngs=rngs)
        self.rgb_conv1 = layers.conv(dim, 96, 3, padding=1, rngs=rngs)
        self.rgb_norm1 = layers.group_norm(96, 8, rngs=rngs)
        self.rgb_conv2 = layers.conv(96, 48, 3, padding=1, rngs=rngs)
        self.rgb_norm2 = layers.group_norm(48, 8, rngs=rngs)
        self.rgb_conv3 = layers.conv(48, config.in_channels, 1, rngs=rngs)
        self.rgb_activation = TrainableBezier(config.in_channels, (-0.5, -0.05, 0.05, 0.5))

    def __call__(self, packed: jax.Array, use_context: bool = True,
                 hw: tuple[int, int] | None = None) -> jax.Array:
        """Images [B, h*2^U, w*2^U, C] (roughly in [-0.5, 0.5] at init, not clamped).

        ``hw`` is the latent grid; by default it is read from the hw token, which needs a
        concrete ``packed`` (pass it explicitly under ``jit``).
        """
        h, w = resolve_grid(packed, hw, self.config.max_hw)
        b, tokens, width = packed.shape
        if h * w > tokens - 1:
            raise ValueError(f"latent grid {h}x{w} needs {h * w} tokens; packed has "
                             f"{tokens - 1}")
        grid = packed[:, : h * w].reshape(b, h, w, width)
        feat, context = self._split(grid)
        if not use_context:
            context = None
        x = feat
        for block in self.upscale:
            x = layers.checkpointed(ResidualUpsampleBlock.__call__, block, x, context,
                                    remat=self.remat)
        x = jax.nn.silu(self.rgb_norm1(self.rgb_conv1(x)))
        x = jax.nn.silu(self.rgb_norm2(self.rgb_conv2(x)))
        return self.rgb_activation(self.rgb_conv3(x))

    def _split(self, grid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(features, SPADE context) of a token grid: the context channels where the version
        has them, else the features themselves."""
        dim = self.config.vae_dim
        if self.config.architecture.context_dims:
            return grid[..., :dim], grid[..., dim:]
        return grid, grid
