"""Text-to-image from held-out captions with fixed starting noise, for the caption scorer."""

from __future__ import annotations

import jax

from fluxflow_jax.evaluation.fixed_noise import per_sample_keys
from fluxflow_jax.models import flow_noise
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.sampling import generate, latent_grid, starting_noise

NOISE_SEED = 2026
SOLVER_STEPS = 20


def fixed_starting_noise(models: FluxFlowModels, indices: jax.Array,
                         grid: tuple[int, int]) -> jax.Array:
    """The starting noise tokens [B, T, D] fixed for held-out samples ``indices`` on a
    latent ``grid``: the same for every run with the same flow noise kind."""
    draws = flow_noise.per_sample_draws(models.config, per_sample_keys(NOISE_SEED, indices),
                                        grid)
    return starting_noise(models, draws)


def generated(models: FluxFlowModels, input_ids: jax.Array, attention_mask: jax.Array,
              indices: jax.Array, *, height: int, width: int,
              steps: int = SOLVER_STEPS) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1], each from noise fixed by its held-out index."""
    noise = fixed_starting_noise(models, indices, latent_grid(models.config, height, width))
    return generate(models, input_ids, attention_mask, height=height, width=width,
                    noise=noise, num_steps=steps)
