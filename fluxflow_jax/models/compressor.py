"""FluxCompressor: the VAE encoder (architectures v030, v060, v070 and v080 of fluxflow 0.8.1).

Images (NHWC, [-1, 1]) plus two coordinate channels go through ``downscales`` stride-2
stages of Bezier-activated convolutions; the latent grid is projected to a mean and a
log-variance, sampled, flattened into tokens, given position information and refined by
self-attention. v060 then bounds the tokens with LayerNorm + tanh (v030 leaves them
unbounded). v070 bounds them before the attention, keeps them as the latent, and appends
to each a few context channels projected from the attention output. The result is packed
with a trailing "hw token" that records the grid size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.models import init, layers
from fluxflow_jax.models.bezier import TrainableBezier, bezier_activation
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.models.geometry import coordinate_channels, hw_token, sincos_table_2d


class Encoded(NamedTuple):
    """Compressor output with the posterior, for the KL term."""

    packed: jax.Array  # [B, T+1, D]
    mu: jax.Array  # [B, h, w, D]
    logvar: jax.Array  # [B, h, w, D]


class Posterior(NamedTuple):
    """The encoder's latent distribution, and the latent grid the tokens are built on."""

    mu: jax.Array  # [B, h, w, D]
    logvar: jax.Array  # [B, h, w, D]
    latent: jax.Array  # [B, h, w, D]: the grid mu and logvar are projected from


