"""Samplers against diffusers and exact models; text-to-image generation with tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.sampling import (dpm_solver_timesteps, euler_sample, generate, latent_grid,
                                   sample, to_uint8, trajectory)
from fluxflow_jax.sampling.generate import _EXECUTABLES
from fluxflow_jax.training.diffusion import alphas_cumprod
from tiny import TINY

ALPHA_BAR = alphas_cumprod().astype(np.float64)
X_T = np.random.default_rng(0).standard_normal((2, 6, 4))


def stand_in_v(x, t):
    """A deterministic, nonlinear stand-in for the flow: v = 0.3 x + 0.01 t sin(x)."""
    return 0.3 * x + 0.01 * jnp.asarray(t, x.dtype) * jnp.sin(x)


def diffusers_trajectory(num_steps: int, spacing: str):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction",
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    x, states = torch.tensor(X_T, dtype=torch.float64), []
    for t in scheduler.timesteps:
        x = scheduler.step(0.3 * x + 0.01 * float(t) * torch.sin(x), t, x).prev_sample
        states.append(x.numpy())
    return np.stack(states), scheduler.timesteps.numpy()


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 20, 50])
def test_dpm_solver_matches_diffusers_step_for_step(num_steps, spacing):
    expected, timesteps = diffusers_trajectory(num_steps, spacing)
    np.testing.assert_array_equal(dpm_solver_timesteps(num_steps, spacing), timesteps)
    with jax.enable_x64(True):
        ours = np.asarray(trajectory(stand_in_v, jnp.asarray(X_T), num_steps, spacing))
    # diffusers computes its coefficients in float32 and rounds the sample to float32 in
    # every step, so float32 rounding (~1e-7 relative; measured <= 1.1e-6 here) is the floor.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_step_counts_diffusers_mangles_are_refused():
    with pytest.raises(ValueError, match="distinct timesteps"):
        dpm_solver_timesteps(61)  # diffusers' "trailing" gives 62 steps ending at t = -1
    with pytest.raises(ValueError, match="spacing"):
        dpm_solver_timesteps(10, "leading")


def coefficients(t):
    alpha_bar = jnp.asarray(ALPHA_BAR)[t]
    return jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)


def point_mass_v(x0):
    """The exact v for data that is always ``x0``: eps = (x - alpha x0) / sigma."""
    def v(x, t):
        alpha, sigma = coefficients(t)
        return (alpha * x - x0) / sigma
    return v


def gaussian_v(mean, std):
    """The exact v for data ~ N(mean, std^2) per entry (its posterior mean is linear in x)."""
    def v(x, t):
        alpha, sigma = coefficients(t)
        x0 = mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x - alpha * mean)
        return (alpha * x - x0) / sigma
    return v


@pytest.mark.parametrize("solver", [sample, euler_sample])
def test_samplers_recover_a_point_mass(solver):
    """With the exact model every x0 estimate is x0, up to the solver's float32 sigma table."""
    with jax.enable_x64(True):
        x0 = solver(point_mass_v(0.7), jnp.asarray(X_T), 20)
    np.testing.assert_allclose(x0, 0.7, rtol=0, atol=1e-6)


def test_samplers_follow_the_exact_ode_of_gaussian_data():
    """For N(0.5, 1) data the probability-flow ODE maps x_T to 0.5 + xi, with
    xi = (x_T - alpha_T 0.5) / sqrt(alpha_T^2 + sigma_T^2). DPM-Solver++(2) lands within 1e-2
    (measured 3e-3 at 20 steps, 7e-3 at 50: the first-order last step dominates); Euler
    converges at first order (measured 0.21 at 20 steps, 0.085 at 50)."""
    mean, std = 0.5, 1.0
    alpha, sigma = np.sqrt(ALPHA_BAR[999]), np.sqrt(1 - ALPHA_BAR[999])
    exact = mean + std * (X_T - alpha * mean) / np.sqrt(alpha**2 * std**2 + sigma**2)
    error = {}
    with jax.enable_x64(True):
        for name, solver in (("dpm", sample), ("euler", euler_sample)):
            for steps in (20, 50):
                x0 = solver(gaussian_v(mean, std), jnp.asarray(X_T), steps)
                error[name, steps] = float(np.abs(np.asarray(x0) - exact).max())
    assert error["dpm", 20] < 1e-2 and error["dpm", 50] < 1e-2
    assert error["euler", 20] < 0.25 and error["euler", 50] < 0.1
    assert error["euler", 50] < error["euler", 20] / 2


