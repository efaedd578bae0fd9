"""The GAN discriminator of the training framework: a spectral-norm patch discriminator with
projection conditioning on a context vector (fluxflow-core 0.2.x ``PatchDiscriminator``).

Spectral normalisation follows ``torch.nn.utils.spectral_norm``: the weight is divided by
sigma = u . (W v), where u and v are power-iteration vectors kept as state. In train mode
each call first runs one power-iteration step and stores the new u and v (the PyTorch
in-place buffer update); in eval mode u and v are used as they are. ``power_iteration()``
runs that step on its own, so a functional train step can advance u and v explicitly and
then call the network in eval mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.models import init, layers
from fluxflow_jax.models.config import FluxFlowConfig

_LEAK = 0.2


class SpectralState(nnx.Variable):
    """Power-iteration vectors of a spectral-normalised layer: state, never trained."""


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


class _SpectralNormalized(nnx.Module):
    """Holds u [out], v [in * kh * kw] and computes the normalised weight matrix.

    ``deterministic`` is NNX's eval flag (set by ``.eval()`` / ``.train()``).
    """

    def _init_vectors(self, rows: int, cols: int, rngs: nnx.Rngs) -> None:
        self.weight_u = SpectralState(init.unit_vector()(rngs.params(), (rows,)))
        self.weight_v = SpectralState(init.unit_vector()(rngs.params(), (cols,)))
        self.deterministic = False

    def weight_matrix(self) -> jax.Array:
        """The weight as the [out, in * kh * kw] matrix PyTorch normalises."""
        raise NotImplementedError

    def power_iteration(self) -> None:
        """One power-iteration step on the current weight (no gradient), stored in u, v."""
        matrix = jax.lax.stop_gradient(self.weight_matrix())
        v = _normalize(matrix.T @ self.weight_u[...].astype(matrix.dtype))
        u = _normalize(matrix @ v)
        self.weight_u[...], self.weight_v[...] = u, v

    def _sigma(self) -> jax.Array:
        """sigma = u . (W v), differentiable in W (u and v are constants, as in PyTorch)."""
        if not self.deterministic:
            self.power_iteration()
        matrix = self.weight_matrix()
        u, v = self.weight_u[...].astype(matrix.dtype), self.weight_v[...].astype(matrix.dtype)
        return u @ (matrix @ v)


class SNConv(_SpectralNormalized):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 padding: int = 0, rngs: nnx.Rngs):
        self.conv = layers.conv(in_channels, out_channels, kernel_size, padding=padding,
                                rngs=rngs)
        self._init_vectors(out_channels, in_channels * kernel_size**2, rngs)

    def weight_matrix(self) -> jax.Array:
        kernel = self.conv.kernel[...]  # HWIO
        return kernel.transpose(3, 2, 0, 1).reshape(kernel.shape[3], -1)  # PyTorch OIHW rows

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.conv.kernel[...]
        sigma = self._sigma()
        y = jax.lax.conv_general_dilated(
            x, (kernel / sigma).astype(x.dtype), (1, 1), self.conv.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.conv.bias[...].astype(x.dtype)


class SNLinear(_SpectralNormalized):
    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.linear = layers.linear(in_features, out_features, rngs=rngs)
        self._init_vectors(out_features, in_features, rngs)

    def weight_matrix(self) -> jax.Array:
        return self.linear.kernel[...].T  # [in, out] -> PyTorch [out, in]

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.linear.kernel[...]
        sigma = self._sigma()
        return x @ (kernel / sigma).astype(x.dtype) + self.linear.bias[...].astype(x.dtype)


class DoubleSNConv(nnx.Module):
    """SN conv 3x3 -> LeakyReLU -> SN conv 3x3 (no activation after the second)."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.conv1 = SNConv(in_channels, out_channels, 3, padding=1, rngs=rngs)
        self.conv2 = SNConv(out_channels, out_channels, 3, padding=1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv2(jax.nn.leaky_relu(self.conv1(x), _LEAK))


class DownBlock(nnx.Module):
    """Two double convolutions, each followed by LeakyReLU, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.conv1 = DoubleSNConv(in_channels, out_channels, rngs=rngs)
        self.conv2 = DoubleSNConv(out_channels, out_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.leaky_relu(self.conv1(x), _LEAK)
        x = jax.nn.leaky_relu(self.conv2(x), _LEAK)
        b, h, w, c = x.shape
        x = x[:, : h - h % 2, : w - w % 2]
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class PatchDiscriminator(nnx.Module):
    """Patch logits [B, H/2^depth, W/2^depth, 1] for images [B, H, W, C].

    With a context vector [B, ctx_dim], each sample's logits are shifted by the projection
    term sum(mean_hw(features) * ctx_proj(context)).
    """

    def __init__(self, config: FluxFlowConfig, *, rngs: nnx.Rngs):
        channels = config.disc_base_channels
        self.stem = DoubleSNConv(config.in_channels, channels, rngs=rngs)
        blocks = []
        for _ in range(config.disc_depth):
            blocks.append(DownBlock(channels, 2 * channels, rngs=rngs))
            channels *= 2
        self.blocks = nnx.List(blocks)
        self.head = SNConv(channels, 1, 3, padding=1, rngs=rngs)
        ctx_dim = config.discriminator_ctx_dim
        self.ctx_proj = (nnx.List([SNLinear(ctx_dim, channels, rngs=rngs),
                                   SNLinear(channels, channels, rngs=rngs)])
                         if ctx_dim > 0 else None)

    def power_iteration(self) -> None:
        """Advance u and v of every spectral-normalised layer by one step, as one train-mode
        call does, without running the network."""
        for _, module in nnx.iter_modules(self):
            if isinstance(module, _SpectralNormalized):
                module.power_iteration()

    def __call__(self, images: jax.Array, context: jax.Array | None = None, *,
                 return_features: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Logits, or (pooled features [B, C], logits) with ``return_features``."""
        x = jax.nn.leaky_relu(self.stem(images), _LEAK)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        features = x.mean(axis=(1, 2))
        if self.ctx_proj is not None and context is not None:
            first, second = self.ctx_proj
            projected = second(jax.nn.leaky_relu(first(context), _LEAK))
            logits = logits + (features * projected).sum(axis=-1)[:, None, None, None]
        return (features, logits) if return_features else logits
