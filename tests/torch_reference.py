"""PyTorch side of the parity tests: reference modules from the real ``fluxflow`` package,
deterministically perturbed so no weight keeps its (often trivial) default value."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from fluxflow.models.encoders import BertTextEncoder
from fluxflow.models.pipeline import FluxPipeline
from fluxflow.models.versioning import load_versioned_checkpoint
from diffusers import DPMSolverMultistepScheduler
from torch import nn
from torch.nn.utils import spectral_norm
from transformers import DistilBertConfig, DistilBertModel

from fluxflow_jax.models import FluxFlowConfig
from fluxflow_jax.models.config import ARCHITECTURES
from fluxflow_jax.models.geometry import latent_grid

FLOAT64_TOL = 1e-6  # measured: <= 2.2e-12 with weights no float32 value can represent
# float32: both libraries round differently (reduction order in convolutions, attention and
# norms), and the stacked tanh/sigmoid/silu Bezier stages amplify it. Measured on single
# modules: <= 1.1e-5 (spec: 1e-7..5e-5 for independent float32 implementations); a real
# mistake shows up as 1e-2 or more.
FLOAT32_TOL = 5e-5
# Whole compressor -> flow -> expander chains feed the flow's float32 output into SPADE's
# context at every upscale, multiplying the per-module rounding by up to ~100x: measured
# <= 4.7e-4 in v030, <= 6.6e-4 in v060, <= 1.6e-3 in v070 (config "a" without context: its
# SPADE then still normalises the flow's output, 1.2e-3 with context), <= 4.1e-4 in v080.
FLOAT32_CHAIN_TOL = 2e-3

# Two sets of widths, both with non-square images; each runs in every architecture version.
CONFIGS = {
    "a": (FluxFlowConfig(vae_dim=16, downscales=2, upscales=2, vae_attn_layers=2, flow_dim=32,
                         flow_attn_heads=4, flow_transformer_layers=2, text_embed_dim=24),
          (2, 32, 48)),
    "b": (FluxFlowConfig(vae_dim=32, downscales=3, upscales=3, vae_attn_layers=1, flow_dim=16,
                         flow_attn_heads=2, flow_transformer_layers=1, text_embed_dim=16),
          (2, 24, 40)),
}
VERSIONS = tuple(ARCHITECTURES)
PRECISIONS = {"float64": (torch.float64, jnp.float64, FLOAT64_TOL),
              "float32": (torch.float32, jnp.float32, FLOAT32_TOL)}


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def inputs(cfg, image_shape, torch_dtype, seed=0):
    """Images, reparameterisation noise (NCHW), text embeddings and timesteps."""
    gen = torch.Generator().manual_seed(seed)
    b, h, w = image_shape
    images = torch.rand(b, cfg.in_channels, h, w, generator=gen, dtype=torch.float64) * 2 - 1
    lh, lw = h // 2**cfg.downscales, w // 2**cfg.downscales
    noise = torch.randn(b, cfg.vae_dim, lh, lw, generator=gen, dtype=torch.float64)
    text = torch.randn(b, cfg.text_embed_dim, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.137, 0.862][:b], dtype=torch.float64)
    return [x.to(torch_dtype) for x in (images, noise, text, t)]


def grid(packed: torch.Tensor, cfg: FluxFlowConfig) -> tuple[int, int]:
    return latent_grid(packed.detach().numpy(), cfg.max_hw)


def to_jax(x: torch.Tensor, dtype, channels_last: bool = False):
    array = nchw(x) if channels_last else x.detach().numpy()
    return jnp.asarray(array, dtype=dtype)


def packed_latents(cfg, image_shape, torch_dtype, seed=1):
    """Random latent tokens with a correct hw token, as the flow and expander receive."""
    b, h, w = image_shape
    lh, lw = h // 2**cfg.downscales, w // 2**cfg.downscales
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, lh * lw, cfg.latent_width, generator=gen, dtype=torch.float64)
    hw = torch.zeros(b, 1, cfg.latent_width, dtype=torch.float64)
    hw[:, 0, 0], hw[:, 0, 1] = lh / cfg.max_hw, lw / cfg.max_hw
    return torch.cat([tokens, hw], 1).to(torch_dtype)


def perturb(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Add seeded noise to every parameter (buffers such as inv_freq stay exact)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            spread = param.std().item() if param.numel() > 1 else 0.0
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            param.add_(noise * (scale * spread + 0.02))
    return module.eval()


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy in ``dtype``. In float64 every parameter is also nudged by ~1e-9 relative, so
    that no value is representable in float32 and a hidden float32 cast on either side
    shows up as a ~1e-7 error instead of passing unnoticed."""
    module = copy.deepcopy(module).to(dtype)
    if dtype == torch.float64:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in module.parameters():
                param.mul_(1 + 1e-9 * torch.randn(param.shape, generator=gen, dtype=dtype))
    return module


