"""tools/flow_denoising_figure.py: a perfect v-prediction gives back the clean tokens."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fluxflow_jax.training.diffusion import add_noise, v_target

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import flow_denoising_figure as figure  # noqa: E402


@pytest.mark.parametrize("t", [0, 200, 500, 950, 999])
def test_the_estimate_from_the_true_velocity_is_the_clean_tokens(t):
    clean, noise = jax.random.normal(jax.random.key(t), (2, 3, 64, 16))
    step = np.full((3,), t)
    noised = add_noise(clean, noise, step)
    estimate = figure.clean_estimate(noised, v_target(clean, noise, step), t)
    np.testing.assert_allclose(estimate, clean, atol=2e-5)


def test_the_estimate_from_a_zero_velocity_is_the_scaled_input():
    noised = jax.random.normal(jax.random.key(0), (1, 4, 16))
    estimate = figure.clean_estimate(noised, np.zeros_like(noised), 999)
    assert float(np.abs(estimate).max()) < 0.02 * float(np.abs(noised).max())
