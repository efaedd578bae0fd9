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
from fluxflow_jax.settings import field_checks, setting
from fluxflow_jax.training import image_statistics, losses
from fluxflow_jax.training.accumulation import MicroBatches
from fluxflow_jax.training.balancing import adaptive_weights, push
from fluxflow_jax.training.groups import OptimizerGroup, Params, global_norm
from fluxflow_jax.training.lpips import LPIPS
from fluxflow_jax.training.modes import part_metrics
from fluxflow_jax.training.routing import fork
from fluxflow_jax.training.state import BALANCED_LOSSES, Networks, TrainState, Update


_NON_NEGATIVE = in_interval("[0, inf)", 0.1)


def _statistic(name: str, meaning: str) -> Any:
    """The switch of one image-statistics term, its help naming the term's fixed weight."""
    return setting(False, check_bool, f"add {image_statistics.WEIGHTS[name]} · {meaning}")


@dataclass(frozen=True)
class VAEOptions:
    """What the VAE-GAN stage trains and how (defaults: the seed's). The mode fields come
    from a step's mode keys; the others are its loss keys."""

    train_reconstruction: bool = True  # False: GAN-only, no pixel or perceptual loss
    use_gan: bool = True
    train_spade: bool = True  # decoder SPADE conditioning on the latent
    use_lpips: bool = True
    lambda_lpips: float = setting(0.1, _NON_NEGATIVE, "weight of LPIPS in the reconstruction "
                                  "loss", flag=True)
    mse_weight: float = setting(0.1, _NON_NEGATIVE, "weight of MSE in the reconstruction loss "
                                "(L1 + `mse_weight`·MSE + `lambda_lpips`·LPIPS)")
    frequency_alpha: float = setting(1.0, _NON_NEGATIVE, "weight of the high-frequency part "
                                     "of the frequency-aware L1")
    kl_beta: float = setting(1e-4, _NON_NEGATIVE, "final KL weight β", flag=True)
    kl_warmup_steps: int = setting(5000, integer_at_least(0), "cosine β warm-up, in updates "
                                   "counted over the whole run", flag=True)
    kl_free_bits: float = setting(0.0, _NON_NEGATIVE, "per-element KL floor", flag=True)
    kl_reduction: Literal["sum", "mean"] = setting(
        "sum", one_of(("sum", "mean")), "`sum` (per sample, as the reference; grows with "
        "resolution) or `mean`")
    lambda_adv: float = setting(0.1, _NON_NEGATIVE, "adversarial generator loss weight",
                                flag=True)
    r1_interval: int = setting(16, integer_at_least(1), "R1 penalty on real images every this "
                               "many updates (run-wide count)")
    r1_gamma: float = setting(5.0, _NON_NEGATIVE,
                              "R1 weight (the discriminator adds `r1_gamma`/2 · R1)")
    instance_noise_std: float = setting(0.01, _NON_NEGATIVE, "σ of the noise added to the "
                                        "discriminator's real and fake inputs")
    instance_noise_decay: float = setting(0.9999, in_interval("(0, 1]", 0.9999), "σ decays "
                                          "as `instance_noise_std`·decay^update")
    adaptive_weights: bool = setting(True, check_bool, "weight reconstruction, KL and GAN "
                                     "losses by inverse recent magnitude (clamped to [0, 5])")
    ema_decay: float | None = setting(0.999, optional(in_interval("(0, 1]", 0.999)),
                                      "EMA of compressor and expander; null: none")
    train_kl: bool = setting(True, check_bool, "train the KL term; false: no KL loss "
                             "(`loss_kl` and `kl_beta` are then not reported)")
    # The 0.8.1 trainer's image-statistics terms (image_statistics.py), added with its fixed
    # weights when the reconstruction trains. Off by default, as in the seed's trainer (0.8.1
    # turns them on).
    train_colorstats: bool = _statistic(
        "colorstats", "colour statistics: mean over R, G, B of (mean difference)² + (std "
        "difference)² between reconstruction and input ([Image-statistics "
        "terms](#image-statistics-terms))")
    train_histogram: bool = _statistic(
        "histogram", "histogram matching: per channel, the mean \\|CDF difference\\| of "
        "64-bin value histograms on [-1, 1]")
    train_contrast: bool = _statistic(
        "contrast", "contrast: [Σ over R, G, B of (std ratio − 1)² + MSE of the per-image "
        "stds] / 4")
    train_coarseness: bool = _statistic(
        "coarseness", "coarseness: per channel, the mean \\|CDF difference\\| of the "
        "variances of 16×16 tiles (Gaussian-smoothed into 32 bins on [0, 1])")
    soft_histogram: bool = setting(
        True, check_bool, "the histogram term's counts share each value between its two "
        "nearest bins, so the term has a gradient; false: 0.8.1's hard counts, which have none "
        "(the term is then reported and trains nothing)")
    spade_training_mode: Literal["full", "alternate"] = setting(
        "full", one_of(("full", "alternate")), "with `train_spade`: `full` decodes every batch "
        "with SPADE; `alternate` only the even batches (2, 4, ... counted over the run), the "
        "others without (0.8.1 also gives its discriminator no context on SPADE batches; here "
        "it always gets the latent's, as in the seed's trainer)")

    def problems(self) -> list[str]:
        """Every invalid field, each phrased with its fix."""
        return field_problems(self, _VAE_CHECKS)

    @property
    def regularisers(self) -> tuple[str, ...]:
        """The image-statistics terms the stage adds (they compare the reconstruction)."""
        if not self.train_reconstruction:
            return ()
        return tuple(name for name in image_statistics.WEIGHTS
                     if getattr(self, f"train_{name}"))


