"""BertTextEncoder: DistilBERT plus the reference's Bezier output head.

The sentence embedding is the mean of DistilBERT's last hidden state over *all* positions
(padding included; the mask only affects attention), projected to ``text_embed_dim`` by
two Linear -> LayerNorm -> Bezier stages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fluxflow_jax.models import layers
from fluxflow_jax.models.bezier import bezier_activation
from fluxflow_jax.models.config import FluxFlowConfig

_BERT_EPS = 1e-12


class DistilBertLayer(nnx.Module):
    def __init__(self, config: FluxFlowConfig, *, rngs: nnx.Rngs):
        d, hidden = config.text_dim, config.text_hidden_dim
        self.heads = config.text_heads
        self.q_lin = layers.linear(d, d, xavier=True, rngs=rngs)
        self.k_lin = layers.linear(d, d, xavier=True, rngs=rngs)
        self.v_lin = layers.linear(d, d, xavier=True, rngs=rngs)
        self.out_lin = layers.linear(d, d, xavier=True, rngs=rngs)
        self.sa_layer_norm = layers.layer_norm(d, epsilon=_BERT_EPS, rngs=rngs)
        self.lin1 = layers.linear(d, hidden, xavier=True, rngs=rngs)
        self.lin2 = layers.linear(hidden, d, xavier=True, rngs=rngs)
        self.output_layer_norm = layers.layer_norm(d, epsilon=_BERT_EPS, rngs=rngs)
        self.attention_dropout = nnx.Dropout(config.text_attention_dropout)
        self.dropout = nnx.Dropout(config.text_dropout)

    def __call__(self, x: jax.Array, key_mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        split = lambda y: layers.split_heads(y, self.heads)
        q = split(self.q_lin(x))
        q = q / jnp.sqrt(jnp.asarray(q.shape[-1], x.dtype))  # DistilBERT scales q first
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, split(self.k_lin(x)))
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        weights = self.attention_dropout(layers.softmax(scores), rngs=rngs)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, split(self.v_lin(x)))
        # DistilBERT drops out attention weights and the FFN output, not the attention output.
        x = self.sa_layer_norm(x + self.out_lin(attended.reshape(x.shape)))
        ffn = self.lin2(jax.nn.gelu(self.lin1(x), approximate=False))
        return self.output_layer_norm(x + self.dropout(ffn, rngs=rngs))


LANGUAGE_MODEL = "language_model"  # the DistilBERT part, frozen apart from the head


def in_language_model(path: tuple) -> bool:
    """Whether a parameter path inside the text encoder is DistilBERT's (everything but the
    ``head_*`` output layers; PyTorch's ``language_model.*``)."""
    return not str(path[0]).startswith("head_")


class BertTextEncoder(nnx.Module):
    """``text_encoder(input_ids, attention_mask) -> [B, text_embed_dim]``.

    Dropout follows NNX's train/eval mode (``model.train()`` / ``model.eval()``). In train
    mode its randomness is explicit: pass ``rngs=nnx.Rngs(dropout=key)`` to the call.
    """

    def __init__(self, config: FluxFlowConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.remat = False  # recompute block activations in backward passes
        d = config.text_dim
        self.word_embeddings = layers.Embedding(config.text_vocab_size, d, std=0.02, rngs=rngs)
        self.position_embeddings = layers.Embedding(config.text_max_positions, d, std=0.02,
                                                rngs=rngs)
        self.embedding_norm = layers.layer_norm(d, epsilon=_BERT_EPS, rngs=rngs)
        self.embedding_dropout = nnx.Dropout(config.text_dropout)
        self.layers = nnx.List([DistilBertLayer(config, rngs=rngs)
                                for _ in range(config.text_layers)])
        head = config.text_head_width
        self.head_proj1 = layers.linear(d, 5 * head, xavier=True, rngs=rngs)
        self.head_norm1 = layers.layer_norm(5 * head, rngs=rngs)
        self.head_proj2 = layers.linear(head, 5 * config.text_embed_dim, xavier=True,
                                        rngs=rngs)
        self.head_norm2 = layers.layer_norm(5 * config.text_embed_dim, rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """DistilBERT's last hidden state [B, L, text_dim]."""
        length = input_ids.shape[1]
        if length > self.config.text_max_positions:
            raise ValueError(f"token sequence of length {length} exceeds text_max_positions "
                             f"({self.config.text_max_positions})")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        x = self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(length))[None]
        x = self.embedding_dropout(self.embedding_norm(x), rngs=rngs)
        for layer in self.layers:
            x = layers.checkpointed(DistilBertLayer.__call__, layer, x,
                                    attention_mask.astype(bool), rngs, remat=self.remat)
        return x

    def features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """DistilBERT's part: its last hidden state averaged over all positions
        [B, text_dim], what the head projects (and what a text cache stores)."""
        return self.hidden_states(input_ids, attention_mask, rngs=rngs).mean(axis=1)

    def project(self, features: jax.Array) -> jax.Array:
        """The head's part: ``features`` [B, text_dim] -> [B, text_embed_dim]."""
        x = bezier_activation(self.head_norm1(self.head_proj1(features)))
        return bezier_activation(self.head_norm2(self.head_proj2(x)))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.project(self.features(input_ids, attention_mask, rngs=rngs))
