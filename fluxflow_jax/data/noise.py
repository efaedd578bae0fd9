"""Synthetic Gaussian-noise images without captions: fluxflow-training's ``noise`` dataset.

A VAE step may train on pure noise (no semantic content) to test robustness. Each pixel is
a Gaussian draw of standard deviation ``noise_std``, clipped to [-3, 3] and mapped linearly
onto 0..255 (truncated to an integer), as the reference does. Unlike the reference, which
draws from the process's global generator, a sample is a function of (seed, index) alone,
so a resumed run reads the same images.
"""

from __future__ import annotations

import numpy as np

from fluxflow_jax.data.samples import RawSample

CLIP = 3.0  # standard deviations kept; the rest clipped


def noise_pixels(noise: np.ndarray) -> np.ndarray:
    """uint8 pixels of Gaussian ``noise``: clipped to [-3, 3], mapped onto 0..255 and
    truncated."""
    return ((np.clip(noise, -CLIP, CLIP) + CLIP) / (2 * CLIP) * 255).astype(np.uint8)


class NoiseSource:
    """``length`` noise images of ``height`` x ``width``, each with the empty caption."""

    captions_required = False  # the loader keeps the empty captions (a bad sample elsewhere)

    def __init__(self, length: int, height: int, width: int, noise_std: float = 1.0,
                 seed: int = 0):
        if length < 1 or min(height, width) < 1 or noise_std <= 0:
            raise ValueError(f"need length >= 1, positive dimensions and noise_std > 0; got "
                             f"{length}, {height}x{width}, {noise_std}")
        self.length, self.size, self.noise_std, self.seed = (length, (height, width),
                                                             noise_std, seed)

    def __len__(self) -> int:
        return self.length

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width): the same for every sample."""
        self._check(index)
        return self.size

    def _check(self, index: int) -> None:
        if not 0 <= index < self.length:
            raise IndexError(f"noise index {index} out of range [0, {self.length})")

    def __getitem__(self, index: int) -> RawSample:
        self._check(index)
        rng = np.random.default_rng([self.seed, index])
        noise = rng.standard_normal((*self.size, 3)) * self.noise_std
        return RawSample(key=f"noise/{index}", image=noise_pixels(noise), caption="")
