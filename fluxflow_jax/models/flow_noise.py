"""The noise the flow is trained against, which is also where generation starts.

``gaussian``: standard normal latent tokens, as PyTorch's trainer trains the flow.
``encoded_noise_image``: the compressor's tokens of a random image (standard normal pixels
times 2, minus 1), which is where PyTorch fluxflow's ``FluxFlowPipeline`` starts generating.
Those tokens carry the compressor's position table, so a flow trained against them can tell
where each token lies at every timestep, pure noise included. The flow architecture has no
absolute positions of its own (rotary embeddings only), so from Gaussian tokens it cannot
put a shape where a caption says.

Both kinds are drawn in two parts: ``draw`` makes the random arrays (cheap, for a whole
batch at once), and ``tokens`` turns them into latent tokens (for ``encoded_noise_image``, a
pass of the compressor, which a caller may run per micro-batch).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from fluxflow_jax.models.config import FLOW_NOISES, FluxFlowConfig

GAUSSIAN, ENCODED_NOISE_IMAGE = FLOW_NOISES

Draws = Mapping[str, jax.Array]


def draw(config: FluxFlowConfig, key: jax.Array, batch: int, grid: tuple[int, int],
         dtype: jnp.dtype = jnp.float32) -> dict[str, jax.Array]:
    """The random arrays behind ``batch`` noise token sequences on the latent ``grid``."""
    h, w = grid
    if config.flow_noise == GAUSSIAN:
        return {"noise": jax.random.normal(key, (batch, h * w, config.latent_width), dtype)}
    image_key, latent_key = jax.random.split(key)
    factor = 2**config.downscales
    shape = (batch, h * factor, w * factor, config.in_channels)
    return {"noise_image": jax.random.normal(image_key, shape, dtype) * 2 - 1,
            "noise_latent": jax.random.normal(latent_key, (batch, h, w, config.vae_dim), dtype)}


def tokens(draws: Draws, compressor=None,
           inputs: Callable[[jax.Array], jax.Array] = lambda x: x) -> jax.Array:
    """Noise tokens [B, h*w, latent_width] from ``draw``'s arrays. ``encoded_noise_image``
    needs the compressor (no gradient passes through it) and ``inputs``, which casts its
    inputs (to a mixed-precision run's compute dtype)."""
    if "noise" in draws:
        return draws["noise"]
    if compressor is None:
        raise ValueError(f"{ENCODED_NOISE_IMAGE} noise needs the compressor")
    packed = compressor.encode(inputs(draws["noise_image"]),
                               noise=inputs(draws["noise_latent"])).packed
    return jax.lax.stop_gradient(packed[:, :-1])


def per_sample_draws(config: FluxFlowConfig, keys: jax.Array, grid: tuple[int, int],
                     dtype: jnp.dtype = jnp.float32) -> dict[str, jax.Array]:
    """``draw`` with one key per sample (keys [B]): a sample's noise does not depend on the
    batch it is in."""
    drawn = jax.vmap(lambda key: draw(config, key, 1, grid, dtype))(keys)
    return {name: value[:, 0] for name, value in drawn.items()}
