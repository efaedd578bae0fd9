"""FluxFlowProcessor: the flow transformer of fluxflow 0.8.1's v030, v060 and v070 (v070's
tokens carry its context channels too, so its projections are that much wider; v080:
pillar_flow).

It predicts, for noisy latent tokens, a v-prediction conditioned on a pooled text embedding
and a timestep. Blocks carry four "pillar" streams that feed a Bezier activation; a
convolutional side branch on the final tokens updates the first ``ctx_tokens`` outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fluxflow_jax.models import layers
from fluxflow_jax.models.bezier import TrainableBezier, bezier_activation
from fluxflow_jax.models.conditioning import ContextAttentionMixer, GatedContextInjection
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.models.geometry import coordinate_channels, resolve_grid


def rotary_inv_freq(head_dim: int) -> np.ndarray:
    half = head_dim // 2
    return (1.0 / (10000 ** (np.arange(half, dtype=np.float32) / np.float32(half)))).astype(
        np.float32)


Rope = tuple[jax.Array, jax.Array]  # (sin, cos) tables [S, head_dim]


def rotary_tables(inv_freq: jax.Array, length: int) -> Rope:
    """(sin, cos) [S, dh]: angles pos * inv_freq, each repeated twice (interleaved)."""
    angles = jnp.arange(length, dtype=inv_freq.dtype)[:, None] * inv_freq[None, :]
    return jnp.repeat(jnp.sin(angles), 2, -1), jnp.repeat(jnp.cos(angles), 2, -1)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x * cos + [-x2, x1] * sin with x1/x2 the two halves of the head axis.

    Half-split rotation with interleaved frequencies: unusual, but it is the reference.
    x is [B, S, heads, dh].
    """
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _rotate(x: jax.Array, rope: Rope | None) -> jax.Array:
    return x if rope is None else apply_rotary(x, *rope)


class ParallelAttention(nnx.Module):
    """Attention with queries from one sequence and keys/values (one fused kv projection)
    from another, each rotated by its own positions (or not at all, where rope is None)."""

    def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj = layers.linear(d_model, d_model, xavier=True, rngs=rngs)
        self.kv_proj = layers.linear(d_model, 2 * d_model, xavier=True, rngs=rngs)
        self.out_proj = layers.linear(d_model, d_model, xavier=True, rngs=rngs)

    def __call__(self, x_q: jax.Array, x_kv: jax.Array, rope_q: Rope | None,
                 rope_k: Rope | None) -> jax.Array:
        k, v = jnp.split(self.kv_proj(x_kv), 2, axis=-1)
        q = _rotate(layers.split_heads(self.q_proj(x_q), self.heads), rope_q)
        k = _rotate(layers.split_heads(k, self.heads), rope_k)
        out = layers.attention(q, k, layers.split_heads(v, self.heads))
        return self.out_proj(out.reshape(x_q.shape))


