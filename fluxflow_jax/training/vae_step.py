"""The VAE-GAN update: discriminator first, then the autoencoder, on the same batch.

One encoder and one decoder forward serve both players (the reference runs the encoder twice
and the decoder three times): the decoder's output is the discriminator's fake, the
reconstruction, and the generator's adversarial sample. ``routing.fork`` keeps the
adversarial gradient out of the encoder while reconstruction is trained; in GAN-only mode
(``train_reconstruction: false``) it flows into the encoder, latent context included.

The forward pass runs before the discriminator update and its backward pass after it: the
generator is scored by the updated discriminator, which the generator loss never changes
(its spectral-norm vectors included: the discriminator's power iterations happen in its own
update, twice, as the reference's two train-mode calls do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.checks import (check_bool, field_problems, in_interval, integer_at_least,
                                 one_of, optional)
from fluxflow_jax.training import losses
from fluxflow_jax.training.balancing import adaptive_weights, push
from fluxflow_jax.training.groups import OptimizerGroup, Params, global_norm
from fluxflow_jax.training.lpips import LPIPS
from fluxflow_jax.training.routing import fork
from fluxflow_jax.training.state import BALANCED_LOSSES, Networks, TrainState, Update

VAE_METRICS = ("loss_recon", "loss_l1", "loss_mse", "loss_kl", "kl_beta", "loss_lpips", "loss_gen",
               "loss_disc", "r1_penalty", "weight_recon", "weight_kl", "weight_gan",
               "grad_norm_vae", "grad_norm_disc", "lr_vae", "lr_disc")


@dataclass(frozen=True)
class VAEOptions:
    """What the VAE-GAN stage trains and how (defaults: the seed's)."""

    train_reconstruction: bool = True  # False: GAN-only, no pixel or perceptual loss
    use_gan: bool = True
    train_spade: bool = True  # decoder SPADE conditioning on the latent
    use_lpips: bool = True
    lambda_lpips: float = 0.1
    mse_weight: float = 0.1
    frequency_alpha: float = 1.0
    kl_beta: float = 1e-4
    kl_warmup_steps: int = 5000
    kl_free_bits: float = 0.0
    kl_reduction: Literal["sum", "mean"] = "sum"
    lambda_adv: float = 0.1
    r1_interval: int = 16
    r1_gamma: float = 5.0
    instance_noise_std: float = 0.01
    instance_noise_decay: float = 0.9999
    adaptive_weights: bool = True
    ema_decay: float | None = 0.999

    def problems(self) -> list[str]:
        """Every invalid field, each phrased with its fix."""
        return field_problems(self, _VAE_CHECKS)

    @property
    def decodes(self) -> bool:
        """Whether any loss reads the decoder (else it gets no gradient at all)."""
        return self.train_reconstruction or self.use_gan


_NON_NEGATIVE = in_interval("[0, inf)", 0.1)
_VAE_CHECKS = {
    **{name: check_bool for name in ("train_reconstruction", "use_gan", "train_spade",
                                     "use_lpips", "adaptive_weights")},
    **{name: _NON_NEGATIVE for name in ("lambda_lpips", "mse_weight", "frequency_alpha",
                                        "kl_beta", "kl_free_bits", "lambda_adv", "r1_gamma",
                                        "instance_noise_std")},
    "kl_warmup_steps": integer_at_least(0),
    "r1_interval": integer_at_least(1),
    "kl_reduction": one_of(("sum", "mean")),
    "instance_noise_decay": in_interval("(0, 1]", 0.9999),
    "ema_decay": optional(in_interval("(0, 1]", 0.999)),
}


def unused_expander_leaf(options: VAEOptions) -> Callable[[tuple], bool]:
    """Expander parameters the stage's forward never reads, which must not be decayed:
    the v030 context mixer always, SPADE's convolutions when conditioning is off."""
    def unused(path: tuple) -> bool:
        return path[0] == "context_mixer" or (not options.train_spade and "spade" in path)
    return unused


def _mean_image_token(packed: jax.Array) -> jax.Array:
    """The discriminator's context: the mean of the latent's image tokens (hw token out)."""
    return packed[:, :-1].mean(axis=1)


def generator_outputs(options: VAEOptions, nets: Networks, params: Params,
                      buffers: Params, images: jax.Array, key: jax.Array
                      ) -> dict[str, jax.Array]:
    """The autoencoder's forward pass: latent statistics, the discriminator context and the
    decoded images each loss reads ("recon" and/or "fake"), with the gradient routes of the
    stage built in."""
    compressor = nets.bind("compressor", params, buffers)
    encoded = compressor.encode(nets.inputs(images), key=key)
    hw = compressor.latent_shape(*images.shape[1:3])
    out = {"mu": nets.outputs(encoded.mu), "logvar": nets.outputs(encoded.logvar),
           "context": nets.outputs(_mean_image_token(encoded.packed))}

    def decode(expander_state, packed):
        expander = nets.bind("expander", {"expander": expander_state[0]},
                             {"expander": expander_state[1]})
        return nets.outputs(expander(packed, use_context=options.train_spade, hw=hw))

    expander_state = (params["expander"], buffers["expander"])
    if options.train_reconstruction and options.use_gan:
        out["recon"], out["fake"] = fork(decode)(expander_state, encoded.packed)
        out["context"] = jax.lax.stop_gradient(out["context"])
    elif options.train_reconstruction:
        out["recon"] = decode(expander_state, encoded.packed)
    elif options.use_gan:
        out["fake"] = decode(expander_state, encoded.packed)
    return out


def generator_terms(options: VAEOptions, outputs: dict[str, jax.Array], images: jax.Array,
                    discriminator: Callable | None, lpips: LPIPS | None,
                    compute_dtype: Any = None) -> dict[str, jax.Array]:
    """The unweighted generator losses: "recon" (frequency-aware L1 + mse_weight * MSE +
    lambda_lpips * LPIPS), "kl", "gan" (lambda_adv * hinge), and the raw "l1" (frequency
    aware), "mse" and "lpips" parts for monitoring."""
    zero = jnp.zeros([], jnp.float32)
    terms = {"recon": zero, "gan": zero, "l1": zero, "mse": zero, "lpips": zero,
             "kl": losses.kl_divergence(outputs["mu"], outputs["logvar"],
                                        options.kl_free_bits, options.kl_reduction)}
    if options.train_reconstruction:
        recon = outputs["recon"]
        terms["l1"] = losses.frequency_l1(recon, images, options.frequency_alpha)
        terms["mse"] = jnp.mean((recon - images) ** 2)
        if options.use_lpips:
            terms["lpips"] = jnp.mean(lpips(recon, images, compute_dtype=compute_dtype))
        terms["recon"] = (terms["l1"] + options.mse_weight * terms["mse"]
                          + options.lambda_lpips * terms["lpips"])
    if options.use_gan:
        terms["gan"] = losses.generator_loss(
            discriminator(outputs["fake"], outputs["context"]), options.lambda_adv)
    return terms


def vae_gan_update(options: VAEOptions, nets: Networks, groups: Mapping[str, OptimizerGroup],
                   state: TrainState, images: jax.Array, key: jax.Array,
                   lpips: LPIPS | None) -> Update:
    """One D and one VAE update of ``state``. The generator's GAN term reads the updated
    discriminator, so that update is made here; the commit keeps it."""
    batch_number = state.step + 1  # the reference's global step (1 for the first batch)
    k_latent, k_real, k_fake = jax.random.split(key, 3)
    vae, disc = groups.get("vae"), groups.get("discriminator")

    def forward(trainable):
        params = vae.with_trainable(state.params, trainable) if vae else state.params
        return generator_outputs(options, nets, params, state.buffers, images, k_latent)

    outputs, pullback = jax.vjp(forward, vae.trainable(state.params) if vae else {})
    params, opt_states, buffers = state.params, dict(state.opt_states), state.buffers
    metrics = {name: jnp.zeros([], jnp.float32) for name in VAE_METRICS}
    finite = jnp.array(True)
    discriminator = None
    if options.use_gan:
        if disc is not None:
            d_metrics, params, opt_states, buffers = _discriminator_update(
                options, nets, disc, state, outputs, images, batch_number, k_real, k_fake)
            finite &= jnp.isfinite(d_metrics["loss_disc"]) & jnp.isfinite(
                d_metrics["grad_norm_disc"])
            metrics.update(d_metrics)
        discriminator = _logits(nets, params, buffers)

    active = jnp.array([options.train_reconstruction, True, options.use_gan])
    beta = losses.kl_beta(batch_number, options.kl_beta, options.kl_warmup_steps)

    def objective(outputs):
        terms = generator_terms(options, outputs, images, discriminator, lpips,
                                nets.compute_dtype)
        values = jnp.stack([terms[name] for name in BALANCED_LOSSES])
        history = push(state.loss_history, jax.lax.stop_gradient(values), active)
        weights = (adaptive_weights(history, active) if options.adaptive_weights
                   else active.astype(jnp.float32))
        total = jnp.sum(weights * values * jnp.array([1.0, beta, 1.0]))
        return total, (terms, weights, history)

    (total, (terms, weights, history)), cotangents = jax.value_and_grad(
        objective, has_aux=True)(outputs)
    finite &= jnp.isfinite(total)
    metrics.update(loss_recon=terms["recon"], loss_l1=terms["l1"], loss_mse=terms["mse"],
                   loss_kl=terms["kl"], kl_beta=beta,
                   loss_lpips=terms["lpips"], loss_gen=terms["gan"], weight_recon=weights[0],
                   weight_kl=weights[1], weight_gan=weights[2])
    if vae is not None:
        (grads,) = pullback(cotangents)
        grad_norm = global_norm(grads)
        finite &= jnp.isfinite(grad_norm)
        metrics.update(grad_norm_vae=grad_norm, lr_vae=vae.learning_rate(opt_states["vae"]))
        plateau_metric = terms["recon"] if options.train_reconstruction else total

    def commit() -> TrainState:
        new_params, new_opt_states, ema = params, dict(opt_states), state.ema
        if vae is not None:
            new_params, new_opt_states["vae"] = vae.apply(grads, opt_states["vae"], params,
                                                          plateau_metric, grad_norm)
            ema = vae.update_ema(ema, new_params)
        return state.replace(params=new_params, buffers=buffers, opt_states=new_opt_states,
                             ema=ema, loss_history=history)

    return Update(metrics, finite, commit)


def _discriminator_update(options: VAEOptions, nets: Networks, disc: OptimizerGroup,
                          state: TrainState, outputs: dict[str, jax.Array],
                          images: jax.Array, batch_number: jax.Array, k_real: jax.Array,
                          k_fake: jax.Array):
    """Hinge loss on noisy real and fake images, R1 on the real ones every r1_interval
    batches; returns (metrics, params, opt_states, buffers)."""
    sigma = losses.instance_noise_std(batch_number, options.instance_noise_std,
                                      options.instance_noise_decay)
    real = images + sigma * jax.random.normal(k_real, images.shape, images.dtype)
    fake = jax.lax.stop_gradient(outputs["fake"])
    fake = fake + sigma * jax.random.normal(k_fake, fake.shape, fake.dtype)
    context = jax.lax.stop_gradient(outputs["context"])

    # Two power-iteration steps on the current weights: the real and the fake call's.
    after_real = _power_iterated(nets, state.params, state.buffers)
    after_fake = _power_iterated(nets, state.params, after_real)
    with_r1 = batch_number % options.r1_interval == 0

    def objective(trainable):
        params = disc.with_trainable(state.params, trainable)
        logits = lambda buffers: lambda x: _logits(nets, params, buffers)(x, context)
        # Only the penalty sits in the cond (its forward pass repeated, 1 step in
        # r1_interval): XLA:CPU compiles convolutions inside conditional branches to a
        # generic loop, which made the every-step real-image backward pass a third of the step.
        r1 = jax.lax.cond(with_r1, lambda: losses.r1_penalty(logits(after_real), real),
                          lambda: jnp.zeros([], real.dtype))
        hinge = losses.hinge_discriminator_loss(logits(after_real)(real),
                                                logits(after_fake)(fake))
        return hinge + 0.5 * options.r1_gamma * r1, r1

    (loss, r1), grads = jax.value_and_grad(objective, has_aux=True)(disc.trainable(state.params))
    opt_states = dict(state.opt_states)
    grad_norm = global_norm(grads)
    metrics = {"loss_disc": loss, "r1_penalty": r1, "grad_norm_disc": grad_norm,
               "lr_disc": disc.learning_rate(opt_states["discriminator"])}
    params, opt_states["discriminator"] = disc.apply(grads, opt_states["discriminator"],
                                                     state.params, loss, grad_norm)
    return metrics, params, opt_states, after_fake


def _logits(nets: Networks, params: Params, buffers: Params
            ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The discriminator as ``(images, context) -> float32 logits``, in the compute dtype."""
    discriminator = nets.bind("discriminator", params, buffers)
    return lambda images, context: nets.outputs(discriminator(nets.inputs(images),
                                                              nets.inputs(context)))


def _power_iterated(nets: Networks, params: Params, buffers: Params) -> Params:
    """``buffers`` with the discriminator's spectral-norm vectors one step further."""
    module = nets.bind("discriminator", params, buffers, compute=False)
    module.power_iteration()
    return {**buffers, "discriminator": nnx.state(module, nnx.Not(nnx.Param))}
