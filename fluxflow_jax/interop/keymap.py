"""The one explicit table between PyTorch ``fluxflow`` state-dict keys and JAX variables.

Each component's table lists, for every tensor of the config's architecture version, its
PyTorch key (without the file prefix), the path of the NNX variable that holds it, and the
layout change between them. Tables are built from the config, so their coverage can be
checked against a module: every variable of a module must appear exactly once
(``check_coverage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from fluxflow_jax.models.config import FluxFlowConfig

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Layout:
    """A reversible change between the PyTorch and the JAX array layout."""

    name: str
    to_jax: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_torch: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def _permutation(perm: tuple[int, ...], name: str) -> Layout:
    inverse = tuple(int(i) for i in np.argsort(perm))
    return Layout(name, lambda a, _: a.transpose(perm), lambda a, _: a.transpose(inverse))


SAME = Layout("same", lambda a, _: a, lambda a, _: a)
LINEAR = _permutation((1, 0), "linear")  # [out, in] <-> [in, out]
CONV = _permutation((2, 3, 1, 0), "conv")  # OIHW <-> HWIO
# ConvTranspose2d [in, out, kh, kw] <-> [kh, kw, out, in] (transpose_kernel=True)
CONV_TRANSPOSE = _permutation((2, 3, 1, 0), "conv_transpose")
# A vector stored in PyTorch with extra singleton axes, e.g. TrainableBezier (C, 1, 1).
RESHAPE = Layout("reshape", lambda a, _: a.reshape(-1),
                 lambda a, torch_shape: a.reshape(torch_shape))


@dataclass(frozen=True)
class Entry:
    torch_key: str
    path: Path
    layout: Layout = SAME
    torch_shape: tuple[int, ...] = ()  # only for RESHAPE


Table = list[Entry]


def _linear(key: str, path: Path, bias: bool = True) -> Iterator[Entry]:
    yield Entry(f"{key}.weight", (*path, "kernel"), LINEAR)
    if bias:
        yield Entry(f"{key}.bias", (*path, "bias"))


def _conv(key: str, path: Path, bias: bool = True) -> Iterator[Entry]:
    yield Entry(f"{key}.weight", (*path, "kernel"), CONV)
    if bias:
        yield Entry(f"{key}.bias", (*path, "bias"))


def _norm(key: str, path: Path) -> Iterator[Entry]:
    yield Entry(f"{key}.weight", (*path, "scale"))
    yield Entry(f"{key}.bias", (*path, "bias"))


def _embedding(key: str, path: Path) -> Iterator[Entry]:
    yield Entry(f"{key}.weight", (*path, "embedding"))


def _trainable_bezier(key: str, path: Path, torch_shape: tuple[int, ...]) -> Iterator[Entry]:
    layout = RESHAPE if len(torch_shape) > 1 else SAME
    for p in ("p0", "p1", "p2", "p3"):
        yield Entry(f"{key}.{p}", (*path, p), layout, torch_shape)


def _context_mixer(key: str, path: Path) -> Iterator[Entry]:
    yield Entry(f"{key}.cls", (*path, "cls"))
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        yield from _linear(f"{key}.{proj}", (*path, proj))
    yield from _norm(f"{key}.norm_in", (*path, "norm_in"))
    yield from _norm(f"{key}.norm_out", (*path, "norm_out"))


def compressor_table(config: FluxFlowConfig) -> Table:
    t: Table = []
    for i in range(config.downscales):
        t += _conv(f"encoder_first_step.{i}.0", ("encoder_first_step", i), bias=False)
        t += _conv(f"encoder_z.{i}.0", ("encoder_z", i))
    for name in ("latent_proj", "mu_proj", "logvar_proj"):
        for i in range(2):
            t += _conv(f"{name}.{i}.0", (name, i))
    t += _trainable_bezier("mu_activation", ("mu_activation",), (config.vae_dim,))
    t += _trainable_bezier("logvar_activation", ("logvar_activation",), (config.vae_dim,))
    for i in range(config.vae_attn_layers):
        key, path = f"token_attn.{i}", ("token_attn", i)
        t += _norm(f"{key}.norm1", (*path, "norm1"))
        t.append(Entry(f"{key}.attn.in_proj_weight", (*path, "in_proj", "kernel"), LINEAR))
        t.append(Entry(f"{key}.attn.in_proj_bias", (*path, "in_proj", "bias")))
        t += _linear(f"{key}.attn.out_proj", (*path, "out_proj"))
        t += _norm(f"{key}.norm2", (*path, "norm2"))
        t += _linear(f"{key}.ff.0", (*path, "ff_in"))
        t += _linear(f"{key}.ff.2", (*path, "ff_out"))
    if config.architecture.bounded_tokens:
        t += _norm("final_norm", ("final_norm",))
    if config.architecture.context_dims:
        t += _linear("context_proj", ("context_proj",))
    return t


def flow_table(config: FluxFlowConfig) -> Table:
    df = config.flow_dim
    t: Table = []
    t += _linear("vae_to_dmodel", ("vae_to_dmodel",))
    t += _linear("dmodel_to_vae", ("dmodel_to_vae",))
    t += _context_mixer("ctx_mixer", ("ctx_mixer",))
    t += _linear("text_proj", ("text_proj",))
    t += _embedding("time_embed.0", ("time_embedding",))
    t += _norm("time_embed.1", ("time_norm",))
    t += _trainable_bezier("time_embed.2", ("time_activation",), (df,))
    t += _linear("time_embed.3", ("time_proj",))
    t += _linear("context_injection.gate.0", ("context_injection", "gate"))
    t += _linear("context_injection.bias", ("context_injection", "bias"))
    for i in range(config.flow_transformer_layers):
        key, path = f"transformer_blocks.{i}", ("transformer_blocks", i)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q_proj", "kv_proj", "out_proj"):
                t += _linear(f"{key}.{attn}.{proj}", (*path, attn, proj))
        for norm in ("norm1", "norm2", "norm3"):
            t += _norm(f"{key}.{norm}", (*path, norm))
        for p in range(4):
            for layer in range(3):
                t += _linear(f"{key}.p{p}.{layer}.0", (*path, "pillars", p, "layers", layer))
        t += _linear(f"{key}.ffn.0", (*path, "ffn"))
        t.append(Entry(f"{key}.rotary_pe.inv_freq", (*path, "inv_freq")))
        if config.architecture.pillar_film:
            t += _pillar_film(key, path)
    if config.architecture.pillar_film:
        t += _linear("text_cond_proj", ("text_cond_proj",))
    t += _conv("flow_predictor.0", ("predictor_conv1",))
    t += _trainable_bezier("flow_predictor.1", ("predictor_activation",), (df, 1, 1))
    t += _conv("flow_predictor.2", ("predictor_conv2",))
    t += _conv("context_final.0", ("context_conv",))
    t += _trainable_bezier("context_final.1", ("context_activation",), (df, 1, 1))
    return t


def _pillar_film(key: str, path: Path) -> Iterator[Entry]:
    """A v080 flow block's FiLM projections and pillar attention."""
    for p in range(4):
        yield from _linear(f"{key}.film_p{p}", (*path, "films", p, "proj"))
    for proj in ("q_proj", "kv_proj", "out_proj"):
        yield from _linear(f"{key}.pillar_cross_attn.{proj}", (*path, "pillar_cross_attn", proj))
    yield from _norm(f"{key}.norm_pillar", (*path, "norm_pillar"))


