"""The flow update: v-prediction on the frozen compressor's latent tokens, text-conditioned.

Latents are sampled (not the mean) from the compressor, hw token included; the timestep is
drawn from the cos^2 weights over the timestep window, the token noised on the VP schedule
with the model's ``flow_noise`` (``models/flow_noise.py``), and the flow processor (given
t's place in the window as a float, t/999 by default) predicts v = alpha * eps - sigma * x0
for the image tokens. The text encoder trains with it (dropout on) unless frozen, in which
case it runs in eval mode and is not differentiated; with only its language model frozen,
it runs in eval mode too (the head it trains has no dropout).
The images may come as their cached posterior instead (``POSTERIOR_KEYS``): the tokens are
then sampled from it, as the compressor samples them. The captions may come as their frozen
language model's cached features (``TEXT_FEATURES``): only the text encoder's head runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.checks import field_problems, in_interval, integer_at_least, one_of, optional
from fluxflow_jax.models import flow_noise
from fluxflow_jax.models.compressor import Posterior
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.settings import field_checks, setting
from fluxflow_jax.training import diffusion, losses
from fluxflow_jax.training.accumulation import MicroBatches, pooled_std
from fluxflow_jax.training.groups import OptimizerGroup, global_norm
from fluxflow_jax.training.modes import MODES, part_metrics
from fluxflow_jax.training.state import Networks, TrainState, Update

# Batch entries that stand for the images: their cached posterior (``latent_cache``).
POSTERIOR_KEYS = ("latent_mu", "latent_logvar", "latent_grid")
# The batch entry that stands for the captions: their language model features (``text_cache``).
TEXT_FEATURES = "text_features"
TEXT_KEYS = ("input_ids", "attention_mask")


def text_inputs(batch: Mapping[str, Any]) -> tuple[str, ...]:
    """The batch entries that carry the captions: their cached features, else the tokens."""
    return (TEXT_FEATURES,) if TEXT_FEATURES in batch else TEXT_KEYS


@dataclass(frozen=True)
class FlowOptions:
    """What the flow stage adds to the v-prediction loss (defaults: the seed's)."""

    lambda_align: float = setting(
        0.0, in_interval("[0, inf)", 0.1), "text-image alignment term; active only when "
        "`vae_dim == text_embed_dim` (else a warning and off)")
    cfg_dropout_prob: float = setting(
        0.0, in_interval("[0, 1)", 0.1), "share of samples trained with a zero text embedding "
        "(for classifier-free guidance); 0.8.1 always scales it by the timestep: "
        "`cfg_dropout_schedule: timestep` does the same")
    cfg_dropout_schedule: str = setting(
        "fixed", one_of(("fixed", "timestep")), "`fixed`: each sample drops its text with "
        "chance `cfg_dropout_prob`; `timestep`: 0.8.1's scaling, chance "
        "`cfg_dropout_prob`·(0.5 + 0.5·t/`num_train_timesteps`) clipped to [0, min(0.5, "
        "2·`cfg_dropout_prob`)], more at the noisier timesteps. 0.8.1 drops every sample of a "
        "batch with these chances' batch mean, which loses the tie to each sample's timestep; "
        "here each sample uses its own (the same share dropped on average)")
    ema_decay: float | None = setting(
        0.9999, optional(in_interval("(0, 1]", 0.9999)), "EMA of the flow processor and text "
        "encoder (of the leaves the step trains: with a frozen language model, the text "
        "encoder's head; `FlowOptions.ema_decay`); null: none", key="flow_ema_decay")
    timestep_sampling: str = setting(
        "cosine", one_of(diffusion.TIMESTEP_SAMPLING), "how training draws t: `cosine` (cos² "
        "weights, mostly low noise; the reference's) or `uniform`")
    flow_loss: str = setting(
        "mse", one_of(("mse", "smooth_l1")), "`mse` of the v-prediction, or `smooth_l1`, the "
        "0.8.1 PyTorch trainer's (0.8.1 has no key for it: it always uses it): smooth-L1 (β "
        "0.01) of prediction and target divided by the clean latent's std (v060, v030), or for "
        "v070 and v080 the latent and the context channels each divided by their own "
        "v-target's std, the two losses added")
    num_train_timesteps: int = setting(
        diffusion.NUM_TIMESTEPS, integer_at_least(2), "N, the noise schedule's length (linear "
        "betas 1e-4..0.02 over N steps)")
    start_step: int = setting(
        0, integer_at_least(0), "timesteps are drawn from [`start_step`, N − 1] (cos² weights "
        "or uniformly over that window), and the flow is given (t − `start_step`) / max(1, N "
        "− 1 − `start_step`) as its time, as 0.8.1 does. Generation (`generate`, samples, "
        "evaluation) always runs the full 1000-step schedule")

    def problems(self) -> list[str]:
        problems = field_problems(self, field_checks(FlowOptions))
        if not problems and self.start_step >= self.num_train_timesteps:
            problems.append(f"'start_step' ({self.start_step}) must be below "
                            f"'num_train_timesteps' ({self.num_train_timesteps}): timesteps "
                            f"are drawn from [start_step, num_train_timesteps - 1]")
        return problems

    def alignment_active(self, config: FluxFlowConfig) -> bool:
        """Whether the alignment term can run: it compares the mean predicted latent token
        (latent_width wide: vae_dim plus the version's context channels) with the text
        embedding (text_embed_dim wide). Warns once, at stage construction, when it is
        requested but cannot."""
        if self.lambda_align <= 0:
            return False
        if config.latent_width != config.text_embed_dim:
            warnings.warn(
                f"lambda_align={self.lambda_align} is ignored: the alignment loss compares "
                f"latent tokens ({config.latent_width} wide) with text embeddings "
                f"(text_embed_dim={config.text_embed_dim}), which need equal widths",
                stacklevel=3)
            return False
        return True


def cfg_dropout_probability(options: FlowOptions, t: jax.Array) -> jax.Array:
    """Each sample's chance [B] of training with a zero text embedding, for timesteps t [B].

    "timestep": p (0.5 + 0.5 t / N), clipped to [0, min(0.5, 2p)]: more unconditional
    training where the latent is noisier. The 0.8.1 trainer computes these and then drops
    every sample of the batch with their mean, which keeps the share but loses the tie to
    each sample's own timestep that the scaling is for; here each sample keeps its own.
    """
    p = options.cfg_dropout_prob
    if options.cfg_dropout_schedule == "fixed":
        return jnp.full(t.shape, p, jnp.float32)
    scaled = p * (0.5 + 0.5 * t.astype(jnp.float32) / options.num_train_timesteps)
    return jnp.clip(scaled, 0.0, min(0.5, 2.0 * p))


def flow_update(options: FlowOptions, nets: Networks, groups: Mapping[str, OptimizerGroup],
                state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array,
                use_alignment: bool, micro: MicroBatches = MicroBatches()) -> Update:
    """One flow (and text encoder) update of ``state`` from the batch's ``micro``-batches."""
    k_latent, k_time, k_noise, k_dropout, k_cfg = jax.random.split(key, 5)
    trained = {name: groups[name] for name in MODES["flow"].groups if name in groups}
    cached = POSTERIOR_KEYS[0] in batch
    source = {k: batch[k] for k in (POSTERIOR_KEYS if cached else ("images",))}
    text = {k: batch[k] for k in text_inputs(batch)}

    def posterior(module, part) -> Posterior:
        """The images' latent distribution: given (a cache's), or from the compressor."""
        if cached:
            return Posterior(*(nets.inputs(part[k]) for k in POSTERIOR_KEYS))
        return module.posterior(nets.inputs(part["images"]))

    def compressor():
        # Bound inside each trace that runs it (eval_shape, the micro-batch scan): an nnx
        # transform (its remat) must not touch a module bound in an outer trace.
        return nets.bind("compressor", state.params, state.buffers)

    def sampled(part):
        module = compressor()
        return module.sample(posterior(module, part), key=k_latent)

    rows = source[next(iter(source))].shape[0]
    window = {"num_timesteps": options.num_train_timesteps, "start_step": options.start_step}
    t = diffusion.sample_timesteps(k_time, rows, options.timestep_sampling, **window)
    latent = jax.eval_shape(sampled, source)
    hw = latent.mu.shape[1:3]
    x0_shape = jax.eval_shape(nets.outputs, latent.packed)
    noise_draws = flow_noise.draw(compressor().config, k_noise, rows, hw, x0_shape.dtype)
    draws = {  # for the effective batch, as one batch of its size draws them
        **source, **text, **noise_draws,
        "latent_noise": jax.random.normal(
            k_latent, latent.mu.shape, jnp.promote_types(latent.mu.dtype, jnp.float32)),
        "t": t,
        "keep_text": jax.random.bernoulli(
            k_cfg, 1.0 - cfg_dropout_probability(options, t)[:, None], (rows, 1)),
        # Dropout masks are drawn per micro-batch: the same distribution, other draws.
        "dropout_key": (k_dropout[None] if micro.count == 1
                        else jax.random.split(k_dropout, micro.count)),
    }
    parts = {**micro.split({k: v for k, v in draws.items() if k != "dropout_key"}),
             "dropout_key": draws["dropout_key"]}
    trainable = {name: group.trainable(state.params) for name, group in trained.items()}

    def micro_batch(part):
        module = compressor()
        packed = nets.outputs(jax.lax.stop_gradient(module.sample(
            posterior(module, part), noise=part["latent_noise"]).packed))
        x0, hw_token = packed[:, :-1], packed[:, -1:]
        context_dims = module.config.architecture.context_dims
        t = part["t"]
        noise = nets.outputs(flow_noise.tokens({k: part[k] for k in noise_draws}, module,
                                               nets.inputs))
        schedule = options.num_train_timesteps
        noisy = jnp.concatenate([diffusion.add_noise(x0, noise, t, schedule), hw_token], axis=1)
        target = diffusion.v_target(x0, noise, t, schedule)

        def objective(trainable):
            params = state.params
            for name, group in trained.items():
                params = group.with_trainable(params, trainable[name])
            encoder = nets.bind("text_encoder", params, state.buffers)
            if TEXT_FEATURES in part:
                encoded = encoder.project(nets.inputs(part[TEXT_FEATURES]))
            else:
                rngs = (nnx.Rngs(dropout=part["dropout_key"]) if "text_encoder" in trained
                        else None)
                encoded = encoder(part["input_ids"], part["attention_mask"], rngs=rngs)
            embeddings = jnp.where(part["keep_text"], nets.outputs(encoded), 0.0)
            processor = nets.bind("flow_processor", params, state.buffers)
            prediction = nets.outputs(processor(nets.inputs(noisy), nets.inputs(embeddings),
                                                diffusion.model_time(t, **window),
                                                hw=hw)[:, :-1])
            diff = losses.v_prediction_loss(prediction, target, x0, options.flow_loss,
                                            context_dims)
            align = (losses.alignment_loss(prediction, embeddings) if use_alignment
                     else jnp.zeros([], diff.dtype))
            return diff + options.lambda_align * align, (diff, align, prediction)

        (total, (diff, align, prediction)), grads = jax.value_and_grad(
            objective, has_aux=True)(trainable)
        mean = jnp.mean(prediction)
        averaged = {"grads": grads, "flow_loss": total, "diff_loss": diff,
                    "align_loss": align, "pred_mean": mean}
        return averaged, {"mean": mean, "deviations": jnp.sum((prediction - mean) ** 2)}

    averaged, stacked = micro.run(micro_batch, parts)
    prediction_size = rows * (x0_shape.shape[1] - 1) * x0_shape.shape[2]
    grads, total = averaged.pop("grads"), averaged["flow_loss"]
    metrics = {name: jnp.zeros([], jnp.float32) for name in part_metrics("flow", options)}
    metrics.update(averaged, pred_std=pooled_std(stacked["mean"], stacked["deviations"],
                                                 prediction_size // micro.count))
    finite = jnp.isfinite(total)
    norms = {name: global_norm(grads[name]) for name in trained}
    for name, group in trained.items():
        suffix = "text" if name == "text_encoder" else name
        finite &= jnp.isfinite(norms[name])
        metrics[f"grad_norm_{suffix}"] = norms[name]
        metrics[f"lr_{suffix}"] = group.learning_rate(state.opt_states[name])

    def commit() -> TrainState:
        params, opt_states, ema = state.params, dict(state.opt_states), state.ema
        for name, group in trained.items():
            params, opt_states[name] = group.apply(grads[name], opt_states[name], params,
                                                   total, norms[name])
            ema = group.update_ema(ema, params)
        return state.replace(params=params, opt_states=opt_states, ema=ema)

    return Update(metrics, finite, commit)
