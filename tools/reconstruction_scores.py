"""How much of a caption survives the autoencoder? The demo scorer on reconstructions.

    python tools/reconstruction_scores.py RUN_DIR [--samples N]

Generated images are decoded by the same expander, so the caption-attribute accuracies of
the run's reconstructions of its held-out images (mean latents) bound what its flow can
score: a shape the autoencoder blurs into the background cannot be drawn either. Prints
the background, shape-colour and position accuracies of the reconstructions and their
PSNR; the numbers are recorded in docs/learning.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from fluxflow_jax.evaluation import demo_scorer
from fluxflow_jax.evaluation.checkpoint import recorded_data
from fluxflow_jax.evaluation.held_out import held_out
from fluxflow_jax.evaluation.image_metrics import psnr
from fluxflow_jax.pipeline.export import run_models
from fluxflow_jax.pipeline.setup import load_tokenizer
from fluxflow_jax.sampling import to_uint8


def reconstruction_scores(run_dir: Path, samples: int) -> dict[str, float]:
    """Accuracies of the mean-latent reconstructions of ``samples`` held-out images, and
    their mean PSNR."""
    models, data = run_models(run_dir), recorded_data(run_dir)
    held = held_out(data, load_tokenizer(data), samples)
    images = jnp.asarray(held.images)
    hw = models.compressor.latent_shape(*images.shape[1:3])
    zero_noise = jnp.zeros((len(held), *hw, models.config.vae_dim))
    packed = models.compressor.encode(images, noise=zero_noise).packed
    decoded = jnp.clip(models.expander(packed, hw=hw), -1.0, 1.0)
    scores = demo_scorer.accuracy(list(to_uint8(decoded)), held.scenes)
    return scores | {"psnr": float(np.mean(psnr(decoded, images)))}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a fluxflow-jax run directory")
    parser.add_argument("--samples", type=int, default=64, help="held-out images scored")
    args = parser.parse_args(argv)
    for name, value in reconstruction_scores(args.run_dir, args.samples).items():
        print(f"{name}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