def expander_table(config: FluxFlowConfig) -> Table:
    t: Table = []
    for i in range(config.upscales):
        key, path = f"upscale.layers.{i}", ("upscale", i)
        t += _conv(f"{key}.spade.mlp_shared.0", (*path, "spade", "mlp_shared"))
        t += _conv(f"{key}.spade.mlp_beta", (*path, "spade", "mlp_beta"))
        t.append(Entry(f"{key}.conv1.0.weight", (*path, "upsample", "kernel"), CONV_TRANSPOSE))
        t.append(Entry(f"{key}.conv1.0.bias", (*path, "upsample", "bias")))
        t += _conv(f"{key}.conv1.2", (*path, "refine"))
    if config.architecture.expander_context_mixer:
        t += _context_mixer("context_mixer", ("context_mixer",))
    t += _conv("to_rgb_conv.0", ("rgb_conv1",))
    t += _norm("to_rgb_conv.1", ("rgb_norm1",))
    t += _conv("to_rgb_conv.3", ("rgb_conv2",))
    t += _norm("to_rgb_conv.4", ("rgb_norm2",))
    t += _conv("to_rgb_conv.6", ("rgb_conv3",))
    t += _trainable_bezier("rgb_activation", ("rgb_activation",), (config.in_channels,))
    return t


