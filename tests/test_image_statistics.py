"""The VAE's image-statistics terms against the 0.8.1 PyTorch trainer's own functions
(``VAETrainer``'s loss methods, which read nothing of the trainer), value and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fluxflow_jax.training import image_statistics
from reference_trainer import trainer_module


@pytest.fixture
def reference():
    """The trainer's class; its functions start sums from ``torch.tensor(0.0)``, so torch's
    default dtype is float64 while they run, for float64 throughout."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield trainer_module("vae_trainer").VAETrainer
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """(decoded, original) [2, 40, 36, 3] in float64: some decoded values beyond [-1, 1] (the
    histogram leaves them out), a high-contrast tile whose variance the coarseness term clips
    to 1, and partial tiles at the right and bottom edges."""
    rng = np.random.default_rng(7)
    pred = rng.uniform(-1.1, 1.1, (2, 40, 36, 3)) * np.linspace(0.4, 1.0, 36)[:, None]
    checker = np.indices((16, 16)).sum(0) % 2 * 2.1 - 1.05
    pred[0, :16, :16, 1] = checker
    target = 0.6 * rng.uniform(-1, 1, (2, 40, 36, 3)) + 0.1
    return pred, target


def torch_value_and_grad(function, pred: np.ndarray, target: np.ndarray):
    p = torch.from_numpy(pred.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    t = torch.from_numpy(target.transpose(0, 3, 1, 2).copy())
    value = function(None, p, t)
    if not value.requires_grad:
        return value.item(), None
    value.backward()
    return value.item(), p.grad.numpy().transpose(0, 2, 3, 1)


def jax_value_and_grad(function, pred: np.ndarray, target: np.ndarray):
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(function)(jnp.asarray(pred), jnp.asarray(target))
    return float(value), np.asarray(grad)


@pytest.mark.parametrize("ours, theirs", [
    ("colour_statistics", "_color_statistics_loss"),
    ("contrast", "_contrast_regularization_loss"),
    ("coarseness", "_coarseness_loss")])
def test_terms_are_the_reference_trainers(reference, images, ours, theirs):
    expected, expected_grad = torch_value_and_grad(getattr(reference, theirs), *images)
    value, grad = jax_value_and_grad(getattr(image_statistics, ours), *images)
    assert value > 0
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-8, atol=1e-14)


def test_coarseness_of_images_smaller_than_a_tile_is_zero(reference, images):
    pred, target = (x[:, :15, :20] for x in images)
    assert torch_value_and_grad(reference._coarseness_loss, pred, target)[0] == 0.0
    assert jax_value_and_grad(image_statistics.coarseness, pred, target)[0] == 0.0


def test_hard_histogram_is_the_reference_trainers_and_trains_nothing(reference, images):
    """``torch.histc`` counts: the same value, and no gradient on either side."""
    expected, expected_grad = torch_value_and_grad(reference._histogram_matching_loss, *images)
    value, grad = jax_value_and_grad(
        lambda p, t: image_statistics.histogram_matching(p, t, soft=False), *images)
    assert expected_grad is None  # the reference's term is not differentiable
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    assert not grad.any()


def soft_cdf_distance_torch(pred: torch.Tensor, target: torch.Tensor, bins: int = 64
                            ) -> torch.Tensor:
    """The soft histogram term from its definition: each value in [-1, 1] spread evenly over
    one bin width around itself (clipped to the range), so the CDF at bin edge e is the mean
    of clamp((e - x) / w + 1/2, 0, 1) over the values in range, and 1 at the last edge."""
    width = 2.0 / bins
    edges = -1.0 + width * torch.arange(1, bins + 1, dtype=pred.dtype)
    total = pred.new_zeros(())
    for c in range(3):
        cdfs = []
        for x in (pred[:, c].reshape(-1), target[:, c].reshape(-1)):
            x = x[(x >= -1) & (x <= 1)]
            below = torch.clamp((edges[None, :] - x[:, None]) / width + 0.5, 0.0, 1.0)
            cdf = below.mean(0)
            cdfs.append(torch.cat([cdf[:-1], torch.ones(1, dtype=x.dtype)]))
        total = total + (cdfs[0] - cdfs[1]).abs().mean()
    return total / 3.0


def test_soft_histogram_from_its_definition_and_near_the_reference(reference, images):
    """Value and gradient of the differentiable histogram term against its definition; its
    value stays within 1/bins of the reference's hard one (each value moves at most half a
    bin width of one edge's CDF), and every in-range decoded value gets a gradient."""
    expected, expected_grad = torch_value_and_grad(
        lambda _, p, t: soft_cdf_distance_torch(p, t), *images)
    value, grad = jax_value_and_grad(image_statistics.histogram_matching, *images)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-8, atol=1e-14)
    hard = torch_value_and_grad(reference._histogram_matching_loss, *images)[0]
    assert abs(value - hard) <= 1 / 64
    pred = images[0]
    assert not grad[np.abs(pred) > 1].any()
    assert np.mean(grad[np.abs(pred) < 1] != 0) > 0.95


def test_fixed_weights_are_the_reference_trainers():
    """As the 0.8.1 trainer adds them to the VAE loss (its source, not configurable)."""
    source = trainer_module("vae_trainer").__file__
    text = open(source, encoding="utf-8").read()
    for name, loss in (("colorstats", "color_stats_loss"), ("histogram", "hist_loss"),
                       ("contrast", "contrast_loss"), ("coarseness", "coarseness_loss")):
        weight = image_statistics.WEIGHTS[name]
        assert f"total_loss + {weight} * {loss}" in text, (name, weight)