class Pillar(nnx.Module):
    """``depth`` x (Linear, SiLU), SiLU after the last layer too."""

    def __init__(self, d_model: int, depth: int = 3, *, rngs: nnx.Rngs):
        self.layers = nnx.List([layers.linear(d_model, d_model, xavier=True, rngs=rngs)
                                for _ in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.silu(layer(x))
        return x


class FluxTransformerBlock(nnx.Module):
    def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
        self.self_attn = ParallelAttention(d_model, heads, rngs=rngs)
        self.cross_attn = ParallelAttention(d_model, heads, rngs=rngs)
        self.norm1 = layers.layer_norm(d_model, rngs=rngs)
        self.norm2 = layers.layer_norm(d_model, rngs=rngs)
        self.norm3 = layers.layer_norm(d_model, rngs=rngs)
        self.pillars = nnx.List([Pillar(d_model, rngs=rngs) for _ in range(4)])
        self.ffn = layers.linear(d_model, d_model, xavier=True, rngs=rngs)
        self.inv_freq = layers.Buffer(jnp.asarray(rotary_inv_freq(d_model // heads)))

    def __call__(self, img: jax.Array, txt: jax.Array, rope_img: Rope, rope_txt: Rope,
                 previous_pillars: list[jax.Array | None]
                 ) -> tuple[jax.Array, list[jax.Array]]:
        img = self.attend(img, txt, rope_img, rope_txt)
        gate = jax.nn.sigmoid(img)
        pillars = self.run_pillars([gate] * len(self.pillars), previous_pillars)
        return self.mix(img, pillars), pillars

    def attend(self, img: jax.Array, txt: jax.Array, rope_img: Rope, rope_txt: Rope
               ) -> jax.Array:
        """Self-attention over the image tokens, then cross-attention to the text tokens."""
        normed = self.norm1(img)
        img = img + self.self_attn(normed, normed, rope_img, rope_img)
        return img + self.cross_attn(self.norm2(img), self.norm2(txt), rope_img, rope_txt)

    def run_pillars(self, gates: list[jax.Array], previous_pillars: list[jax.Array | None]
                    ) -> list[jax.Array]:
        """Each pillar on its gate, times the same pillar's output of the previous block."""
        return [pillar(gate if prev is None else gate * prev)
                for pillar, gate, prev in zip(self.pillars, gates, previous_pillars)]

    def mix(self, img: jax.Array, pillars: list[jax.Array]) -> jax.Array:
        """Feed-forward residual, then the Bezier activation over the tokens and pillars."""
        img = img + self.ffn(self.norm3(img))
        return bezier_activation(jnp.concatenate([img, *pillars], axis=-1), "sigmoid", None)


class FluxFlowProcessor(nnx.Module):
    block_type = FluxTransformerBlock

    def __init__(self, config: FluxFlowConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.remat = False  # recompute block activations in backward passes
        df, dv, emb = config.flow_dim, config.latent_width, config.text_embed_dim
        self.vae_to_dmodel = layers.linear(dv, df, rngs=rngs)
        self.dmodel_to_vae = layers.linear(df, dv, rngs=rngs)
        self.ctx_mixer = ContextAttentionMixer(df, max(1, df // 128), rngs=rngs)
        self.text_proj = layers.linear(emb, df, rngs=rngs)
        self.time_embedding = layers.Embedding(config.time_steps, df, rngs=rngs)
        self.time_norm = layers.layer_norm(df, rngs=rngs)
        self.time_activation = TrainableBezier(df)
        self.time_proj = layers.linear(df, emb, rngs=rngs)
        self.context_injection = GatedContextInjection(df, df, rngs=rngs)
        self.transformer_blocks = nnx.List([
            self.block_type(df, config.flow_attn_heads, rngs=rngs)
            for _ in range(config.flow_transformer_layers)])
        self.predictor_conv1 = layers.conv(df, df, 5, padding=2, rngs=rngs)
        self.predictor_activation = TrainableBezier(df, torch_shape=(df, 1, 1))
        self.predictor_conv2 = layers.conv(df, df, 3, padding=1, rngs=rngs)
        self.context_conv = layers.conv(df + 2, df, 7, padding=3, rngs=rngs)
        self.context_activation = TrainableBezier(df, torch_shape=(df, 1, 1))

    def time_conditioning(self, timesteps: jax.Array) -> jax.Array:
        """[B, text_embed_dim] embedding of t in [0, 1] (index trunc(t * 999), clamped).

        The index is computed in at least float32: in bf16 most indices would be off.
        """
        if not jnp.issubdtype(timesteps.dtype, jnp.floating):
            raise TypeError(f"timesteps must be floats in [0, 1], got {timesteps.dtype}; an "
                            "integer step t becomes t / 999 (training.diffusion.model_time)")
        last = self.config.time_steps - 1
        t = timesteps.astype(jnp.promote_types(timesteps.dtype, jnp.float32))
        index = jnp.clip(jnp.trunc(t * last), 0, last).astype(jnp.int32)
        x = self.time_activation(self.time_norm(self.time_embedding(index)))
        return self.time_proj(x)

    def __call__(self, packed: jax.Array, text_embeddings: jax.Array, timesteps: jax.Array,
                 hw: tuple[int, int] | None = None) -> jax.Array:
        """v-prediction for the image tokens of ``packed`` [B, T+1, latent_width]; hw token
        kept.

        ``timesteps`` [B] are floats in [0, 1]. ``hw`` is the latent grid (read from the hw
        token when omitted, which needs a concrete ``packed``).
        """
        h, w = resolve_grid(packed, hw, self.config.max_hw)
        tokens, hw_vec = packed[:, :-1], packed[:, -1:]
        b, t_len, _ = tokens.shape
        x = self.vae_to_dmodel(tokens)
        context, _ = self.ctx_mixer(x[:, : min(self.config.ctx_tokens, t_len)])
        cond = text_embeddings + self.time_conditioning(timesteps).astype(
            text_embeddings.dtype)
        txt = self.text_proj(cond)[:, None]
        block_conditioning = self.block_conditioning(cond)

        inv_freq = self.transformer_blocks[0].inv_freq[...].astype(x.dtype)
        rope_img, rope_txt = rotary_tables(inv_freq, t_len), rotary_tables(inv_freq, 1)
        pillars = [None] * 4
        for block in self.transformer_blocks:
            x = self.context_injection(x, context)
            x, pillars = layers.checkpointed(self.block_type.__call__, block, x, txt, rope_img,
                                             rope_txt, pillars, *block_conditioning,
                                             remat=self.remat)
            context = context + x.mean(axis=1)
        out = self.dmodel_to_vae(x)
        out = out + self._side_branch_update(x, h, w)
        return jnp.concatenate([out, hw_vec], axis=1)

    def block_conditioning(self, cond: jax.Array) -> tuple[jax.Array, ...]:
        """Inputs every block gets besides the tokens: none here."""
        return ()

    def _side_branch_update(self, x: jax.Array, h: int, w: int) -> jax.Array:
        """Convolutional read-out of the token grid, added to the first ctx_tokens tokens."""
        b, t_len, df = x.shape
        valid = min(h * w, t_len)
        if valid < h * w:  # the reference's fallback: a grid of floor(sqrt(T)) rows
            announced = (h, w)
            h = int(valid**0.5)
            w = valid // h
            if h * w != valid:
                raise ValueError(f"the hw token announces a {announced[0]}x{announced[1]} "
                                 f"grid but the sequence holds {t_len} tokens, which do not "
                                 f"form a grid of {h} rows")
        grid = x[:, :valid].reshape(b, h, w, df)
        flow = self.predictor_conv2(self.predictor_activation(self.predictor_conv1(grid)))
        flow = jnp.concatenate([flow, coordinate_channels(b, h, w, flow.dtype)], axis=-1)
        pooled = self.context_activation(self.context_conv(flow)).mean(axis=(1, 2))
        update = self.dmodel_to_vae(pooled)
        k = min(self.config.ctx_tokens, valid)
        mask = (jnp.arange(t_len) < k).astype(update.dtype)
        return mask[None, :, None] * update[:, None, :]