def text_encoder_table(config: FluxFlowConfig) -> Table:
    lm = "language_model"
    t: Table = []
    t += _embedding(f"{lm}.embeddings.word_embeddings", ("word_embeddings",))
    t += _embedding(f"{lm}.embeddings.position_embeddings", ("position_embeddings",))
    t += _norm(f"{lm}.embeddings.LayerNorm", ("embedding_norm",))
    for i in range(config.text_layers):
        key, path = f"{lm}.transformer.layer.{i}", ("layers", i)
        for proj in ("q_lin", "k_lin", "v_lin", "out_lin"):
            t += _linear(f"{key}.attention.{proj}", (*path, proj))
        t += _norm(f"{key}.sa_layer_norm", (*path, "sa_layer_norm"))
        t += _linear(f"{key}.ffn.lin1", (*path, "lin1"))
        t += _linear(f"{key}.ffn.lin2", (*path, "lin2"))
        t += _norm(f"{key}.output_layer_norm", (*path, "output_layer_norm"))
    t += _linear("ouput_layer.0", ("head_proj1",))  # sic: the reference's key spelling
    t += _norm("ouput_layer.1", ("head_norm1",))
    t += _linear("ouput_layer.3", ("head_proj2",))
    t += _norm("ouput_layer.4", ("head_norm2",))
    return t


def _spectral(key: str, path: Path, inner: str) -> Iterator[Entry]:
    yield Entry(f"{key}.weight_orig", (*path, inner, "kernel"), CONV if inner == "conv" else LINEAR)
    yield Entry(f"{key}.bias", (*path, inner, "bias"))
    yield Entry(f"{key}.weight_u", (*path, "weight_u"))
    yield Entry(f"{key}.weight_v", (*path, "weight_v"))


def _double_sn_conv(key: str, path: Path) -> Iterator[Entry]:
    yield from _spectral(f"{key}.0", (*path, "conv1"), "conv")
    yield from _spectral(f"{key}.2", (*path, "conv2"), "conv")


def discriminator_table(config: FluxFlowConfig) -> Table:
    t: Table = list(_double_sn_conv("backbone.0", ("stem",)))
    for i in range(config.disc_depth):
        key, path = f"backbone.{i + 2}", ("blocks", i)
        t += _double_sn_conv(f"{key}.conv1", (*path, "conv1"))
        t += _double_sn_conv(f"{key}.conv2", (*path, "conv2"))
    t += _spectral("head", ("head",), "conv")
    if config.discriminator_ctx_dim > 0:
        t += _spectral("ctx_proj.0", ("ctx_proj", 0), "linear")
        t += _spectral("ctx_proj.2", ("ctx_proj", 1), "linear")
    return t


# File prefix of each component and the function that builds its table.
COMPONENT_TABLES: dict[str, tuple[str, Callable[[FluxFlowConfig], Table]]] = {
    "compressor": ("diffuser.compressor.", compressor_table),
    "flow_processor": ("diffuser.flow_processor.", flow_table),
    "expander": ("diffuser.expander.", expander_table),
    "text_encoder": ("text_encoder.", text_encoder_table),
    "discriminator": ("D_img.", discriminator_table),
}
