"""The PyTorch side of ``tools/bench.py``: one batch of the reference trainers' work, on the
real ``fluxflow`` 0.8.1 v030 networks.

The order of operations is the reference trainer's, not a
tuned PyTorch rewrite, because that is what fluxflow-jax replaces:

- VAE-GAN: the discriminator step (the encoder and decoder run again under no_grad for the
  fakes, instance noise, hinge loss, R1 with ``create_graph`` every ``r1_interval`` batches,
  AdamW), then the generator step (training forward of the encoder, a decoder forward for
  the reconstruction and a second one on the detached latent for the adversarial term,
  frequency-aware L1 + MSE + LPIPS, KL, adaptive weights, backward, clip, AdamW), EMA and
  scheduler steps.
- Flow: the text encoder forward (trained, dropout on), the frozen compressor's sampled
  latents under no_grad, cos^2 timesteps, VP noising, the flow processor on t/999, the MSE
  v-loss, backward, clip of the flow processor's gradients, Lion and AdamW steps, EMA and
  scheduler steps.

Each step runs on the given ``device`` (CUDA when the bench finds one), and with ``bf16``
its forward passes run under ``torch.autocast(dtype=torch.bfloat16)``: PyTorch's mixed
precision, float32 weights and optimizer states, as fluxflow-jax's ``precision: bf16``.

Option values (loss weights, R1 interval, EMA decays) are read from fluxflow-jax's own
``VAEOptions`` / ``FlowOptions`` so both sides run with the same settings. Where 0.2.1 and
0.8.1 differ, the 0.8.1 behaviour fluxflow-jax follows is used: instance noise is really
added, the flow processor gets t/999 as a float, adaptive weights are clamped to 5.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lion_pytorch import Lion
from torch import nn

from fluxflow_jax.models import FluxFlowConfig
from fluxflow_jax.training import FlowOptions, VAEOptions
from fluxflow_jax.training.diffusion import alphas_cumprod, timestep_log_weights
from fluxflow_jax.training.lpips import SCALE, SHIFT, TAP_CHANNELS, VGG_BLOCKS, weight_shapes

# The builders of the reference networks live with the parity tests; tests/ is not a package,
# so it goes on the path to share them instead of keeping a second copy that could drift.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch_reference as ref

Metrics = dict[str, float]
Network = Callable[..., torch.Tensor]


class TorchLPIPS(nn.Module):
    """``lpips.LPIPS(net="vgg")`` v0.1 with random frozen weights (speed only, no accuracy).

    Layer shapes come from fluxflow-jax's weights-file contract, so both sides run the same
    VGG16; the weights are He-normal like fluxflow-jax's random LPIPS. As in lpips, the
    prediction and the target take separate passes and the parameters need no gradient.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        shapes, gen = weight_shapes(), torch.Generator().manual_seed(seed)
        blocks = []
        for b, widths in enumerate(VGG_BLOCKS, start=1):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if b > 1 else []
            for i in range(1, len(widths) + 1):
                kh, kw, cin, cout = shapes[f"vgg.conv{b}_{i}.kernel"]
                conv = nn.Conv2d(cin, cout, (kh, kw), padding=1)
                with torch.no_grad():
                    conv.weight.normal_(0.0, math.sqrt(2.0 / (kh * kw * cin)), generator=gen)
                    conv.bias.zero_()
                layers += [conv, nn.ReLU(inplace=True)]  # torchvision's VGG is in place too
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        for tap, channels in enumerate(TAP_CHANNELS):
            head = torch.rand(shapes[f"lin{tap}.weight"], generator=gen) * (2.0 / channels)
            self.register_buffer(f"lin{tap}", head.view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for block in self.blocks:
            x = block(x)
            taps.append(x)
        return taps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[B] distances of NCHW images in [-1, 1]."""
        feats_pred = self._taps((pred - self.shift) / self.scale)
        feats_target = self._taps((target - self.shift) / self.scale)
        total = pred.new_zeros(pred.shape[0])
        for tap, (fp, ft) in enumerate(zip(feats_pred, feats_target, strict=True)):
            fp, ft = fp.float(), ft.float()  # normalised differences in float32
            fp = fp / (fp.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ft = ft / (ft.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((fp - ft) ** 2 * getattr(self, f"lin{tap}")).sum(1).mean((1, 2))
        return total


class EMA:
    """The reference's EMA: every floating-point entry of the modules' state dicts (buffers
    included) moves towards the live value, in one fused foreach call."""

    def __init__(self, modules: list[nn.Module], decay: float):
        self.live = [v for m in modules for v in m.state_dict().values()
                     if v.is_floating_point()]
        self.shadow = [v.detach().clone() for v in self.live]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [v.detach() for v in self.live], 1.0 - self.decay)


class LossHistory:
    """Adaptive loss balancing as fluxflow-jax does it (0.8.1 clamp, |mean| of the last 100
    values per loss), on Python floats as the reference keeps them."""

    def __init__(self, count: int, window: int = 100, max_weight: float = 5.0):
        self.values = [deque(maxlen=window) for _ in range(count)]
        self.max_weight = max_weight

    def push_and_weights(self, losses: list[float]) -> list[float]:
        for buffer, loss in zip(self.values, losses, strict=True):
            buffer.append(loss)
        magnitudes = [abs(sum(b) / len(b)) if b else 0.0 for b in self.values]
        seen = [a for a in magnitudes if a > 0]
        target = sum(seen) / len(seen) if seen else 0.0
        return [min(max(target / (a + 1e-8), 0.0), self.max_weight) if a > 0 else 1.0
                for a in magnitudes]


def frequency_l1(pred: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """L1 of the 3x3 low-pass parts (zero padding counted) + alpha * L1 of the residuals."""
    low_pred = F.avg_pool2d(pred, 3, stride=1, padding=1, count_include_pad=True)
    low_target = F.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=True)
    low = F.l1_loss(low_pred, low_target)
    return low + alpha * F.l1_loss(pred - low_pred, target - low_target)


def value(t: torch.Tensor) -> float:
    """A scalar as a Python float, as the reference logs its losses (a host sync on GPU)."""
    return t.detach().item()


def per_sample(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().flatten(1).mean(1)


def grad_norm(params: list[nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                       for g in grads]))) if grads else 0.0


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, floor: float
                    ) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """fluxflow-jax's default per-group schedule: cosine to ``floor`` x the base LR."""
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps,
                                                      eta_min=base * floor)


