"""The flow's v-prediction loss at fixed timesteps with fixed noise: deterministic, so it
compares across runs, checkpoints and validation points (the training loss draws both).

The image tokens are the compressor's mean latents (no sampling noise); each timestep's
noise (of the kind the flow trains against, ``flow_noise``) is fixed per held-out sample
(``fixed_noise``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.evaluation.fixed_noise import per_sample_keys
from fluxflow_jax.models import flow_noise
from fluxflow_jax.training import diffusion

TIMESTEPS = (100, 300, 500, 700, 900)  # spread over the schedule's 1000
NOISE_SEED = 2024


def metric_names() -> tuple[str, ...]:
    """``flow_v_loss`` (the mean over the timesteps), then one per timestep."""
    return ("flow_v_loss", *(f"flow_v_loss_t{t}" for t in TIMESTEPS))


@partial(jax.jit, static_argnames=("graphdefs", "hw"))
def v_losses(graphdefs: tuple, states: tuple, images: jax.Array, input_ids: jax.Array,
             attention_mask: jax.Array, indices: jax.Array, *,
             hw: tuple[int, int]) -> jax.Array:
    """[B, len(TIMESTEPS)] mean squared v-prediction errors of the (compressor,
    text_encoder, flow_processor) given; ``indices`` [B] name each sample's fixed noise."""
    compressor, text_encoder, flow = (nnx.merge(g, s) for g, s in zip(graphdefs, states,
                                                                        strict=True))
    batch, dim = images.shape[0], compressor.config.vae_dim
    packed = compressor.encode(images, noise=jnp.zeros((batch, *hw, dim), images.dtype)).packed
    x0, hw_token = packed[:, :-1], packed[:, -1:]
    text = text_encoder(input_ids, attention_mask)
    losses = []
    for step, t in enumerate(TIMESTEPS):
        keys = per_sample_keys(NOISE_SEED, indices, stream=step)
        noise = flow_noise.tokens(
            flow_noise.per_sample_draws(compressor.config, keys, hw, x0.dtype), compressor)
        times = jnp.full((batch,), t)
        noisy = jnp.concatenate([diffusion.add_noise(x0, noise, times), hw_token], axis=1)
        prediction = flow(noisy, text, diffusion.model_time(times), hw=hw)[:, :-1]
        target = diffusion.v_target(x0, noise, times)
        losses.append(jnp.mean((prediction - target) ** 2, axis=(1, 2)))
    return jnp.stack(losses, axis=1)