class TokenAttentionBlock(nnx.Module):
    """Pre-norm self-attention plus a Bezier feed-forward (``nn.MultiheadAttention`` math)."""

    def __init__(self, dim: int, heads: int, ff_mult: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = layers.layer_norm(dim, rngs=rngs)
        # nn.MultiheadAttention's own init: xavier in_proj, default out_proj, zero biases.
        self.in_proj = layers.linear(dim, 3 * dim, xavier=True, rngs=rngs)
        self.out_proj = nnx.Linear(dim, dim, kernel_init=init.uniform(dim**-0.5),
                                   bias_init=init.zeros, rngs=rngs)
        self.norm2 = layers.layer_norm(dim, rngs=rngs)
        self.ff_in = layers.linear(dim, 5 * dim * ff_mult, rngs=rngs)
        self.ff_out = layers.linear(dim * ff_mult, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = jnp.split(self.in_proj(self.norm1(x)), 3, axis=-1)
        x = x + self.out_proj(layers.multi_head_attention(q, k, v, self.heads))
        hidden = bezier_activation(self.ff_in(self.norm2(x)), "sigmoid", "silu")
        return x + self.ff_out(hidden)


def _downscale(first: nnx.Conv, down: nnx.Conv, x: jax.Array) -> jax.Array:
    """One encoder stage: a 3x3 conv, then the stride-2 8x8 one, each Bezier-activated."""
    x = bezier_activation(first(x), "tanh", "silu")
    return bezier_activation(down(x), "tanh", "silu")


class FluxCompressor(nnx.Module):
    def __init__(self, config: FluxFlowConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.remat = False  # recompute block activations in backward passes
        c, dim = config.compressor_channels, config.vae_dim
        self.encoder_first_step = nnx.List([
            layers.conv(c[i], 5 * c[i + 1], 3, padding=1, use_bias=False, rngs=rngs)
            for i in range(config.downscales)])
        self.encoder_z = nnx.List([
            layers.conv(c[i + 1], 5 * c[i + 1], 8, stride=2, padding=3, rngs=rngs)
            for i in range(config.downscales)])
        self.latent_proj = nnx.List([layers.conv(c[-1] if i == 0 else dim, 5 * dim, 1,
                                                 rngs=rngs) for i in range(2)])
        self.mu_proj = nnx.List([layers.conv(dim, 5 * dim, 1, rngs=rngs) for _ in range(2)])
        self.logvar_proj = nnx.List([layers.conv(dim, 5 * dim, 1, rngs=rngs)
                                     for _ in range(2)])
        self.mu_activation = TrainableBezier(dim, (-0.5, -0.1, 0.1, 0.5))
        self.logvar_activation = TrainableBezier(dim, (-1.0, -0.2, 0.2, 1.0))
        self.token_attn = nnx.List([
            TokenAttentionBlock(dim, config.vae_attn_heads, config.vae_ff_mult, rngs=rngs)
            for _ in range(config.vae_attn_layers)])
        if config.architecture.bounded_tokens:
            self.final_norm = layers.layer_norm(dim, rngs=rngs)
        if config.architecture.context_dims:
            self.context_proj = layers.linear(dim, config.architecture.context_dims, rngs=rngs)

    def encode(self, images: jax.Array, *, noise: jax.Array | None = None,
               key: jax.Array | None = None) -> Encoded:
        """Encode images [B, H, W, C] and sample z = mu + noise * exp(logvar / 2).

        The reparameterisation noise [B, h, w, D] is either given or drawn from ``key``;
        exactly one of them must be passed.
        """
        return self.sample(self.posterior(images), noise=noise, key=key)

    def posterior(self, images: jax.Array) -> Posterior:
        """The deterministic part of encoding images [B, H, W, C]: the convolutions up to
        the latent distribution (what a cache of encoded images holds)."""
        b, height, width, _ = images.shape
        x = jnp.concatenate([images, coordinate_channels(b, height, width, images.dtype)], -1)
        for first, down in zip(self.encoder_first_step, self.encoder_z):
            x = layers.checkpointed(_downscale, first, down, x, remat=self.remat)
        latent = x
        for proj in self.latent_proj:
            latent = bezier_activation(proj(latent), "tanh", "silu")
        mu, logvar = latent, latent
        for mu_proj, logvar_proj in zip(self.mu_proj, self.logvar_proj):
            mu = bezier_activation(mu_proj(mu), "sigmoid", "silu")
            logvar = bezier_activation(logvar_proj(logvar), "sigmoid", "silu")
        return Posterior(self.mu_activation(mu), self.logvar_activation(logvar), latent)

    def sample(self, posterior: Posterior, *, noise: jax.Array | None = None,
               key: jax.Array | None = None) -> Encoded:
        """The packed tokens of z = mu + noise * exp(logvar / 2) (noise given or drawn
        from ``key``): z plus the latent grid and positions, refined by self-attention (and
        bounded, from v060 on)."""
        mu, logvar, latent = posterior
        noise = self._reparameterisation_noise(noise, key, mu)
        z = mu + noise * jnp.exp(0.5 * logvar)

        b, h, w, dim = latent.shape
        tokens = (z.reshape(b, h * w, dim) + sincos_table_2d(h, w, dim, z.dtype)[None]
                  + latent.reshape(b, h * w, dim))
        if self.config.architecture.context_dims:
            tokens = self._bounded(tokens)
            context = self.context_proj(self._attended(tokens))
            tokens = jnp.concatenate([tokens, context], axis=-1)
        else:
            tokens = self._attended(tokens)
            if self.config.architecture.bounded_tokens:
                tokens = self._bounded(tokens)
        hw = hw_token(b, h, w, tokens.shape[-1], self.config.max_hw, tokens.dtype)
        return Encoded(jnp.concatenate([tokens, hw], axis=1), mu, logvar)

    def _attended(self, tokens: jax.Array) -> jax.Array:
        for block in self.token_attn:
            tokens = layers.checkpointed(TokenAttentionBlock.__call__, block, tokens,
                                         remat=self.remat)
        return tokens

    def _bounded(self, tokens: jax.Array) -> jax.Array:
        """LayerNorm + tanh: tokens in [-1, 1]."""
        return jnp.tanh(self.final_norm(tokens))

    def __call__(self, images: jax.Array, *, noise: jax.Array | None = None,
                 key: jax.Array | None = None) -> jax.Array:
        """Packed latent tokens [B, h*w + 1, latent_width] for images [B, H, W, C] in [-1, 1]."""
        return self.encode(images, noise=noise, key=key).packed

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid (h, w) for an image size: each stage maps n to (n - 2) // 2 + 1."""
        for _ in range(self.config.downscales):
            height, width = (height - 2) // 2 + 1, (width - 2) // 2 + 1
        return height, width

    @staticmethod
    def _reparameterisation_noise(noise, key, mu: jax.Array) -> jax.Array:
        if (noise is None) == (key is None):
            raise ValueError("FluxCompressor needs exactly one of noise= (an array shaped "
                             f"like the latent, {mu.shape}) or key= (a PRNG key)")
        if noise is None:
            # Drawn in (at least) float32 whatever the compute dtype, so a bfloat16 run
            # samples the same latents as a float32 one.
            wide = jnp.promote_types(mu.dtype, jnp.float32)
            return jax.random.normal(key, mu.shape, wide).astype(mu.dtype)
        if noise.shape != mu.shape:
            raise ValueError(f"noise has shape {noise.shape}; the latent is {mu.shape}")
        return noise.astype(mu.dtype)