def maybe_compile(module: nn.Module, compiled: bool) -> Network:
    """The module itself, or ``torch.compile(module)`` (default mode; shares parameters)."""
    return torch.compile(module) if compiled else module


def text_encoder(config: FluxFlowConfig, seed: int) -> nn.Module:
    """fluxflow's ``BertTextEncoder`` with a DistilBERT of ``config``'s sizes.

    ``ref.text_encoder`` swaps in a smaller DistilBERT after construction, but the head's
    first Linear was already built for the default 768-wide backbone; it is rebuilt here the
    way ``BertTextEncoder.__init__`` builds it (hidden size -> 2560, Xavier-uniform, zero
    bias), so a narrow ``text_dim`` works.
    """
    model = ref.text_encoder(config, seed)
    first = model.ouput_layer[0]
    if first.in_features != config.text_dim:
        model.ouput_layer[0] = nn.Linear(config.text_dim, first.out_features)
        nn.init.xavier_uniform_(model.ouput_layer[0].weight)
        nn.init.zeros_(model.ouput_layer[0].bias)
    return model


def parameter_count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def mixed_precision(device: torch.device, bf16: bool) -> Callable[[], torch.autocast]:
    """The context the forward passes run in (backward passes run outside it, as PyTorch
    recommends): bfloat16 autocast, disabled for float32."""
    return partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)


