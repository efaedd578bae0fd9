"""Loss terms, the noise schedule and the timestep window against independent PyTorch /
diffusers computations and the 0.8.1 PyTorch trainer's own functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler

from fluxflow_jax.training import diffusion, losses
from fluxflow_jax.training.flow_step import FlowOptions, cfg_dropout_probability
from reference_trainer import trainer_module


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return (rng.uniform(-1, 1, (3, 12, 20, 3)), rng.uniform(-1, 1, (3, 12, 20, 3)))


def test_frequency_aware_l1_and_its_gradient_under_jit(images):
    """Value and gradient against torch's ``avg_pool2d(count_include_pad=True)``; the
    gradient is taken under jit, where a window sum needs a concrete zero to differentiate."""
    pred, target = images
    with jax.enable_x64(True):
        loss = lambda p, t: losses.frequency_l1(p, t, alpha=0.7)
        actual = loss(jnp.asarray(pred), jnp.asarray(target))
        actual_grad = jax.jit(jax.grad(loss))(jnp.asarray(pred), jnp.asarray(target))
    p, t = nchw(pred).requires_grad_(True), nchw(target)
    low = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    expected = F.l1_loss(low(p), low(t)) + 0.7 * F.l1_loss(p - low(p), t - low(t))
    expected.backward()
    np.testing.assert_allclose(float(actual), float(expected), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(actual_grad).transpose(0, 3, 1, 2),
                               p.grad.numpy(), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("free_bits", [0.0, 0.05])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kl_divergence(free_bits, reduction):
    rng = np.random.default_rng(1)
    mu, logvar = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 3, 4, 8)) * 0.3
    with jax.enable_x64(True):
        actual = losses.kl_divergence(jnp.asarray(mu), jnp.asarray(logvar), free_bits,
                                      reduction)
    m, lv = torch.from_numpy(mu), torch.from_numpy(logvar)
    per_element = torch.clamp(-0.5 * (1 + lv - m**2 - lv.exp()), min=free_bits)
    expected = per_element.flatten(1).sum(1).mean() if reduction == "sum" else per_element.mean()
    np.testing.assert_allclose(float(actual), float(expected), rtol=1e-12)
    if free_bits:
        assert float(actual) > float(losses.kl_divergence(jnp.asarray(mu), jnp.asarray(logvar),
                                                          0.0, reduction))


def test_kl_beta_cosine_warmup():
    steps = jnp.arange(0, 250, 7)
    expected = 1e-4 * (1 - np.cos(np.pi * np.clip(np.arange(0, 250, 7) / 200, 0, 1))) / 2
    np.testing.assert_allclose(losses.kl_beta(steps, 1e-4, 200), expected, rtol=1e-6)
    assert float(losses.kl_beta(jnp.asarray(0), 1e-4, 0)) == pytest.approx(1e-4)


def test_hinge_and_generator_losses():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(4, 3, 5, 1)), rng.normal(size=(4, 3, 5, 1)) * 2
    r, f = torch.from_numpy(real).mean((1, 2, 3)), torch.from_numpy(fake).mean((1, 2, 3))
    with jax.enable_x64(True):
        hinge = losses.hinge_discriminator_loss(jnp.asarray(real), jnp.asarray(fake))
        gen = losses.generator_loss(jnp.asarray(fake), 0.1)
    np.testing.assert_allclose(float(hinge), float(F.relu(1 - r).mean() + F.relu(1 + f).mean()),
                               rtol=1e-12)
    np.testing.assert_allclose(float(gen), float(-0.1 * f.mean()), rtol=1e-12)


def test_r1_penalty_matches_autograd_and_is_differentiable():
    rng = np.random.default_rng(3)
    weight, real = rng.normal(size=(3, 3, 3, 2)), rng.normal(size=(2, 8, 10, 3))
    torch_weight = torch.from_numpy(weight.transpose(3, 2, 0, 1)).requires_grad_()
    x = nchw(real).requires_grad_()
    logits = torch.tanh(F.conv2d(x, torch_weight, padding=1))  # a small nonlinear "D"
    (grad,) = torch.autograd.grad(logits.mean((1, 2, 3)).sum(), x, create_graph=True)
    expected = grad.pow(2).flatten(1).sum(1).mean()
    (expected_weight_grad,) = torch.autograd.grad(expected, torch_weight)

    def logits_fn(w):
        return lambda images: jnp.tanh(jax.lax.conv_general_dilated(
            images, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))

    with jax.enable_x64(True):
        value, weight_grad = jax.value_and_grad(
            lambda w: losses.r1_penalty(logits_fn(w), jnp.asarray(real)))(jnp.asarray(weight))
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(weight_grad).transpose(3, 2, 0, 1),
                               expected_weight_grad.numpy(), rtol=1e-9)


def test_instance_noise_decays():
    np.testing.assert_allclose(losses.instance_noise_std(jnp.asarray(10000), 0.01, 0.9999),
                               0.01 * 0.9999**10000, rtol=1e-4)


def test_alignment_loss():
    rng = np.random.default_rng(4)
    tokens, text = rng.normal(size=(2, 6, 8)), rng.normal(size=(2, 8))
    image = torch.from_numpy(tokens).mean(1)
    expected = (1 - F.cosine_similarity(F.normalize(image), F.normalize(torch.from_numpy(text))))
    with jax.enable_x64(True):
        actual = losses.alignment_loss(jnp.asarray(tokens), jnp.asarray(text))
    np.testing.assert_allclose(float(actual), float(expected.mean()), rtol=1e-12)


# ----------------------------------------------------------------------------- schedule


def test_alphas_cumprod_equal_diffusers_bitwise():
    reference = DPMSolverMultistepScheduler(num_train_timesteps=1000).alphas_cumprod.numpy()
    np.testing.assert_array_equal(diffusion.alphas_cumprod(), reference)


def test_noising_and_v_target():
    rng = np.random.default_rng(5)
    x0, noise = rng.normal(size=(4, 6, 8)), rng.normal(size=(4, 6, 8))
    t = np.array([1, 250, 700, 999])
    alpha_bar = torch.from_numpy(diffusion.alphas_cumprod().astype(np.float64))[t]
    a, s = alpha_bar.sqrt()[:, None, None], (1 - alpha_bar).sqrt()[:, None, None]
    x, n = torch.from_numpy(x0), torch.from_numpy(noise)
    with jax.enable_x64(True):
        noisy = diffusion.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
        v = diffusion.v_target(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(noisy, a * x + s * n, rtol=1e-12)
    np.testing.assert_allclose(v, a * n - s * x, rtol=1e-12)
    # diffusers' own add_noise agrees up to its float32 arithmetic (t >= 1; spec §7.1).
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(1000)
    theirs = scheduler.add_noise(x.float(), n.float(), torch.from_numpy(t))
    np.testing.assert_allclose(noisy, theirs.numpy(), atol=2e-4)


def test_timestep_distribution_favours_low_noise():
    t = np.asarray(diffusion.sample_timesteps(jax.random.key(0), 20000))
    assert t.min() >= 0 and t.max() <= 999
    assert 250 < t.mean() < 340  # spec: mean ~296
    assert np.mean(t < 300) == pytest.approx(0.56, abs=0.02)
    weights = np.exp(diffusion.timestep_log_weights())
    np.testing.assert_allclose(weights.sum(), 1.0)
    assert np.all(np.diff(weights) < 0)


def test_uniform_timesteps_cover_the_schedule_evenly():
    t = np.asarray(diffusion.sample_timesteps(jax.random.key(0), 20000, "uniform"))
    assert t.min() == 0 and t.max() == 999
    assert t.mean() == pytest.approx(499.5, abs=8)
    assert np.mean(t < 300) == pytest.approx(0.30, abs=0.015)


def test_smooth_l1_v_loss_is_torchs_on_std_normalised_values():
    rng = np.random.default_rng(0)
    pred, target, clean = (rng.normal(size=(2, 9, 4)).astype(np.float32) * s
                           for s in (0.3, 0.5, 0.02))
    scale = torch.from_numpy(clean).std() + 1e-8
    expected = F.smooth_l1_loss(torch.from_numpy(pred) / scale,
                                torch.from_numpy(target) / scale, beta=0.01)
    got = losses.v_prediction_loss(jnp.asarray(pred), jnp.asarray(target),
                                   jnp.asarray(clean), "smooth_l1")
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)
    mse = losses.v_prediction_loss(jnp.asarray(pred), jnp.asarray(target),
                                   jnp.asarray(clean), "mse")
    np.testing.assert_allclose(mse, np.mean((pred - target) ** 2), rtol=1e-6)


def test_smooth_l1_v_loss_with_context_channels_is_the_reference_trainers():
    """v070/v080 tokens end in context channels: the trainer divides the latent and the
    context channels each by their own v-target's std (written out here in torch) and adds
    the two losses."""
    rng = np.random.default_rng(1)
    pred, target = (rng.normal(size=(2, 9, 12)).astype(np.float32) * s for s in (0.3, 0.5))
    target[..., 7:] *= 0.2  # context channels on another scale
    clean = rng.normal(size=(2, 9, 12)).astype(np.float32)
    p, v = torch.from_numpy(pred), torch.from_numpy(target)
    parts = [(p[..., :7], v[..., :7]), (p[..., 7:], v[..., 7:])]
    expected = sum(F.smooth_l1_loss(a / (b.std() + 1e-8), b / (b.std() + 1e-8), beta=0.01)
                   for a, b in parts)
    got = losses.v_prediction_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(clean),
                                   "smooth_l1", context_dims=5)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


def test_model_time_indexes_every_timestep_exactly():
    """The flow processor embeds index trunc(t_float * 999): it must give back t."""
    t = jnp.arange(1000)
    index = jnp.trunc(diffusion.model_time(t) * 999).astype(jnp.int32)
    np.testing.assert_array_equal(index, np.arange(1000))


# ----------------------------------------------------------------------------- timestep window


@pytest.mark.parametrize("num_timesteps, start", [(1000, 0), (1000, 200), (400, 0), (50, 49)])
def test_timestep_window_draws_as_the_reference_trainer(monkeypatch, num_timesteps, start):
    """0.8.1's ``sample_t``: the cos² weights laid over [start, N - 1]. Its weights are
    caught on their way into ``torch.multinomial``; ours are the probabilities we draw
    from, and our draws stay in the window."""
    caught = []

    def multinomial(weights, count, replacement):
        caught.append(weights.clone())
        return torch.zeros(count, dtype=torch.int64)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    drawn = trainer_module("schedulers").sample_t(8, "cpu", start, num_timesteps)
    assert drawn.tolist() == [start] * 8  # the offset: index 0 is timestep start
    weights = np.exp(diffusion.timestep_log_weights(num_timesteps, start))
    # The trainer's weights are float32: near the window's end, where the cosine nears 0,
    # they are off by up to 4e-11 (measured), against a largest weight of 2e-3 or more.
    np.testing.assert_allclose(weights, caught[0].numpy(), rtol=2e-6, atol=1e-10)
    for sampling in diffusion.TIMESTEP_SAMPLING:
        t = np.asarray(diffusion.sample_timesteps(jax.random.key(1), 4000, sampling,
                                                  num_timesteps, start))
        assert t.min() >= start and t.max() <= num_timesteps - 1
        assert t.min() == start or num_timesteps - start > 100


@pytest.mark.parametrize("num_timesteps, start", [(1000, 0), (1000, 200), (400, 17), (50, 49)])
def test_window_time_and_schedule_are_the_reference_trainers(num_timesteps, start):
    """The flow's time (t - start) / max(1, N - 1 - start) clipped to [0, 1], bit for bit as
    the trainer computes it in float32, and the noise schedule of N steps as its diffusers
    scheduler builds it."""
    t = torch.arange(start, num_timesteps)
    denominator = float(max(1, (num_timesteps - 1) - start))
    expected = ((t.float() - float(start)) / denominator).clamp(0.0, 1.0)
    actual = diffusion.model_time(jnp.asarray(t.numpy()), num_timesteps, start)
    np.testing.assert_array_equal(np.asarray(actual), expected.numpy())
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=num_timesteps,
                                            prediction_type="v_prediction")
    np.testing.assert_array_equal(diffusion.alphas_cumprod(num_timesteps),
                                  scheduler.alphas_cumprod.numpy())


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])
def test_timestep_scaled_cfg_dropout_is_the_reference_trainers(p):
    """Per sample: p (0.5 + 0.5 t / N) clipped to [0, min(0.5, 2p)] (the trainer's formula,
    written out in torch); the trainer then drops each sample with these values' mean,
    which is therefore also the share dropped here. "fixed": p for every sample."""
    t = np.array([0, 10, 250, 600, 999, 333])
    window = {"num_train_timesteps": 1000, "cfg_dropout_prob": p}
    scaled = cfg_dropout_probability(FlowOptions(cfg_dropout_schedule="timestep", **window),
                                     jnp.asarray(t))
    t_normalised = torch.from_numpy(t).float() / 1000
    expected = torch.clamp(p * (0.5 + 0.5 * t_normalised), 0.0, min(0.5, p * 2.0))
    np.testing.assert_allclose(np.asarray(scaled), expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(float(np.mean(scaled)), expected.mean().item(), rtol=1e-6)
    fixed = cfg_dropout_probability(FlowOptions(**window), jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(fixed), np.full(6, p, np.float32))
