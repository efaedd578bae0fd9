"""The VP noise schedule the flow model trains on (v-prediction, not rectified flow).

Linear betas 1e-4..0.02 over 1000 steps, as diffusers' default; alpha-bar is built on the
host in float32 exactly as PyTorch/diffusers build it, so targets match bit for bit.

Training may use another schedule length N (``num_train_timesteps``) and draw t only from
the window [``start_step``, N - 1], as the 0.8.1 PyTorch trainer does: the cos² weights are
then laid over the window, and the flow sees the window's position (t - start) / (N - 1 -
start) as its time.
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


def timestep_log_weights(num_timesteps: int = NUM_TIMESTEPS, start_step: int = 0
                         ) -> np.ndarray:
    """log of w_i = cos^2(((i/(M-1)) + 0.008) / 1.008 * pi/2) for the window's M = N - start
    timesteps start + i: favours the window's low-noise end.

    The last weight is ~0; it becomes a very negative log-weight, never drawn in practice.
    """
    s = np.linspace(0.0, 1.0, num_timesteps - start_step)
    weights = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.log(np.maximum(weights / weights.sum(), np.finfo(np.float64).tiny))


TIMESTEP_SAMPLING = ("cosine", "uniform")


def sample_timesteps(key: jax.Array, batch: int, sampling: str = "cosine",
                     num_timesteps: int = NUM_TIMESTEPS, start_step: int = 0) -> jax.Array:
    """Integer timesteps [B] in [start_step, num_timesteps - 1], with replacement: from the
    cos^2 weights ("cosine", the reference's), or uniformly ("uniform")."""
    if sampling == "uniform":
        return jax.random.randint(key, (batch,), start_step, num_timesteps)
    logits = jnp.asarray(timestep_log_weights(num_timesteps, start_step), jnp.float32)
    return start_step + jax.random.categorical(key, logits, shape=(batch,))


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


def model_time(t: jax.Array, num_timesteps: int = NUM_TIMESTEPS, start_step: int = 0
               ) -> jax.Array:
    """The float time the flow processor takes for integer t: its position in the window,
    (t - start) / max(1, N - 1 - start), clipped to [0, 1]; t / (N - 1) for the full window.

    (A deliberate difference: the 0.2.x trainer passed the integer, which made the time embedding
    constant.) The quotient is taken in double on the host and rounded once, as the PyTorch
    pipeline does, so over the full 1000-step window the processor's index trunc(time * 999)
    gives back exactly t; a float32 division would land one below for some t.
    """
    span = max(1, num_timesteps - 1 - start_step)
    table = np.clip((np.arange(num_timesteps) - start_step) / span, 0.0, 1.0)
    return jnp.asarray(table.astype(np.float32))[t]
