"""Does PyTorch fluxflow's own v060 autoencoder learn the demo data? A probe on the reference.

    python tools/reference_vae_probe.py STEPS LR [OPTIONS]

OPTIONS is a comma-separated list:

- ``unit_variance``: rescale every convolution and linear layer, in call order, so its
  output has std 1 on the first 16 training images (layer-sequential unit variance);
- ``deterministic``: decode the posterior mean (no reparameterisation noise);
- ``frozen_encoder``: train the decoder only;
- ``oracle``: no encoder: the decoder reads each image's average-pooled colours (8x8 for
  3 downscales)
  (its three channels repeated over the latent width), to see what the decoder alone learns;
- ``silu_start``: every encoder layer that feeds a Bezier activation gets the same weights
  for its four control-point channels (Kaiming-normal with gain 1.7), so each activation
  starts as ``silu`` of one convolution (equal control points make the curve constant in t);
- ``pass_through``: the encoder starts as an average pooling of the image, as fluxflow-jax's
  ``training.compressor_start: pass_through`` does (``fluxflow_jax.models.compressor_start``):
  each control-point channel passes its matching input channel through (identity, or the
  centre 2x2 average of the stride-2 kernels), at gains that keep the pooled image at 0.1
  inside the encoder and lift it to 3 in the latent grid;
- ``encoder_lr=X``: the encoder's learning rate (default: LR, the decoder's);
- ``dim=N``: latent width (default 16, the quickstart's);
- ``downscales=N``: down- and up-scaling stages (default 3, the quickstart's).

It trains the real ``fluxflow`` 0.8.1 ``FluxCompressor`` and ``FluxExpander`` (3 down- and
up-scales, one attention layer) on demo samples 0-511 at 32 px, batch 4, AdamW (betas
0.9/0.95, weight decay 0.01), L1 + MSE, no clipping, and prints the held-out PSNR (samples
512-543, on the [0, 1] scale) every 250 updates. The numbers are recorded in
docs/learning.md.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from fluxflow.models.activations import BezierActivation
from fluxflow.models.v060.vae import FluxCompressor, FluxExpander
from torch import nn

from fluxflow_jax.data.demo import DemoSource

SIZE, BATCH, TRAIN, HELD_OUT = 32, 4, range(0, 512), range(512, 544)
SOURCE = DemoSource(length=600, image_size=SIZE, seed=42)


def images(indices) -> torch.Tensor:
    pixels = np.stack([SOURCE[i].image for i in indices])
    return torch.tensor(pixels, dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1


def oracle_tokens(x: torch.Tensor, dim: int, factor: int = 8) -> torch.Tensor:
    """Packed tokens of the ``factor`` x ``factor``-pooled colours, with the hw token."""
    pooled = nn.functional.avg_pool2d(x, factor)
    h, w = pooled.shape[2:]
    tokens = pooled.repeat(1, dim // 3 + 1, 1, 1)[:, :dim].flatten(2).permute(0, 2, 1)
    hw = torch.zeros(x.shape[0], 1, dim)
    hw[:, 0, 0], hw[:, 0, 1] = h / 1024, w / 1024
    return torch.cat([tokens, hw], 1)


def scale_to_unit_variance(module: nn.Module, forward) -> None:
    """One forward pass in which each layer's first output is rescaled to std 1 (and its
    weights with it), so later layers see the rescaled values."""
    seen = set()

    def rescale(layer, _, output):
        if id(layer) in seen:
            return output
        seen.add(id(layer))
        std = output.std().item()
        with torch.no_grad():
            layer.weight.div_(std)
            if layer.bias is not None:
                layer.bias.div_(std)
        return output / std

    handles = [m.register_forward_hook(rescale) for m in module.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    with torch.no_grad():
        forward()
    for handle in handles:
        handle.remove()


def start_as_silu(module: nn.Module, gain: float = 1.7) -> None:
    """Give each layer feeding a Bezier activation the same weights (and zero bias) for its
    four control-point channels of every group of five, so the activation computes
    ``silu`` of that shared projection whatever its t channel says."""
    for sequence in (m for m in module.modules() if isinstance(m, nn.Sequential)):
        children = list(sequence.children())
        for layer, after in zip(children, children[1:]):
            if not (isinstance(after, BezierActivation)
                    and isinstance(layer, (nn.Conv2d, nn.Linear))):
                continue
            with torch.no_grad():
                groups = layer.weight.view(layer.weight.shape[0] // 5, 5,
                                           *layer.weight.shape[1:])
                fan_in = layer.weight[0].numel()
                shared = torch.randn_like(groups[:, 1]) * gain / fan_in ** 0.5
                groups[:, 1:] = shared.unsqueeze(1)
                if layer.bias is not None:
                    layer.bias.view(-1, 5)[:, 1:] = 0.0


def pass_through(layer: nn.Conv2d, gain: float) -> None:
    """``layer``'s control-point outputs: ``gain`` x the matching input channel (the centre
    2x2 taps averaged for 8x8 kernels, the centre tap otherwise), no bias."""
    with torch.no_grad():
        groups = layer.weight.view(layer.weight.shape[0] // 5, 5, *layer.weight.shape[1:])
        groups[:, 1:] = 0.0
        size = layer.weight.shape[-1]
        for f in range(min(groups.shape[0], groups.shape[2])):
            if size == 8:
                groups[f, 1:, f, 3:5, 3:5] = gain / 4
            else:
                groups[f, 1:, f, size // 2, size // 2] = gain
        if layer.bias is not None:
            layer.bias.view(-1, 5)[:, 1:] = 0.0


def start_as_pass_through(encoder: nn.Module, signal: float = 0.1, latent: float = 3.0
                          ) -> None:
    scale = 1.0
    for first, down in zip(encoder.encoder_first_step, encoder.encoder_z):
        pass_through(first[0], 2 * signal / scale)
        pass_through(down[0], 2.0)
        scale = signal
    pass_through(encoder.latent_proj[0][0], 2.0)
    pass_through(encoder.latent_proj[1][0], 2 * latent / signal)
    pass_through(encoder.mu_proj[0][0], 2 * signal / latent)
    pass_through(encoder.mu_proj[1][0], 2.0)


def option(options: list[str], name: str, default: float) -> float:
    return next((float(o[len(name) + 1:]) for o in options if o.startswith(f"{name}=")),
                default)


def main(steps: int, lr: float, options: list[str]) -> None:
    torch.manual_seed(0)
    dim, scales = int(option(options, "dim", 16)), int(option(options, "downscales", 3))
    encoder = FluxCompressor(d_model=dim, downscales=scales, attn_layers=1, attn_heads=2,
                             use_gradient_checkpointing=False)
    decoder = FluxExpander(d_model=dim, upscales=scales, use_gradient_checkpointing=False)
    if "silu_start" in options:
        start_as_silu(encoder)
    if "pass_through" in options:
        start_as_pass_through(encoder)
    if "deterministic" in options:
        encoder.reparameterize = lambda mu, logvar: mu
    encode = ((lambda x: oracle_tokens(x, dim, 2**scales)) if "oracle" in options else encoder)
    if "unit_variance" in options:
        first = images(range(16))
        scale_to_unit_variance(encoder, lambda: encoder(first))
        scale_to_unit_variance(decoder, lambda: decoder(encode(first)))
    groups = [{"params": list(decoder.parameters())}]
    if not {"oracle", "frozen_encoder"} & set(options):
        groups.append({"params": list(encoder.parameters()),
                       "lr": option(options, "encoder_lr", lr)})
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    held = images(HELD_OUT)

    def psnr() -> float:
        with torch.no_grad():
            out = decoder(encode(held)).clamp(-1, 1)
        mse = (((out - held) / 2) ** 2).mean(dim=(1, 2, 3))
        return round((10 * torch.log10(1 / mse)).mean().item(), 2)

    print("updates 0: held-out PSNR", psnr(), flush=True)
    order, start = np.random.default_rng(0), time.time()
    for update in range(1, steps + 1):
        x = images(order.integers(TRAIN.start, TRAIN.stop, BATCH))
        out = decoder(encode(x))
        loss = (out - x).abs().mean() + (out - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if update % 250 == 0:
            print(f"updates {update}: held-out PSNR {psnr()} ({time.time() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(",") if len(sys.argv) > 3
         else [])
