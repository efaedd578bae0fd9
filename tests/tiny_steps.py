"""A VAE-GAN stage and the images the step tests train it on. Tests that run this same step
on the tiny model load its program from the compilation cache instead of compiling it."""

import numpy as np

from fluxflow_jax.training import StageConfig, VAEOptions

ADAM = {"type": "Adam", "lr": 2e-3}
CONSTANT = {"type": "ConstantLR", "factor": 1.0}
PLATEAU = {"type": "ReduceLROnPlateau", "patience": 2, "factor": 0.5}


def smooth_images() -> np.ndarray:
    """Two 32x32 images of smooth colour gradients in [-0.8, 0.8]."""
    y, x = np.mgrid[0:32, 0:32] / 31.0
    images = [np.stack([np.sin(3 * x + p), np.cos(2 * y - p), 2 * x * y - 1], -1)
              for p in (0.0, 1.0)]
    return (0.8 * np.stack(images)).astype(np.float32)


IMAGES = smooth_images()
VAE_GAN = StageConfig(
    vae=VAEOptions(use_lpips=False, r1_interval=4, kl_warmup_steps=10),
    optimizers={"vae": ADAM, "discriminator": {"type": "Adam", "lr": 2e-4}},
    schedulers={"vae": CONSTANT, "discriminator": PLATEAU}, total_steps=30)