def torch_classes(cfg: FluxFlowConfig):
    """fluxflow's module of ``cfg.model_version`` (e.g. fluxflow.models.v060)."""
    return importlib.import_module("fluxflow.models.v" + cfg.model_version.replace(".", ""))


def compressor(cfg: FluxFlowConfig) -> nn.Module:
    return torch_classes(cfg).FluxCompressor(
        in_channels=cfg.in_channels, d_model=cfg.vae_dim, downscales=cfg.downscales,
        max_hw=cfg.max_hw, attn_layers=cfg.vae_attn_layers, attn_heads=cfg.vae_attn_heads,
        attn_ff_mult=cfg.vae_ff_mult, use_gradient_checkpointing=False)


def flow_processor(cfg: FluxFlowConfig) -> nn.Module:
    return torch_classes(cfg).FluxFlowProcessor(
        d_model=cfg.flow_dim, vae_dim=cfg.vae_dim, embedding_size=cfg.text_embed_dim,
        n_head=cfg.flow_attn_heads, n_layers=cfg.flow_transformer_layers, max_hw=cfg.max_hw,
        ctx_tokens=cfg.ctx_tokens)


def expander(cfg: FluxFlowConfig) -> nn.Module:
    return torch_classes(cfg).FluxExpander(
        d_model=cfg.vae_dim, upscales=cfg.upscales, max_hw=cfg.max_hw,
        ctx_tokens=cfg.ctx_tokens, use_gradient_checkpointing=False)


def pipeline(cfg: FluxFlowConfig, seed: int) -> FluxPipeline:
    torch.manual_seed(seed)
    pipe = FluxPipeline(compressor(cfg), flow_processor(cfg), expander(cfg))
    return perturb(pipe, seed)


# Versions with a loader of their own in PyTorch's load_versioned_checkpoint (it refuses a
# "0.6.0" label) and save_versioned_checkpoint.
VERSIONED_LOADERS = ("0.3.0", "0.7.0", "0.8.0")


def load_export(path: Path, version: str) -> FluxPipeline:
    """The call a PyTorch user makes to load a fluxflow-jax export of ``version``: the
    versioned loader where it has one for the version, else the legacy ``from_pretrained``
    on the weights file, which builds v060 classes."""
    if version in VERSIONED_LOADERS:
        return load_versioned_checkpoint(path, "cpu")
    return FluxPipeline.from_pretrained(str(Path(path) / "flxflow_final.safetensors"), "cpu")