class VAEGANStep:
    """The reference VAE-GAN batch: discriminator step, then generator step.

    With ``compiled`` the compressor, the expander and LPIPS run through ``torch.compile``;
    the discriminator stays eager (``COMPILE_NOTE``).
    """

    COMPILE_NOTE = ("discriminator left eager: compiled, its two train-mode calls before one "
                    "backward fail (torch.nn.utils.spectral_norm's in-place power-iteration "
                    "update of u invalidates the first call's saved tensors: 'modified by an "
                    "inplace operation'); its R1 pass (double backward) would need eager anyway")

    def __init__(self, config: FluxFlowConfig, options: VAEOptions, lr: float,
                 total_steps: int, compiled: bool, seed: int = 0, *,
                 device: torch.device = torch.device("cpu"), bf16: bool = False):
        torch.manual_seed(seed)
        self.options = options
        self.autocast = mixed_precision(device, bf16)
        self.compressor = ref.compressor(config).train().to(device)
        self.expander = ref.expander(config).train().to(device)
        self.discriminator = ref.discriminator(config, seed).train().to(device)
        self.lpips = TorchLPIPS(seed).to(device)
        self.encode = maybe_compile(self.compressor, compiled)
        self.decode = maybe_compile(self.expander, compiled)
        self.discriminate = self.discriminator  # eager: COMPILE_NOTE
        self.perceptual = maybe_compile(self.lpips, compiled)
        self.vae_params = [*self.compressor.parameters(), *self.expander.parameters()]
        self.disc_params = list(self.discriminator.parameters())
        self.opt_vae = torch.optim.AdamW(self.vae_params, lr=lr, weight_decay=0.01)
        self.opt_disc = torch.optim.AdamW(self.disc_params, lr=lr, weight_decay=0.01)
        self.schedulers = [cosine_schedule(self.opt_vae, total_steps, 0.1),
                           cosine_schedule(self.opt_disc, total_steps, 0.1)]
        self.ema = EMA([self.compressor, self.expander], options.ema_decay or 0.0)
        self.history = LossHistory(3)

    def parameter_count(self) -> int:
        return parameter_count([self.compressor, self.expander, self.discriminator])

    def __call__(self, images: torch.Tensor, step: int) -> Metrics:
        """One batch; ``step`` is the 1-based global step (R1 when divisible by the
        interval, noise and KL warm-up read it)."""
        metrics = {"loss_disc": self._discriminator_step(images, step)}
        metrics.update(self._generator_step(images, step))
        if self.options.ema_decay is not None:
            self.ema.update()
        metrics["grad_norm_disc"] = grad_norm(self.disc_params)  # includes the G-step grads
        for scheduler in self.schedulers:
            scheduler.step()
        return metrics

    def _discriminator_step(self, real: torch.Tensor, step: int) -> float:
        o = self.options
        with torch.no_grad(), self.autocast():  # the fakes: encoder + decoder forward one
            packed = self.encode(real)
            fake = self.decode(packed, use_context=o.train_spade).float()
            context = packed[:, :-1].mean(1)
        self.opt_disc.zero_grad(set_to_none=True)
        sigma = o.instance_noise_std * o.instance_noise_decay ** step
        noisy_real = real + sigma * torch.randn_like(real)
        noisy_fake = fake + sigma * torch.randn_like(fake)
        r1 = real.new_zeros(())
        with self.autocast():
            if step % o.r1_interval == 0:
                noisy_real.requires_grad_(True)
                _, real_logits = self.discriminate(noisy_real, context)
                (grads,) = torch.autograd.grad(per_sample(real_logits).sum(), noisy_real,
                                               create_graph=True)
                r1 = grads.float().pow(2).flatten(1).sum(1).mean()
            else:
                _, real_logits = self.discriminate(noisy_real, context)
            _, fake_logits = self.discriminate(noisy_fake, context)
        hinge = (F.relu(1 - per_sample(real_logits)).mean()
                 + F.relu(1 + per_sample(fake_logits)).mean())
        loss = hinge + 0.5 * o.r1_gamma * r1
        loss.backward()
        self.opt_disc.step()  # no clipping and no NaN check for D, as the reference
        return value(loss)

    def _generator_step(self, real: torch.Tensor, step: int) -> Metrics:
        o = self.options
        self.opt_vae.zero_grad(set_to_none=True)
        with self.autocast():
            packed, mu, logvar = self.encode(real, training=True)  # encoder forward two
            recon_images = self.decode(packed, use_context=o.train_spade).float()  # decoder 2
            lpips = self.perceptual(recon_images, real).mean()
            latent = packed.detach()  # the adversarial term: decoder forward number three
            _, logits = self.discriminate(self.decode(latent, use_context=o.train_spade),
                                          latent[:, :-1].mean(1))
        mu, logvar = mu.float(), logvar.float()
        l1 = frequency_l1(recon_images, real, o.frequency_alpha)
        mse = F.mse_loss(recon_images, real)
        recon = l1 + o.mse_weight * mse + o.lambda_lpips * lpips
        kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).clamp_min(o.kl_free_bits)
        kl = kl.flatten(1).sum(1).mean()
        progress = min(max(step / o.kl_warmup_steps, 0.0), 1.0) if o.kl_warmup_steps else 1.0
        beta = o.kl_beta * (1 - math.cos(math.pi * progress)) / 2
        gen = o.lambda_adv * -per_sample(logits).mean()
        weights = self.history.push_and_weights([value(recon), value(kl), value(gen)])
        total = weights[0] * recon + weights[1] * beta * kl + weights[2] * gen
        if not torch.isfinite(total):
            return {"skipped": 1.0}
        total.backward()  # D is not frozen: its .grad collects the G term too, as the reference
        norm = torch.nn.utils.clip_grad_norm_(self.vae_params, 1.0)
        self.opt_vae.step()
        return {"loss_recon": value(recon), "loss_kl": value(kl), "loss_gen": value(gen),
                "loss_lpips": value(lpips), "grad_norm_vae": value(norm), "skipped": 0.0}