def test_euler_is_an_euler_step_in_scaled_sample_and_sigma_tilde():
    """z = x / alpha moves by (sigma~' - sigma~) eps_hat, eps_hat = sigma x + alpha v."""
    timesteps = dpm_solver_timesteps(8)
    table = np.sqrt((np.float32(1) - alphas_cumprod()) / alphas_cumprod())
    sigma_tilde = np.append(table[timesteps], 0).astype(np.float64)
    with jax.enable_x64(True):
        x = jnp.asarray(X_T)
        for i, t in enumerate(timesteps):
            alpha = 1 / np.sqrt(sigma_tilde[i] ** 2 + 1)
            eps = sigma_tilde[i] * alpha * x + alpha * stand_in_v(x, t)
            z = x / alpha + (sigma_tilde[i + 1] - sigma_tilde[i]) * eps
            x = z / np.sqrt(sigma_tilde[i + 1] ** 2 + 1)
        ours = euler_sample(stand_in_v, jnp.asarray(X_T), 8)
    np.testing.assert_allclose(ours, x, rtol=0, atol=1e-12)


def test_to_uint8_rounds_to_nearest():
    values = np.array([-1.5, -1.0, 0.0, 1.0, 2.0, -1 + 2 / 255, 1 - 1 / 255])
    np.testing.assert_array_equal(to_uint8(values), [0, 0, 128, 255, 255, 1, 254])
    assert to_uint8(values).dtype == np.uint8


@pytest.fixture(scope="module")
def models():
    return FluxFlowModels.create(TINY, nnx.Rngs(0), components=(
        "compressor", "text_encoder", "flow_processor", "expander"))


IDS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % TINY.text_vocab_size
MASK = jnp.array([[1] * 8, [1] * 5 + [0] * 3], bool)
STEPS = 3


def run(models, height=32, width=32, **options):
    return generate(models, IDS, MASK, height=height, width=width, key=jax.random.key(0),
                    num_steps=STEPS, **options)


@pytest.fixture(scope="module")
def unguided(models):
    return run(models)


def test_generate_sizes_compile_once_each(models, unguided):
    before = len(_EXECUTABLES)
    for height, width in ((32, 32), (32, 48), (32, 32), (32, 48)):
        images = run(models, height, width)
        assert images.shape == (2, height, width, 3)
        assert np.isfinite(images).all() and np.abs(images).max() <= 1
        assert latent_grid(TINY, height, width) == models.compressor.latent_shape(height, width)
    assert len(_EXECUTABLES) == before + 1  # 32x32 was compiled by `unguided`
    np.testing.assert_array_equal(run(models), unguided)  # same key, same images


def test_generate_with_the_euler_sampler(models):
    images = run(models, 32, 48, sampler="euler")
    assert images.shape == (2, 32, 48, 3) and np.isfinite(images).all()


def test_generate_refuses_sizes_off_the_latent_grid(models):
    with pytest.raises(ValueError, match="multiples of 4"):
        run(models, 32, 30)


def test_guidance_mixes_conditional_and_null_velocities(models, unguided):
    """With the empty-prompt null set to the prompt itself, v_null = v_cond and guidance 3
    reproduces the unguided run; a different null makes it differ."""
    same = run(models, guidance=3.0, null="empty", empty_ids=IDS, empty_mask=MASK)
    np.testing.assert_allclose(same, unguided, rtol=0, atol=1e-5)
    other = run(models, guidance=3.0, null="empty", empty_ids=jnp.zeros_like(IDS),
                empty_mask=MASK)
    assert np.abs(np.asarray(other) - np.asarray(unguided)).max() > 1e-3
    zero_null = run(models, guidance=3.0)
    assert np.isfinite(zero_null).all()
    assert np.abs(np.asarray(zero_null) - np.asarray(unguided)).max() > 1e-3
