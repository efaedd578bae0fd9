"""Per-image PSNR and SSIM of reconstructions, as pure jitted functions (images NHWC).

Images are taken in [-1, 1], the range the models produce, and measured on the [0, 1]
scale of the usual definitions (data range 1). SSIM is Wang et al. (2004): an 11x11
Gaussian window (sigma 1.5) slid over every valid position, K1 = 0.01, K2 = 0.03, per
channel, averaged over positions and channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _unit(images: jax.Array) -> jax.Array:
    return (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0


@jax.jit
def psnr(pred: jax.Array, target: jax.Array) -> jax.Array:
    """[B] peak signal-to-noise ratios in dB; identical images give +inf."""
    mse = jnp.mean((_unit(pred) - _unit(target)) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian the SSIM window is the outer product of."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-offsets**2 / (2 * sigma**2))
    return (weights / weights.sum()).astype(np.float32)


def _local_mean(x: jax.Array, window: jax.Array) -> jax.Array:
    """Gaussian-weighted means of every valid window, per channel: [B, H, W, C] ->
    [B, H - k + 1, W - k + 1, C] (two separable 1-D passes)."""
    channels = x.shape[-1]
    k = window.shape[0]
    rows = jnp.tile(window.reshape(k, 1, 1, 1), (1, 1, 1, channels))
    cols = jnp.tile(window.reshape(1, k, 1, 1), (1, 1, 1, channels))
    spec = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(x, rows, (1, 1), "VALID", dimension_numbers=spec,
                                     feature_group_count=channels)
    return jax.lax.conv_general_dilated(x, cols, (1, 1), "VALID", dimension_numbers=spec,
                                        feature_group_count=channels)


@jax.jit
def ssim(pred: jax.Array, target: jax.Array) -> jax.Array:
    """[B] structural similarities (1 for identical images); each side >= 11 pixels."""
    if min(pred.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} "
                         f"pixels, got {pred.shape[1]}x{pred.shape[2]}")
    x, y = _unit(pred), _unit(target)
    window = jnp.asarray(gaussian_window())
    mean = lambda v: _local_mean(v, window)
    mu_x, mu_y = mean(x), mean(y)
    var_x = mean(x * x) - mu_x**2
    var_y = mean(y * y) - mu_y**2
    cov = mean(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / \
        ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return jnp.mean(index, axis=(1, 2, 3))
