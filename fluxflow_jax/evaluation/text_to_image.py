"""Text-to-image from held-out captions with fixed starting noise, for the caption scorer."""

from __future__ import annotations

import jax

from fluxflow_jax.evaluation.fixed_noise import per_sample_noise
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.sampling import generate, latent_grid

NOISE_SEED = 2026
SOLVER_STEPS = 20


def generated(models: FluxFlowModels, input_ids: jax.Array, attention_mask: jax.Array,
              indices: jax.Array, *, height: int, width: int,
              steps: int = SOLVER_STEPS) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1], each from noise fixed by its held-out index."""
    h, w = latent_grid(models.config, height, width)
    noise = per_sample_noise(NOISE_SEED, indices, (h * w, models.config.vae_dim))
    return generate(models, input_ids, attention_mask, height=height, width=width,
                    noise=noise, num_steps=steps)
