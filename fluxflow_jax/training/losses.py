"""Loss terms of the VAE-GAN and flow stages as pure functions (images NHWC).

Each follows the reference trainer's formula, with our deliberate differences named where they
apply.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np


def low_pass(images: jax.Array) -> jax.Array:
    """3x3 mean filter, stride 1, zero padding counted (PyTorch's ``count_include_pad``):
    border pixels average in zeros and are still divided by 9. (The zero is a concrete
    numpy scalar, so under jit XLA sees a differentiable window sum.)"""
    window = (1, 3, 3, 1)
    summed = jax.lax.reduce_window(images, np.zeros((), images.dtype), jax.lax.add, window,
                                   (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return summed / 9.0


def frequency_l1(pred: jax.Array, target: jax.Array, alpha: float = 1.0) -> jax.Array:
    """L1 of the low-pass parts plus alpha * L1 of the high-pass residuals (means)."""
    low_pred, low_target = low_pass(pred), low_pass(target)
    low = jnp.mean(jnp.abs(low_pred - low_target))
    high = jnp.mean(jnp.abs((pred - low_pred) - (target - low_target)))
    return low + alpha * high


def kl_divergence(mu: jax.Array, logvar: jax.Array, free_bits: float = 0.0,
                  reduction: Literal["sum", "mean"] = "sum") -> jax.Array:
    """KL(N(mu, exp(logvar)) || N(0, 1)) with per-element free bits.

    "sum" (the reference): summed over each sample's latent elements, averaged over the
    batch, so it grows with resolution. "mean": averaged over every element.
    """
    per_element = jnp.maximum(-0.5 * (1 + logvar - mu**2 - jnp.exp(logvar)), free_bits)
    if reduction == "mean":
        return jnp.mean(per_element)
    return jnp.mean(jnp.sum(per_element.reshape(per_element.shape[0], -1), axis=1))


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float) -> jax.Array:
    """Mean Huber loss as torch's ``smooth_l1_loss``: quadratic below ``beta``, linear above."""
    error = jnp.abs(pred - target)
    return jnp.mean(jnp.where(error < beta, 0.5 * error**2 / beta, error - 0.5 * beta))


def v_prediction_loss(prediction: jax.Array, target: jax.Array, clean: jax.Array,
                      kind: Literal["mse", "smooth_l1"], context_dims: int = 0) -> jax.Array:
    """The flow's loss: "mse", or the 0.8.1 PyTorch trainer's "smooth_l1" (beta 0.01) on
    values divided by a standard deviation: without context channels (v060), prediction and
    target divided by the clean latent's; with the last ``context_dims`` channels of each
    token being context (v070, v080), the latent and the context channels each divided by
    their own target's, and the two losses added."""
    if kind == "mse":
        return jnp.mean((prediction - target) ** 2)

    def normalised(prediction, target, reference):
        scale = jax.lax.stop_gradient(jnp.std(reference, ddof=1)) + 1e-8
        return smooth_l1(prediction / scale, target / scale, 0.01)

    if not context_dims:
        return normalised(prediction, target, clean)
    split = prediction.shape[-1] - context_dims
    return sum(normalised(p, t, t) for p, t in ((prediction[..., :split], target[..., :split]),
                                                (prediction[..., split:], target[..., split:])))


def kl_beta(step: jax.Array, beta: float, warmup_steps: int) -> jax.Array:
    """Cosine warm-up of the KL weight from 0 to ``beta`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return jnp.asarray(beta, jnp.float32)
    progress = jnp.clip(step / warmup_steps, 0.0, 1.0)
    return beta * jnp.sin(jnp.pi / 2 * progress) ** 2  # = (1 - cos(pi p))/2, no cancellation


def per_sample_logits(logits: jax.Array) -> jax.Array:
    """Mean of each sample's patch logits: [B, ...] -> [B]."""
    return logits.reshape(logits.shape[0], -1).mean(axis=1)


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    real, fake = per_sample_logits(real_logits), per_sample_logits(fake_logits)
    return jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake))


def generator_loss(fake_logits: jax.Array, lambda_adv: float) -> jax.Array:
    """``lambda_adv`` * (-mean logit) of the discriminator on generated images."""
    return -lambda_adv * jnp.mean(per_sample_logits(fake_logits))


def r1_penalty(logits_fn: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """Batch mean of |d(sum_b mean logit_b)/d x|^2: the gradient penalty on real images.

    Differentiable in the discriminator's parameters (closed over by ``logits_fn``), as the
    penalty term must be.
    """
    def summed_logits(x):
        return jnp.sum(per_sample_logits(logits_fn(x)))

    grads = jax.grad(summed_logits)(real)
    return jnp.mean(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=1))


def instance_noise_std(step: jax.Array, std: float, decay: float) -> jax.Array:
    """sigma_t = std * decay^step (a deliberate difference: applied to real and fake D inputs).

    Computed as exp(step * log(decay)) with the log in double: rounding ``decay`` itself to
    float32 would be off by 1e-4 relative after 10k steps.
    """
    return std * jnp.exp(step * math.log(decay))


def alignment_loss(prediction_tokens: jax.Array, text_embeddings: jax.Array) -> jax.Array:
    """1 - cosine(mean predicted token, text embedding), averaged; needs equal widths.

    The caller checks widths (statically) and skips the term when they differ.
    """
    image = prediction_tokens.mean(axis=1)
    text = text_embeddings.mean(axis=1) if text_embeddings.ndim == 3 else text_embeddings
    normalize = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(1 - jnp.sum(normalize(image) * normalize(text), axis=-1))
