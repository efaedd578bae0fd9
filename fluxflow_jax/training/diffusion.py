"""The VP noise schedule the flow model trains on (v-prediction, not rectified flow).

Linear betas 1e-4..0.02 over 1000 steps, as diffusers' default; alpha-bar is built on the
host in float32 exactly as PyTorch/diffusers build it, so targets match bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax.models.geometry import torch_linspace

NUM_TIMESTEPS = 1000


def alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> np.ndarray:
    """alpha-bar_t = prod_{i<=t} (1 - beta_i) in float32, as diffusers builds it: float32
    betas, and ``torch.cumprod``, which accumulates float32 products in double."""
    alphas = np.float32(1.0) - torch_linspace(beta_start, beta_end, num_timesteps)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def timestep_log_weights(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """log of w_i = cos^2(((i/(N-1)) + 0.008) / 1.008 * pi/2): favours small t (low noise).

    The last weight is ~0; it becomes a very negative log-weight, never drawn in practice.
    """
    s = np.linspace(0.0, 1.0, num_timesteps)
    weights = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.log(np.maximum(weights / weights.sum(), np.finfo(np.float64).tiny))


TIMESTEP_SAMPLING = ("cosine", "uniform")


def sample_timesteps(key: jax.Array, batch: int, sampling: str = "cosine",
                     num_timesteps: int = NUM_TIMESTEPS) -> jax.Array:
    """Integer timesteps [B], with replacement: from the cos^2 weights ("cosine", the
    reference's), or uniformly ("uniform")."""
    if sampling == "uniform":
        return jax.random.randint(key, (batch,), 0, num_timesteps)
    logits = jnp.asarray(timestep_log_weights(num_timesteps), jnp.float32)
    return jax.random.categorical(key, logits, shape=(batch,))


def _coefficients(t: jax.Array, dtype, num_timesteps: int) -> tuple[jax.Array, jax.Array]:
    """(sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t)) shaped to broadcast over [B, T, D]."""
    alpha_bar = jnp.asarray(alphas_cumprod(num_timesteps))[t].astype(dtype)
    return jnp.sqrt(alpha_bar)[:, None, None], jnp.sqrt(1 - alpha_bar)[:, None, None]


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array,
              num_timesteps: int = NUM_TIMESTEPS) -> jax.Array:
    """x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) eps for tokens [B, T, D]."""
    alpha, sigma = _coefficients(t, x0.dtype, num_timesteps)
    return alpha * x0 + sigma * noise


def v_target(x0: jax.Array, noise: jax.Array, t: jax.Array,
             num_timesteps: int = NUM_TIMESTEPS) -> jax.Array:
    """v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x0."""
    alpha, sigma = _coefficients(t, x0.dtype, num_timesteps)
    return alpha * noise - sigma * x0


def model_time(t: jax.Array, num_timesteps: int = NUM_TIMESTEPS) -> jax.Array:
    """The float time the flow processor takes for integer t: t / (N - 1) in [0, 1].

    (A deliberate difference: the 0.2.x trainer passed the integer, which made the time embedding
    constant.) The quotient is taken in double on the host and rounded once, as the PyTorch
    pipeline does, so the processor's index trunc(time * (N - 1)) gives back exactly t; a
    float32 division would land one below for some t.
    """
    table = (np.arange(num_timesteps) / (num_timesteps - 1)).astype(np.float32)
    return jnp.asarray(table)[t]
