"""PyTorch side of the parity tests: reference modules from the real ``fluxflow`` package,
deterministically perturbed so no weight keeps its (often trivial) default value."""

from __future__ import annotations

import numpy as np
import torch
from fluxflow.models.encoders import BertTextEncoder
from fluxflow.models.pipeline import FluxPipeline
from fluxflow.models.v030 import FluxCompressor, FluxExpander, FluxFlowProcessor
from torch import nn
from torch.nn.utils import spectral_norm

from fluxflow_jax.models import FluxFlowConfig


def perturb(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Add seeded noise to every parameter (buffers such as inv_freq stay exact)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            spread = param.std().item() if param.numel() > 1 else 0.0
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            param.add_(noise * (scale * spread + 0.02))
    return module.eval()


def compressor(cfg: FluxFlowConfig) -> FluxCompressor:
    return FluxCompressor(in_channels=cfg.in_channels, d_model=cfg.vae_dim,
                          downscales=cfg.downscales, max_hw=cfg.max_hw,
                          attn_layers=cfg.vae_attn_layers, attn_heads=cfg.vae_attn_heads,
                          attn_ff_mult=cfg.vae_ff_mult, use_gradient_checkpointing=False)


def flow_processor(cfg: FluxFlowConfig) -> FluxFlowProcessor:
    return FluxFlowProcessor(d_model=cfg.flow_dim, vae_dim=cfg.vae_dim,
                             embedding_size=cfg.text_embed_dim, n_head=cfg.flow_attn_heads,
                             n_layers=cfg.flow_transformer_layers, max_hw=cfg.max_hw,
                             ctx_tokens=cfg.ctx_tokens)


def expander(cfg: FluxFlowConfig) -> FluxExpander:
    return FluxExpander(d_model=cfg.vae_dim, upscales=cfg.upscales, max_hw=cfg.max_hw,
                        ctx_tokens=cfg.ctx_tokens, use_gradient_checkpointing=False)


def pipeline(cfg: FluxFlowConfig, seed: int) -> FluxPipeline:
    torch.manual_seed(seed)
    pipe = FluxPipeline(compressor(cfg), flow_processor(cfg), expander(cfg))
    return perturb(pipe, seed)


def text_encoder(cfg: FluxFlowConfig, seed: int) -> BertTextEncoder:
    torch.manual_seed(seed)
    return perturb(BertTextEncoder(embed_dim=cfg.text_embed_dim), seed, scale=0.05)


def inject_noise(model: FluxCompressor, noise_nchw: torch.Tensor) -> None:
    """Replace the compressor's internal randn with a fixed epsilon."""
    model.reparameterize = lambda mu, logvar: mu + noise_nchw.to(mu.dtype) * (0.5 * logvar).exp()


class PatchDiscriminator02(nn.Module):
    """The fluxflow-core 0.2.x discriminator (not shipped in fluxflow 0.8.1), rebuilt from its
    published description on torch's own spectral_norm: the numbers under test are torch's."""

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
