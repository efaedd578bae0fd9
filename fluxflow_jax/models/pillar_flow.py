"""The v080 flow processor: pillar attention with FiLM (PyTorch fluxflow 0.8.1, v080).

v070's flow carries the text signal to the pillars only through the image tokens. v080
gives each pillar the pooled text + time conditioning directly: a FiLM scale and shift of
its gate, and a cross-attention of all pillar outputs to the text tokens. Its tokens are
v070's latents (with their context channels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.models import layers
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.models.flow import (FluxFlowProcessor, FluxTransformerBlock,
                                      ParallelAttention, Rope)


def pillar_attention_heads(d_model: int, heads: int) -> int:
    """A quarter of the block's heads (at least one), lowered until it divides d_model."""
    return next(h for h in range(max(1, heads // 4), 0, -1) if d_model % h == 0)


class Film(nnx.Module):
    """gate * (1 + gamma) + beta, with gamma and beta projected from the conditioning."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.proj = layers.linear(d_model, 2 * d_model, xavier=True, rngs=rngs)

    def __call__(self, gate: jax.Array, conditioning: jax.Array) -> jax.Array:
        gamma, beta = jnp.split(self.proj(conditioning)[:, None], 2, axis=-1)
        return gate * (1 + gamma) + beta


class PillarFilmBlock(FluxTransformerBlock):
    """The flow block whose pillars are FiLM-modulated and attend to the text tokens."""

    def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
        super().__init__(d_model, heads, rngs=rngs)
        self.films = nnx.List([Film(d_model, rngs=rngs) for _ in self.pillars])
        self.pillar_cross_attn = ParallelAttention(
            d_model, pillar_attention_heads(d_model, heads), rngs=rngs)
        self.norm_pillar = layers.layer_norm(d_model, rngs=rngs)

    def __call__(self, img: jax.Array, txt: jax.Array, rope_img: Rope, rope_txt: Rope,
                 previous_pillars: list[jax.Array | None], text_cond: jax.Array
                 ) -> tuple[jax.Array, list[jax.Array]]:
        img = self.attend(img, txt, rope_img, rope_txt)
        gate = jax.nn.sigmoid(img)
        pillars = self.run_pillars([film(gate, text_cond) for film in self.films],
                                   previous_pillars)
        # All pillars' tokens query the text as one sequence, without positions.
        stacked = jnp.concatenate(pillars, axis=1)
        stacked = stacked + self.pillar_cross_attn(self.norm_pillar(stacked), txt, None, None)
        pillars = jnp.split(stacked, len(pillars), axis=1)
        return self.mix(img, pillars), pillars


class PillarFilmFlowProcessor(FluxFlowProcessor):
    """v070's flow processor with PillarFilmBlock blocks, which read the conditioning
    projected to the flow width."""

    block_type = PillarFilmBlock

    def __init__(self, config: FluxFlowConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.text_cond_proj = layers.linear(config.text_embed_dim, config.flow_dim, rngs=rngs)

    def block_conditioning(self, cond: jax.Array) -> tuple[jax.Array, ...]:
        return (self.text_cond_proj(cond),)