def sample(pipe: FluxPipeline, encoder: BertTextEncoder, ids: torch.Tensor,
           mask: torch.Tensor, noise: torch.Tensor, guidance: float, steps: int,
           size: tuple[int, int], cfg: FluxFlowConfig) -> np.ndarray:
    """Text-to-image on the PyTorch side, as ``fluxflow_jax.sampling.generate`` does it:
    diffusers' DPM-Solver++ (v-prediction, linear betas, trailing timesteps) from the
    latent tokens ``noise``, classifier-free guidance against a zero text embedding, then
    the expander. NHWC images in [-1, 1]."""
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                            prediction_type="v_prediction",
                                            timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    h, w = (side // 2**cfg.downscales for side in size)
    with torch.no_grad():
        cond = encoder(ids, attention_mask=mask)
        text = torch.cat([torch.zeros_like(cond), cond]) if guidance != 1 else cond
        hw = torch.zeros(len(ids), 1, cfg.latent_width, dtype=noise.dtype)
        hw[:, 0, 0], hw[:, 0, 1] = h / cfg.max_hw, w / cfg.max_hw
        x = noise.clone()
        for t in scheduler.timesteps:
            packed = torch.cat([x, hw], dim=1).repeat(len(text) // len(ids), 1, 1)
            times = torch.full((len(text),), float(t) / 999, dtype=noise.dtype)
            v = pipe.flow_processor(packed, text, times)[:, :-1]
            if guidance != 1:
                v_null, v_cond = v.chunk(2)
                v = v_null + guidance * (v_cond - v_null)
            x = scheduler.step(v, t, x).prev_sample
        images = pipe.expander(torch.cat([x, hw], dim=1))
    return nchw(images.clamp(-1, 1))


def save_label(version: str) -> str:
    """The model_version a PyTorch user passes to ``save_versioned_checkpoint`` for a
    pipeline of ``version``: its own where it has a loader, else (v060) the default "0.3.0"."""
    return version if version in VERSIONED_LOADERS else "0.3.0"


def text_encoder(cfg: FluxFlowConfig, seed: int) -> BertTextEncoder:
    """fluxflow's BertTextEncoder with its DistilBERT built from ``cfg`` (the reference
    hard-codes the full 6x768 model; smaller ones keep the cross-framework tests fast)."""
    torch.manual_seed(seed)
    model = BertTextEncoder(embed_dim=cfg.text_embed_dim)
    model.language_model = DistilBertModel(DistilBertConfig(
        vocab_size=cfg.text_vocab_size, dim=cfg.text_dim, n_layers=cfg.text_layers,
        n_heads=cfg.text_heads, hidden_dim=cfg.text_hidden_dim,
        max_position_embeddings=cfg.text_max_positions, activation="gelu"))
    return perturb(model, seed, scale=0.05)


def inject_noise(model: nn.Module, noise_nchw: torch.Tensor) -> None:
    """Replace the compressor's internal randn with a fixed epsilon."""
    model.reparameterize = lambda mu, logvar: mu + noise_nchw.to(mu.dtype) * (0.5 * logvar).exp()


class PatchDiscriminator02(nn.Module):
    """The fluxflow-core 0.2.x discriminator (not shipped in fluxflow 0.8.1; its source is
    src/fluxflow/models/discriminators.py in the fluxflow-core repository's early history),
    rebuilt from its published description on torch's own spectral_norm, so the numbers
    under test are torch's."""

    def __init__(self, in_channels: int, base_ch: int, depth: int, ctx_dim: int):
        super().__init__()
        double = lambda i, o: nn.Sequential(spectral_norm(nn.Conv2d(i, o, 3, 1, 1)),
                                            nn.LeakyReLU(0.2),
                                            spectral_norm(nn.Conv2d(o, o, 3, 1, 1)))
        blocks, c = [double(in_channels, base_ch), nn.LeakyReLU(0.2)], base_ch
        for _ in range(depth):
            block = nn.Module()
            block.conv1, block.conv2 = double(c, 2 * c), double(2 * c, 2 * c)
            blocks.append(block)
            c *= 2
        self.backbone = nn.ModuleList(blocks)
        self.head = spectral_norm(nn.Conv2d(c, 1, 3, 1, 1))
        self.ctx_proj = (nn.Sequential(spectral_norm(nn.Linear(ctx_dim, c)), nn.LeakyReLU(0.2),
                                       spectral_norm(nn.Linear(c, c))) if ctx_dim else None)

    def forward(self, x, ctx=None):
        act = lambda y: nn.functional.leaky_relu(y, 0.2)
        h = act(self.backbone[0](x))
        for block in list(self.backbone)[2:]:
            h = nn.functional.avg_pool2d(act(block.conv2(act(block.conv1(h)))), 2)
        logits = self.head(h)
        feats = h.mean(dim=(2, 3))
        if self.ctx_proj is not None and ctx is not None:
            logits = logits + (feats * self.ctx_proj(ctx)).sum(1)[:, None, None, None]
        return feats, logits


def discriminator(cfg: FluxFlowConfig, seed: int) -> PatchDiscriminator02:
    torch.manual_seed(seed)
    return perturb(PatchDiscriminator02(cfg.in_channels, cfg.disc_base_channels, cfg.disc_depth,
                                        cfg.discriminator_ctx_dim), seed)


def state_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def nchw(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).cpu().numpy()
