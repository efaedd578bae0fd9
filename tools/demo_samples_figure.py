"""Draw a run's held-out demo images above what its flow generates for their captions.

    python tools/demo_samples_figure.py RUN_DIR OUT.png [--samples 8] [--scale 3]

The generations are the ones ``fluxflow-jax evaluate`` scores (its fixed starting noise,
20 solver steps, no guidance), so the figure shows what the accuracies count. Each image
is enlarged ``--scale`` times without smoothing; the captions are printed, left to right.
README.md's and docs/learning.md's demo figures come from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

GAP = 6  # white pixels between images


def tiled(rows: list[np.ndarray], scale: int) -> np.ndarray:
    """Rows of uint8 images [N, H, W, 3], each enlarged ``scale`` times, with white gaps."""
    n, height, width, _ = rows[0].shape
    cell_h, cell_w = height * scale, width * scale
    canvas = np.full((len(rows) * (cell_h + GAP) - GAP, n * (cell_w + GAP) - GAP, 3), 255,
                     np.uint8)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            big = image.repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = r * (cell_h + GAP), c * (cell_w + GAP)
            canvas[top:top + cell_h, left:left + cell_w] = big
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run's output directory")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--samples", type=int, default=8, help="held-out samples drawn")
    parser.add_argument("--scale", type=int, default=3, help="enlargement of each image")
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    from PIL import Image

    from flow_position_probe import run_and_held_out
    from fluxflow_jax.evaluation.text_to_image import generated
    from fluxflow_jax.sampling import to_uint8

    models, held = run_and_held_out(args.run, args.samples)
    models.eval()
    images = generated(models, jnp.asarray(held.input_ids), jnp.asarray(held.attention_mask),
                       jnp.arange(len(held), dtype=jnp.int32),  # evaluate's noise
                       height=held.images.shape[1], width=held.images.shape[2])
    figure = tiled([to_uint8(held.images), to_uint8(images)], args.scale)
    Image.fromarray(figure).save(args.out)
    print("\n".join(f'{i + 1}. "{caption}"' for i, caption in enumerate(held.captions)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