_MODE_FIELDS = ("train_reconstruction", "use_gan", "train_spade", "use_lpips")
_VAE_CHECKS = {**{name: check_bool for name in _MODE_FIELDS}, **field_checks(VAEOptions)}


def unused_expander_leaf(options: VAEOptions) -> Callable[[tuple], bool]:
    """Expander parameters the stage's forward never reads, which must not be decayed:
    the v030 context mixer always, SPADE's convolutions when conditioning is off."""
    def unused(path: tuple) -> bool:
        return path[0] == "context_mixer" or (not options.train_spade and "spade" in path)
    return unused


def _mean_image_token(packed: jax.Array) -> jax.Array:
    """The discriminator's context: the mean of the latent's image tokens (hw token out)."""
    return packed[:, :-1].mean(axis=1)


def _spade_switch(options: VAEOptions, batch_number: jax.Array) -> jax.Array | None:
    """Whether SPADE conditions this batch's decoding, as 1.0 / 0.0, when it changes from
    batch to batch (``spade_training_mode: alternate``: the even batches, counted from 1
    over the run as the reference counts them); None when it does not."""
    if options.train_spade and options.spade_training_mode == "alternate":
        return (batch_number % 2 == 0).astype(jnp.float32)
    return None


def generator_outputs(options: VAEOptions, nets: Networks, params: Params,
                      buffers: Params, images: jax.Array, key: jax.Array | None = None, *,
                      noise: jax.Array | None = None, batch_number: jax.Array | None = None
                      ) -> dict[str, jax.Array]:
    """The autoencoder's forward pass: latent statistics, the discriminator context and the
    decoded images each loss reads ("recon" and/or "fake"), with the gradient routes of the
    stage built in. The latent is sampled with ``noise``, or noise drawn from ``key``;
    ``batch_number`` picks the decoding's SPADE use in ``spade_training_mode: alternate``."""
    compressor = nets.bind("compressor", params, buffers)
    encoded = compressor.encode(nets.inputs(images), key=key, noise=noise)
    hw = compressor.latent_shape(*images.shape[1:3])
    out = {"mu": nets.outputs(encoded.mu), "logvar": nets.outputs(encoded.logvar),
           "context": nets.outputs(_mean_image_token(encoded.packed))}

    def decode(expander_state, packed):
        expander_params, expander_buffers, spade = expander_state

        def run(use_context):
            def call(packed):
                expander = nets.bind("expander", {"expander": expander_params},
                                     {"expander": expander_buffers})
                return nets.outputs(expander(packed, use_context=use_context, hw=hw))
            return call

        if spade is None:
            return run(options.train_spade)(packed)
        return jax.lax.cond(spade > 0.5, run(True), run(False), packed)

    spade = None if batch_number is None else _spade_switch(options, batch_number)
    expander_state = (params["expander"], buffers["expander"], spade)
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
    lambda_lpips * LPIPS), "kl" (0 without ``train_kl``), "gan" (lambda_adv * hinge; left at
    0 without a ``discriminator``), the raw "l1" (frequency aware), "mse" and "lpips" parts
    for monitoring, and each of ``options.regularisers``."""
    zero = jnp.zeros([], jnp.float32)
    terms = {"recon": zero, "gan": zero, "l1": zero, "mse": zero, "lpips": zero, "kl": zero}
    if options.train_kl:
        terms["kl"] = losses.kl_divergence(outputs["mu"], outputs["logvar"],
                                           options.kl_free_bits, options.kl_reduction)
    if options.train_reconstruction:
        recon = outputs["recon"]
        terms["l1"] = losses.frequency_l1(recon, images, options.frequency_alpha)
        terms["mse"] = jnp.mean((recon - images) ** 2)
        if options.use_lpips:
            terms["lpips"] = jnp.mean(lpips(recon, images, compute_dtype=compute_dtype))
        terms["recon"] = (terms["l1"] + options.mse_weight * terms["mse"]
                          + options.lambda_lpips * terms["lpips"])
        terms.update(image_statistics_terms(options, recon, images))
    if options.use_gan and discriminator is not None:
        terms["gan"] = losses.generator_loss(
            discriminator(outputs["fake"], outputs["context"]), options.lambda_adv)
    return terms


def image_statistics_terms(options: VAEOptions, recon: jax.Array, images: jax.Array
                           ) -> dict[str, jax.Array]:
    """The unweighted image-statistics terms ``options.regularisers`` names."""
    terms = {
        "colorstats": lambda: image_statistics.colour_statistics(recon, images),
        "histogram": lambda: image_statistics.histogram_matching(
            recon, images, soft=options.soft_histogram),
        "contrast": lambda: image_statistics.contrast(recon, images),
        "coarseness": lambda: image_statistics.coarseness(recon, images)}
    return {name: terms[name]() for name in options.regularisers}


def vae_gan_update(options: VAEOptions, nets: Networks, groups: Mapping[str, OptimizerGroup],
                   state: TrainState, images: jax.Array, key: jax.Array,
                   lpips: LPIPS | None, micro: MicroBatches = MicroBatches()) -> Update:
    """One D and one VAE update of ``state`` from the batch's ``micro``-batches. The
    generator's GAN term reads the updated discriminator, so that update is made here; the
    commit keeps it.

    The discriminator's gradient needs every micro-batch's fakes, and the adaptive loss
    weights every micro-batch's loss values, before the generator's gradient can be taken:
    with several micro-batches, a first pass runs the generator forward (fakes, loss values,
    the discriminator's gradient) and a second pass runs it again with its backward pass.
    One micro-batch keeps its forward pass for the backward pass instead.
    """
    batch_number = state.step + 1  # the reference's global step (1 for the first batch)
    k_latent, k_real, k_fake = jax.random.split(key, 3)
    vae, disc = groups.get("vae"), groups.get("discriminator")
    trains_disc = options.use_gan and disc is not None
    trainable = vae.trainable(state.params) if vae else {}

    def forward(trainable, part):
        params = vae.with_trainable(state.params, trainable) if vae else state.params
        return generator_outputs(options, nets, params, state.buffers, part["images"],
                                 noise=part["latent_noise"], batch_number=batch_number)

    shapes = jax.eval_shape(lambda: generator_outputs(options, nets, state.params,
                                                      state.buffers, images, k_latent,
                                                      batch_number=batch_number))
    draws = {"images": images,  # for the effective batch, as one batch of its size draws them
             "latent_noise": jax.random.normal(k_latent, shapes["mu"].shape, jnp.promote_types(
                 shapes["mu"].dtype, jnp.float32))}
    if trains_disc:
        draws["real_noise"] = jax.random.normal(k_real, images.shape, images.dtype)
        draws["fake_noise"] = jax.random.normal(k_fake, shapes["fake"].shape,
                                                shapes["fake"].dtype)
    parts = micro.split(draws)
    one = micro.count == 1
    if one:
        part = jax.tree.map(lambda x: x[0], parts)
        outputs, pullback = jax.vjp(lambda t: forward(t, part), trainable)
    if trains_disc:  # two power-iteration steps on the current weights: the real and
        # the fake call's
        after_real = _power_iterated(nets, state.params, state.buffers)
        after_fake = _power_iterated(nets, state.params, after_real)
        d_gradient = _discriminator_gradient(options, nets, disc, state, batch_number,
                                             after_real, after_fake)
    if one:
        first = d_gradient(outputs, part) if trains_disc else {}
    else:
        def first_pass(part):
            outputs = forward(trainable, part)
            averaged = {"terms": generator_terms(options, outputs, part["images"], None,
                                                 lpips, nets.compute_dtype)}
            if trains_disc:
                averaged.update(d_gradient(outputs, part))
            fakes = {k: outputs[k] for k in ("fake", "context")} if options.use_gan else {}
            return averaged, fakes

        first, fakes = micro.run(first_pass, parts)
    params, opt_states, buffers = state.params, dict(state.opt_states), state.buffers
    metrics = {name: jnp.zeros([], jnp.float32) for name in part_metrics("vae", options)}
    finite = jnp.array(True)
    discriminator = None
    if options.use_gan:
        if trains_disc:
            d_grads = first.pop("grads")
            grad_norm_disc = global_norm(d_grads)
            metrics.update(loss_disc=first["loss_disc"], r1_penalty=first["r1_penalty"],
                           grad_norm_disc=grad_norm_disc,
                           lr_disc=disc.learning_rate(opt_states["discriminator"]))
            finite &= jnp.isfinite(first["loss_disc"]) & jnp.isfinite(grad_norm_disc)
            params, opt_states["discriminator"] = disc.apply(
                d_grads, opt_states["discriminator"], state.params, first["loss_disc"],
                grad_norm_disc)
            buffers = after_fake
        discriminator = _logits(nets, params, buffers)

    # The balanced losses, weighted adaptively, then the image-statistics terms, weighted
    # by the reference's fixed weights.
    weighted = BALANCED_LOSSES + options.regularisers
    active = jnp.array([options.train_reconstruction, options.train_kl, options.use_gan])
    beta = losses.kl_beta(batch_number, options.kl_beta, options.kl_warmup_steps)
    scale = jnp.array([1.0, beta, 1.0])
    fixed = jnp.array([image_statistics.WEIGHTS[name] for name in options.regularisers],
                      jnp.float32)

    def balanced(outputs, part):
        terms = generator_terms(options, outputs, part["images"], discriminator, lpips,
                                nets.compute_dtype)
        return jnp.stack([terms[name] for name in weighted]), terms

    def weighting(values):
        """(the loss history, every term's coefficient in the total)."""
        history = push(state.loss_history, values[:len(BALANCED_LOSSES)], active)
        weights = (adaptive_weights(history, active) if options.adaptive_weights
                   else active.astype(jnp.float32))
        return history, weights, jnp.concatenate([weights * scale, fixed])

    if one:
        values, balanced_pullback, terms = jax.vjp(lambda o: balanced(o, part), outputs,
                                                   has_aux=True)
        history, weights, coefficients = weighting(values)
        if vae is not None:
            (grads,) = pullback(*balanced_pullback(coefficients))
    else:
        terms = first["terms"]
        if options.use_gan:
            gan = lambda f: (losses.generator_loss(discriminator(f["fake"], f["context"]),
                                                   options.lambda_adv), {})
            terms = {**terms, "gan": micro.run(gan, fakes)[0]}
        values = jnp.stack([terms[name] for name in weighted])
        history, weights, coefficients = weighting(values)

        def second_pass(part):
            outputs, pullback = jax.vjp(lambda t: forward(t, part), trainable)
            _, balanced_pullback, _ = jax.vjp(lambda o: balanced(o, part), outputs,
                                              has_aux=True)
            return pullback(*balanced_pullback(coefficients))[0], {}

        if vae is not None:
            grads = micro.run(second_pass, parts)[0]
    total = jnp.sum(coefficients * values)
    finite &= jnp.isfinite(total)
    metrics.update(loss_recon=terms["recon"], loss_l1=terms["l1"], loss_mse=terms["mse"],
                   loss_lpips=terms["lpips"], loss_gen=terms["gan"], weight_recon=weights[0],
                   weight_kl=weights[1], weight_gan=weights[2],
                   **{f"loss_{name}": terms[name] for name in options.regularisers})
    if options.train_kl:
        metrics.update(loss_kl=terms["kl"], kl_beta=beta)
    if vae is not None:
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


def _discriminator_gradient(options: VAEOptions, nets: Networks, disc: OptimizerGroup,
                            state: TrainState, batch_number: jax.Array,
                            after_real: Params, after_fake: Params
                            ) -> Callable[[dict, dict], dict[str, jax.Array]]:
    """``(outputs, part) -> {grads, loss_disc, r1_penalty}`` of one micro-batch: hinge loss
    on noisy real and fake images, R1 on the real ones every r1_interval batches (updates,
    whatever the micro-batches), the real and fake calls on the spectral-norm vectors
    ``after_real`` and ``after_fake``."""
    sigma = losses.instance_noise_std(batch_number, options.instance_noise_std,
                                      options.instance_noise_decay)
    with_r1 = batch_number % options.r1_interval == 0

    def gradient(outputs, part):
        real = part["images"] + sigma * part["real_noise"]
        fake = jax.lax.stop_gradient(outputs["fake"]) + sigma * part["fake_noise"]
        context = jax.lax.stop_gradient(outputs["context"])

        def objective(trainable):
            params = disc.with_trainable(state.params, trainable)
            logits = lambda buffers: lambda x: _logits(nets, params, buffers)(x, context)
            # Only the penalty sits in the cond (its forward pass repeated, 1 step in
            # r1_interval): XLA:CPU compiles convolutions inside conditional branches to a
            # generic loop, which made the every-step real-image backward pass a third of
            # the step.
            r1 = jax.lax.cond(with_r1, lambda: losses.r1_penalty(logits(after_real), real),
                              lambda: jnp.zeros([], real.dtype))
            hinge = losses.hinge_discriminator_loss(logits(after_real)(real),
                                                    logits(after_fake)(fake))
            return hinge + 0.5 * options.r1_gamma * r1, r1

        (loss, r1), grads = jax.value_and_grad(objective, has_aux=True)(
            disc.trainable(state.params))
        return {"grads": grads, "loss_disc": loss, "r1_penalty": r1}

    return gradient


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