class FlowStep:
    """The reference flow batch: text encoder + flow processor trained, compressor frozen."""

    def __init__(self, config: FluxFlowConfig, options: FlowOptions, flow_lr: float,
                 text_lr: float, total_steps: int, compiled: bool, seed: int = 0, *,
                 device: torch.device = torch.device("cpu"), bf16: bool = False):
        torch.manual_seed(seed)
        self.options = options
        self.autocast = mixed_precision(device, bf16)
        self.compressor = ref.compressor(config).eval().to(device)
        self.compressor.requires_grad_(False)
        self.flow = ref.flow_processor(config).train().to(device)
        self.text_encoder = text_encoder(config, seed).train().to(device)
        self.encode = maybe_compile(self.compressor, compiled)
        self.predict = maybe_compile(self.flow, compiled)
        self.embed = maybe_compile(self.text_encoder, compiled)
        self.flow_params = list(self.flow.parameters())
        self.text_params = list(self.text_encoder.parameters())
        self.opt_flow = Lion(self.flow_params, lr=flow_lr, betas=(0.9, 0.95), weight_decay=0.01,
                             decoupled_weight_decay=True)
        self.opt_text = torch.optim.AdamW(self.text_params, lr=text_lr, betas=(0.9, 0.99),
                                          weight_decay=0.01)
        self.schedulers = [cosine_schedule(self.opt_flow, total_steps, 0.1),
                           cosine_schedule(self.opt_text, total_steps, 0.001)]
        self.ema = EMA([self.flow, self.text_encoder], options.ema_decay or 0.0)
        self.alpha_bar = torch.from_numpy(alphas_cumprod()).to(device)
        self.time_weights = torch.from_numpy(np.exp(timestep_log_weights())).to(device)
        self.model_time = torch.from_numpy((np.arange(1000) / 999).astype(np.float32)).to(device)

    def parameter_count(self) -> int:
        return parameter_count([self.flow, self.text_encoder])

    def __call__(self, images: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> Metrics:
        self.opt_flow.zero_grad(set_to_none=True)
        self.opt_text.zero_grad(set_to_none=True)
        with self.autocast():
            embeddings = self.embed(input_ids, attention_mask)
            with torch.no_grad():
                packed = self.encode(images)  # training=False still samples the latent
            x0, hw = packed[:, :-1].float(), packed[:, -1:].float()
            t = torch.multinomial(self.time_weights, x0.shape[0], replacement=True)
            noise = torch.randn_like(x0)
            alpha = self.alpha_bar[t].sqrt().view(-1, 1, 1)
            sigma = (1 - self.alpha_bar[t]).sqrt().view(-1, 1, 1)
            noisy = torch.cat([alpha * x0 + sigma * noise, hw], 1)
            prediction = self.predict(noisy, embeddings, self.model_time[t])[:, :-1].float()
        loss = F.mse_loss(prediction, alpha * noise - sigma * x0)
        if not torch.isfinite(loss):
            return {"skipped": 1.0}
        loss.backward()
        flow_norm = torch.nn.utils.clip_grad_norm_(self.flow_params, 1.0)  # flow only
        text_norm = grad_norm(self.text_params)
        self.opt_flow.step()
        self.opt_text.step()
        if self.options.ema_decay is not None:
            self.ema.update()
        for scheduler in self.schedulers:
            scheduler.step()
        return {"flow_loss": value(loss), "grad_norm_flow": value(flow_norm),
                "grad_norm_text": text_norm, "pred_mean": value(prediction.mean()),
                "pred_std": value(prediction.std()), "skipped": 0.0}
