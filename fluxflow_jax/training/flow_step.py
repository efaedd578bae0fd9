"""The flow update: v-prediction on the frozen compressor's latent tokens, text-conditioned.

Latents are sampled (not the mean) from the compressor, hw token included; the timestep is
drawn from the cos^2 weights, the token noised on the VP schedule, and the flow processor
(given t/999 as a float) predicts v = alpha * eps - sigma * x0 for the image tokens. The text
encoder trains with it (dropout on) unless frozen, in which case it runs in eval mode and is
not differentiated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.checks import field_problems, in_interval, optional
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.training import diffusion, losses
from fluxflow_jax.training.groups import OptimizerGroup, global_norm
from fluxflow_jax.training.state import Networks, TrainState, Update

FLOW_METRICS = ("flow_loss", "diff_loss", "align_loss", "grad_norm_flow", "grad_norm_text",
                "lr_flow", "lr_text", "pred_mean", "pred_std")


@dataclass(frozen=True)
class FlowOptions:
    """What the flow stage adds to the v-prediction loss (defaults: the seed's)."""

    lambda_align: float = 0.0
    cfg_dropout_prob: float = 0.0  # share of samples trained with a zero text embedding
    ema_decay: float | None = 0.9999

    def problems(self) -> list[str]:
        return field_problems(self, {
            "lambda_align": in_interval("[0, inf)", 0.1),
            "cfg_dropout_prob": in_interval("[0, 1)", 0.1),
            "ema_decay": optional(in_interval("(0, 1]", 0.9999))})

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


def flow_update(options: FlowOptions, nets: Networks, groups: Mapping[str, OptimizerGroup],
                state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array,
                use_alignment: bool) -> Update:
    """One flow (and text encoder) update of ``state``."""
    k_latent, k_time, k_noise, k_dropout, k_cfg = jax.random.split(key, 5)
    trained = {name: groups[name] for name in ("flow", "text_encoder") if name in groups}
    images = batch["images"]
    compressor = nets.bind("compressor", state.params, state.buffers)
    hw = compressor.latent_shape(*images.shape[1:3])
    packed = nets.outputs(jax.lax.stop_gradient(
        compressor.encode(nets.inputs(images), key=k_latent).packed))
    x0, hw_token = packed[:, :-1], packed[:, -1:]
    t = diffusion.sample_timesteps(k_time, x0.shape[0])
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    noisy = jnp.concatenate([diffusion.add_noise(x0, noise, t), hw_token], axis=1)
    target = diffusion.v_target(x0, noise, t)
    keep_text = jax.random.bernoulli(k_cfg, 1.0 - options.cfg_dropout_prob, (x0.shape[0], 1))

    def embed(params):
        encoder = nets.bind("text_encoder", params, state.buffers)
        rngs = nnx.Rngs(dropout=k_dropout) if "text_encoder" in trained else None
        embeddings = encoder(batch["input_ids"], batch["attention_mask"], rngs=rngs)
        return jnp.where(keep_text, nets.outputs(embeddings), 0.0)

    def objective(trainable):
        params = state.params
        for name, group in trained.items():
            params = group.with_trainable(params, trainable[name])
        embeddings = embed(params)
        processor = nets.bind("flow_processor", params, state.buffers)
        prediction = nets.outputs(processor(nets.inputs(noisy), nets.inputs(embeddings),
                                            diffusion.model_time(t), hw=hw)[:, :-1])
        diff = jnp.mean((prediction - target) ** 2)
        align = (losses.alignment_loss(prediction, embeddings) if use_alignment
                 else jnp.zeros([], diff.dtype))
        return diff + options.lambda_align * align, (diff, align, prediction)

    trainable = {name: group.trainable(state.params) for name, group in trained.items()}
    (total, (diff, align_value, prediction)), grads = jax.value_and_grad(
        objective, has_aux=True)(trainable)
    metrics = {name: jnp.zeros([], jnp.float32) for name in FLOW_METRICS}
    metrics.update(flow_loss=total, diff_loss=diff, align_loss=align_value,
                   pred_mean=jnp.mean(prediction), pred_std=jnp.std(prediction, ddof=1))
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
