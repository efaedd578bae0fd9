"""DPM-Solver++ (multistep, order 2, midpoint) and its first-order form, for v-prediction.

The schedule is the one diffusers' ``DPMSolverMultistepScheduler`` builds with
``num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction",
algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
lower_order_final=True``: the same integer timesteps and the same float32 table of
sigma~ = sqrt((1 - alpha-bar) / alpha-bar) with 0 appended (correctly rounded here; torch's
float32 sqrt puts 156 of the 1000 entries one ulp away). The per-step coefficients are derived
from it on the host in float64, where diffusers chains them in float32, and the loop runs in
JAX as one ``lax.scan``.

Order 1 at every step is the Euler sampler: an Euler step of the probability-flow ODE in the
variables z = x / alpha and sigma~ (dz/dsigma~ = eps_hat) lands on
x' = alpha' x0_hat + sigma' eps_hat, which is DDIM with eta = 0 and DPM-Solver++(1) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax.training.diffusion import NUM_TIMESTEPS, alphas_cumprod

SPACINGS = ("trailing", "linspace")

# model_fn(x, t) -> v: x the current sample, t the integer training timestep (0-d int32).
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def dpm_solver_timesteps(num_steps: int, spacing: str = "trailing") -> np.ndarray:
    """The integer timesteps, noisiest first, as diffusers' ``set_timesteps(num_steps)``.

    "trailing": round(arange(1000, 0, -1000/N)) - 1, so the first step is 999.
    "linspace": round(linspace(0, 999, N + 1)) reversed, without the final 0.
    Step counts for which these do not give N distinct timesteps in [0, 999] are refused.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if spacing == "trailing":
        ratio = NUM_TIMESTEPS / num_steps
        timesteps = np.arange(NUM_TIMESTEPS, 0, -ratio).round().astype(np.int64) - 1
    elif spacing == "linspace":
        grid = np.linspace(0, NUM_TIMESTEPS - 1, num_steps + 1)
        timesteps = grid.round()[::-1][:-1].astype(np.int64)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if len(timesteps) != num_steps or timesteps[-1] < 0 or np.any(np.diff(timesteps) >= 0):
        # diffusers' float arange gives e.g. 62 "trailing" steps ending at t = -1 for N = 61
        raise ValueError(f"{spacing!r} spacing does not give {num_steps} distinct timesteps "
                         f"in [0, {NUM_TIMESTEPS - 1}] ({timesteps.tolist()[-3:]} at the end); "
                         "choose another step count")
    return timesteps


class SolverSchedule(NamedTuple):
    """Per-step host arrays [N]: the step from x_i to x_{i+1} with x0_i = alpha x_i - sigma v_i
    is x_{i+1} = a x_i + b x0_i + c (x0_i - x0_{i-1})."""

    timesteps: np.ndarray  # int64
    alpha: np.ndarray
    sigma: np.ndarray
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray  # 0 on first-order steps


def solver_schedule(num_steps: int, spacing: str = "trailing", order: int = 2
                    ) -> SolverSchedule:
    """The coefficients of DPM-Solver++ of the given order (1 or 2).

    Order 2 takes a first-order step first (no previous x0 yet) and last (the final sigma is
    0, where diffusers always steps first order); the steps between use the midpoint update
    with r = (lambda_i - lambda_{i-1}) / h_i and D1 = (x0_i - x0_{i-1}) / r.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    timesteps = dpm_solver_timesteps(num_steps, spacing)
    bar = alphas_cumprod()
    table = np.sqrt((np.float32(1) - bar) / bar)  # float32, as diffusers stores it
    sigma_tilde = np.append(table[timesteps], np.float32(0)).astype(np.float64)
    alpha = 1 / np.sqrt(sigma_tilde**2 + 1)
    sigma = sigma_tilde * alpha
    lam = np.log(alpha[:-1]) - np.log(sigma[:-1])  # lambda_N = +inf is never formed
    a = sigma[1:] / sigma[:-1]
    # b = -alpha_{i+1} (e^{-h} - 1); for the last step h = inf, so b = alpha_N = 1.
    h = lam[1:] - lam[:-1]
    b = np.append(-alpha[1:-1] * np.expm1(-h), alpha[-1])
    c = np.zeros(num_steps)
    if order == 2:
        i = np.arange(1, num_steps - 1)
        r = (lam[i] - lam[i - 1]) / h[i]
        c[i] = 0.5 * b[i] / r
    return SolverSchedule(timesteps, alpha[:-1], sigma[:-1], a, b, c)


def _solve(model_fn: ModelFn, x_T: jax.Array, schedule: SolverSchedule, keep_all: bool
           ) -> jax.Array:
    """One scan over the steps, carrying (x, previous x0); the stacked states if keep_all."""
    dtype = x_T.dtype
    coefficients = [jnp.asarray(v, dtype) for v in (schedule.alpha, schedule.sigma, schedule.a,
                                                    schedule.b, schedule.c)]

    def step(carry, inputs):
        x, x0_prev = carry
        t, alpha, sigma, a, b, c = inputs
        x0 = alpha * x - sigma * model_fn(x, t)
        x_next = (a * x + b * x0 + c * (x0 - x0_prev)).astype(dtype)
        return (x_next, x0.astype(dtype)), (x_next if keep_all else None)

    inputs = (jnp.asarray(schedule.timesteps, jnp.int32), *coefficients)
    (x, _), xs = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)), inputs)
    return xs if keep_all else x


def sample(model_fn: ModelFn, x_T: jax.Array, num_steps: int, spacing: str = "trailing",
           order: int = 2) -> jax.Array:
    """x_0 from noise x_T by DPM-Solver++ (order 2 by default); jittable."""
    return _solve(model_fn, x_T, solver_schedule(num_steps, spacing, order), keep_all=False)


def euler_sample(model_fn: ModelFn, x_T: jax.Array, num_steps: int,
                 spacing: str = "trailing") -> jax.Array:
    """x_0 by Euler steps on the probability-flow ODE in (x / alpha, sigma~), i.e. DDIM
    (eta = 0): DPM-Solver++ of order 1 on the same timesteps."""
    return sample(model_fn, x_T, num_steps, spacing, order=1)


def trajectory(model_fn: ModelFn, x_T: jax.Array, num_steps: int, spacing: str = "trailing",
               order: int = 2) -> jax.Array:
    """The sample after every step [N, *x_T.shape]; the last entry is ``sample``'s result."""
    return _solve(model_fn, x_T, solver_schedule(num_steps, spacing, order), keep_all=True)
