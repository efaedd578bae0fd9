"""One dataclass holding every architecture field of the FluxFlow networks.

``model_version`` picks one of PyTorch ``fluxflow`` 0.8.1's architectures; the default,
"0.6.0", is the one its top-level classes, ``FluxPipeline.from_pretrained`` and its trainer
build. The widths default to the reference training defaults: VAE latent width 128, flow
width 128, text embedding 1024, 4 down/up scales, 4 compressor attention layers, 10 flow
blocks. That pipeline (compressor + flow processor + expander) has 111,371,160 parameters
in v060, 111,437,592 in v030, 110,806,306 in v070 and 112,921,506 in v080.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fluxflow_jax.models.geometry import torch_linspace
from fluxflow_jax.settings import setting


_POSITIVE = ("in_channels", "vae_dim", "downscales", "upscales", "max_hw", "vae_attn_heads",
             "vae_ff_mult", "spade_hidden", "flow_dim", "flow_attn_heads",
             "flow_transformer_layers", "text_embed_dim", "time_steps", "text_vocab_size",
             "text_dim", "text_layers", "text_heads", "text_hidden_dim", "text_max_positions",
             "text_head_width", "disc_base_channels")
_NON_NEGATIVE = ("vae_attn_layers", "disc_depth")
# What the flow trains against and generation starts from (models/flow_noise.py).
FLOW_NOISES = ("gaussian", "encoded_noise_image")
# Fields that shape no weight: a run may set them on a checkpoint's models.
WEIGHTLESS_FIELDS = ("flow_noise",)
# Values the PyTorch loaders build regardless of a checkpoint's metadata, per component.
_TORCH_FIXED = {
    "compressor": {"vae_attn_heads": 8, "vae_ff_mult": 2},
    "flow_processor": {"time_steps": 1000},
    "expander": {"spade_hidden": 128, "in_channels": 3},
    "text_encoder": {"text_vocab_size": 30522, "text_dim": 768, "text_layers": 6,
                     "text_heads": 12, "text_hidden_dim": 3072, "text_max_positions": 512,
                     "text_head_width": 512},
}
# Values only the loader of one version hard-codes: FluxPipeline.from_pretrained, v060's
# loader, reads neither max_hw nor in_channels from anywhere.
_TORCH_FIXED_BY_VERSION = {
    "0.6.0": {"compressor": {"in_channels": 3, "max_hw": 1024},
              "flow_processor": {"max_hw": 1024}, "expander": {"max_hw": 1024}},
}


@dataclass(frozen=True)
class Architecture:
    """What sets one PyTorch architecture version apart from the others."""

    # The compressor ends with LayerNorm + tanh on the image tokens (``final_norm``): it
    # bounds the latents the flow sees to [-1, 1].
    bounded_tokens: bool
    # The expander holds a ContextAttentionMixer whose parameters its forward never reads.
    expander_context_mixer: bool
    # Channels of SPADE context appended to every latent token (0: none). The compressor
    # bounds its tokens before attention and projects the attention output to this context
    # (``context_proj``); the expander's SPADE reads it instead of the latent features.
    context_dims: int = 0
    # Without context the expander's SPADE still applies its GroupNorm (else it is skipped).
    spade_norm_without_context: bool = False
    # The flow's pillars are FiLM-modulated by the text + time conditioning and attend to
    # the text tokens (models/pillar_flow.py).
    pillar_film: bool = False

    def latent_width(self, vae_dim: int) -> int:
        """Width of a packed latent token: vae_dim plus the context channels."""
        return vae_dim + self.context_dims


ARCHITECTURES = {
    "0.3.0": Architecture(bounded_tokens=False, expander_context_mixer=True),
    "0.6.0": Architecture(bounded_tokens=True, expander_context_mixer=False),
    "0.7.0": Architecture(bounded_tokens=True, expander_context_mixer=False, context_dims=5,
                          spade_norm_without_context=True),
    "0.8.0": Architecture(bounded_tokens=True, expander_context_mixer=False, context_dims=5,
                          spade_norm_without_context=True, pillar_film=True),
}
DEFAULT_VERSION = "0.6.0"


_FIXED = " (fixed in PyTorch)"  # a value PyTorch's loaders hard-code (_TORCH_FIXED)
_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number",
               "int | None": "an integer or null"}


def _has_type(value: object, annotation: str) -> bool:
    if annotation == "int | None" and value is None:
        return True
    if annotation == "str":
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if annotation == "float" else int)


@dataclass(frozen=True)
class FluxFlowConfig:
    """The architecture; each field is a key of the config's ``model`` section, checked as a
    whole (``problems``)."""

    model_version: str = setting(
        DEFAULT_VERSION, None, "PyTorch fluxflow architecture: \"0.6.0\" (what PyTorch "
        "fluxflow and its trainer build; latent tokens bounded by a final LayerNorm + tanh), "
        "\"0.7.0\" (bounded tokens plus 5 context channels per latent token, which the "
        "expander's SPADE reads; latent tokens `vae_dim + 5` wide), \"0.8.0\" (v070's VAE; a "
        "flow whose pillars are FiLM-modulated by the text + time conditioning and attend to "
        "the text token) or \"0.3.0\" (older checkpoints; unbounded tokens)", flag=True)
    # VAE (compressor / expander)
    in_channels: int = setting(3, None, "image channels" + _FIXED)
    vae_dim: int = setting(128, None, "latent width of the compressor and expander", flag=True)
    downscales: int = setting(4, None, "compressor downsampling stages (latent grid = image / "
                              "2^downscales)")
    upscales: int = setting(4, None, "expander upsampling stages; must equal `downscales` for "
                            "reconstruction")
    max_hw: int = setting(1024, None,
                          "normaliser of the latent grid size stored in the hw token")
    vae_attn_layers: int = setting(4, None, "compressor attention blocks")
    vae_attn_heads: int = setting(8, None, "compressor attention heads" + _FIXED)
    vae_ff_mult: int = setting(2, None, "compressor feed-forward multiplier" + _FIXED)
    spade_hidden: int = setting(128, None, "SPADE hidden width in the expander" + _FIXED)
    # Flow transformer
    flow_dim: int = setting(128, None, "flow transformer width", flag="feature_maps_dim",
                            aliases=("feature_maps_dim",))
    flow_attn_heads: int = setting(8, None, "flow attention heads")
    flow_transformer_layers: int = setting(10, None, "flow transformer blocks")
    text_embed_dim: int = setting(1024, None, "text embedding width",
                                  flag="text_embedding_dim", aliases=("text_embedding_dim",))
    time_steps: int = setting(1000, None, "diffusion timesteps" + _FIXED)
    flow_noise: str = setting(
        "gaussian", None, "the noise the flow trains against and generation starts from: "
        "`gaussian` tokens (PyTorch's trainer), or `encoded_noise_image`, the compressor's "
        "tokens of a random image, where PyTorch's `FluxFlowPipeline` starts; those carry the "
        "latent grid's positions, which the flow has no other way to know (docs/learning.md, "
        "2.2). Checkpoints that do not record it were trained on `gaussian`")
    # Text encoder (DistilBERT + output head)
    text_vocab_size: int = setting(30522, None, "text encoder vocabulary; must equal the "
                                   "tokenizer's for flow steps" + _FIXED)
    text_dim: int = setting(768, None, "DistilBERT width" + _FIXED)
    text_layers: int = setting(6, None, "DistilBERT layers" + _FIXED)
    text_heads: int = setting(12, None, "DistilBERT heads" + _FIXED)
    text_hidden_dim: int = setting(3072, None, "DistilBERT feed-forward width" + _FIXED)
    text_max_positions: int = setting(512, None, "DistilBERT positions; `data.max_length` must "
                                      "not exceed it for flow steps" + _FIXED)
    text_head_width: int = setting(512, None, "width of the Bezier output head" + _FIXED)
    text_dropout: float = setting(0.1, None, "text encoder dropout, in [0, 1)")
    text_attention_dropout: float = setting(0.1, None,
                                            "text encoder attention dropout, in [0, 1)")
    # Discriminator (spectral-norm PatchDiscriminator of the training framework)
    disc_base_channels: int = setting(64, None, "discriminator base width")
    disc_depth: int = setting(4, None, "discriminator downsampling blocks")
    disc_ctx_dim: int | None = setting(None, None, "discriminator context width; null: the "
                                       "latent token width (`vae_dim`, plus 5 in v070)")

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid FluxFlowConfig: " + "; ".join(problems))

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.model_version]

    @property
    def ctx_tokens(self) -> int:
        """Tokens the flow processor mixes as context; the reference forces it to downscales."""
        return self.downscales

    @property
    def latent_width(self) -> int:
        return self.architecture.latent_width(self.vae_dim)

    @property
    def discriminator_ctx_dim(self) -> int:
        return self.latent_width if self.disc_ctx_dim is None else self.disc_ctx_dim

    def problems(self) -> list[str]:
        """Every inconsistency in the fields, each phrased with its fix."""
        wrong_type = [f"{f.name} must be {_TYPE_NAMES[f.type]}, got {getattr(self, f.name)!r}"
                      for f in dataclasses.fields(self)
                      if not _has_type(getattr(self, f.name), f.type)]
        if wrong_type:
            return wrong_type
        if self.model_version not in ARCHITECTURES:
            return [_version_problem(self.model_version)]
        out = [f"{name} must be >= 1 (got {getattr(self, name)})" for name in _POSITIVE
               if getattr(self, name) < 1]
        out += [f"{name} must be >= 0 (got {getattr(self, name)})" for name in _NON_NEGATIVE
                if getattr(self, name) < 0]
        out += [f"{name} must be in [0, 1) (got {getattr(self, name)})"
                for name in ("text_dropout", "text_attention_dropout")
                if not 0 <= getattr(self, name) < 1]
        if self.flow_noise not in FLOW_NOISES:
            out.append(f"flow_noise must be one of {list(FLOW_NOISES)}, got "
                       f"{self.flow_noise!r}")
        if self.disc_ctx_dim is not None and self.disc_ctx_dim < 0:
            out.append(f"disc_ctx_dim must be >= 0, or None for the latent token width "
                       f"(got {self.disc_ctx_dim})")
        if out:
            return out
        if self.vae_dim % self.vae_attn_heads:
            out.append(f"vae_dim ({self.vae_dim}) must be divisible by vae_attn_heads "
                       f"({self.vae_attn_heads})")
        if self.vae_dim % 2:
            out.append(f"vae_dim ({self.vae_dim}) must be even (2-D sin/cos position table)")
        if self.flow_dim % self.flow_attn_heads:
            out.append(f"flow_dim ({self.flow_dim}) must be divisible by flow_attn_heads "
                       f"({self.flow_attn_heads})")
        elif (self.flow_dim // self.flow_attn_heads) % 2:
            out.append(f"flow head width flow_dim/flow_attn_heads "
                       f"({self.flow_dim // self.flow_attn_heads}) must be even for rotary "
                       "embeddings")
        if self.flow_dim % max(1, self.flow_dim // 128):
            out.append(f"flow_dim ({self.flow_dim}) must be divisible by max(1, flow_dim//128)")
        if (self.architecture.expander_context_mixer
                and self.vae_dim % max(4, self.vae_dim // 64)):
            out.append(f"vae_dim ({self.vae_dim}) must be divisible by max(4, vae_dim//64) "
                       "(the expander's context mixer heads)")
        if self.text_dim % self.text_heads:
            out.append(f"text_dim ({self.text_dim}) must be divisible by text_heads "
                       f"({self.text_heads})")
        return out

    def torch_incompatibilities(self, components: tuple[str, ...] | None = None) -> list[str]:
        """Fields of the given components (all by default) that PyTorch ``fluxflow`` cannot
        rebuild: its loaders hard-code these values, so such a checkpoint fails to load
        there or, for head counts, runs different math."""
        tables = (_TORCH_FIXED, _TORCH_FIXED_BY_VERSION.get(self.model_version, {}))
        problems = [f"{name}={getattr(self, name)} (PyTorch uses {value})"
                    for table in tables for component, fixed in table.items()
                    if components is None or component in components
                    for name, value in fixed.items() if getattr(self, name) != value]
        # v060's from_pretrained counts the attention blocks in the file and builds 2 when
        # it finds none, whose weights its non-strict load then leaves random.
        if (self.model_version == "0.6.0" and self.vae_attn_layers == 0
                and (components is None or "compressor" in components)):
            problems.append("vae_attn_layers=0 (PyTorch builds 2 when the file has none)")
        return list(dict.fromkeys(problems))

    def torch_note(self, components: tuple[str, ...] | None = None) -> str | None:
        """The one sentence saying that PyTorch ``fluxflow`` cannot rebuild this architecture
        and what to change, or None when it can."""
        problems = self.torch_incompatibilities(components)
        if not problems:
            return None
        return ("PyTorch fluxflow cannot rebuild this architecture: " + ", ".join(problems)
                + "; its loaders hard-code these, so set PyTorch's values in the model "
                "section (or leave the keys out for the defaults) for a model PyTorch loads")

    def replace(self, **changes) -> "FluxFlowConfig":
        return dataclasses.replace(self, **changes)

    @property
    def compressor_channels(self) -> list[int]:
        """Channel widths of the encoder stages, as the reference computes them.

        The reference rounds float32 ``torch.linspace`` values with Python's round-half-even,
        so d_model=128 gives [5, 36, 66, 97, 128] (66.5 rounds down).
        """
        start, end = self.in_channels + 2, max(self.vae_dim, 8)
        return [int(round(float(c))) for c in torch_linspace(start, end, self.downscales + 1)]


def _version_problem(version: str) -> str:
    return (f"model_version must be one of {list(ARCHITECTURES)} (PyTorch fluxflow's "
            f"architecture versions; default {DEFAULT_VERSION!r}), got {version!r}")
