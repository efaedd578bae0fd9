"""Reconstruction quality of the autoencoder: PSNR, SSIM and LPIPS of held-out images
decoded from sampled latents (as the flow trains on them) and from mean latents (the
autoencoder without its sampling noise). The sampling noise is fixed per held-out sample,
so the numbers are deterministic."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.evaluation.fixed_noise import per_sample_noise
from fluxflow_jax.evaluation.image_metrics import psnr, ssim

LATENTS = {"": "sampled", "_mean_latent": "mean"}  # metric-name suffix -> latent
NOISE_SEED = 2025


@partial(jax.jit, static_argnames=("graphdefs", "hw"))
def reconstruction_metrics(graphdefs: tuple, states: tuple, images: jax.Array,
                           indices: jax.Array, *, hw: tuple[int, int]
                           ) -> dict[str, jax.Array]:
    """[B] PSNR, SSIM (and LPIPS, when a third network is given) per latent kind, for
    the (compressor, expander[, lpips]) given as graph definitions and states; ``indices``
    [B] name each sample's fixed latent noise."""
    compressor, expander, *lpips = (nnx.merge(g, s) for g, s in zip(graphdefs, states,
                                                                      strict=True))
    shape = (*hw, compressor.config.vae_dim)
    noises = {"sampled": per_sample_noise(NOISE_SEED, indices, shape, images.dtype),
              "mean": jnp.zeros((images.shape[0], *shape), images.dtype)}
    out = {}
    for suffix, latent in LATENTS.items():
        packed = compressor.encode(images, noise=noises[latent]).packed
        decoded = jnp.clip(expander(packed, hw=hw), -1.0, 1.0)
        out[f"psnr{suffix}"] = psnr(decoded, images)
        out[f"ssim{suffix}"] = ssim(decoded, images)
        if lpips:
            out[f"lpips{suffix}"] = lpips[0](decoded, images)
    return out


def metric_names(with_lpips: bool) -> tuple[str, ...]:
    """The names ``reconstruction_metrics`` reports."""
    kinds = ("psnr", "ssim", "lpips") if with_lpips else ("psnr", "ssim")
    return tuple(f"{kind}{suffix}" for suffix in LATENTS for kind in kinds)
