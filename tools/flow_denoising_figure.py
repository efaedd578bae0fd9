"""What a run's flow predicts in one step from noised latents of demo images: the clean
image it infers at each timestep, beside the image and its reconstruction.

    python tools/flow_denoising_figure.py RUN_DIR OUT.png [--samples 12] [--training]
        [--timesteps 200,500,800,950] [--scale 2]

Rows, top to bottom: the images, their reconstructions, then for each timestep t the
decoded one-step estimate x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v of the flow (x_t: the
images' latent tokens noised at t with the noise evaluation fixes per sample). Where the
noise drowns a shape (large t), only the caption can tell the flow to draw it, so a shape
that fades from the rows as t grows is one the flow does not read from the caption.
``--training`` takes the run's first training samples instead of held-out ones, to tell
failing to generalise from failing to fit. Prints, per timestep, the tokens' mean squared
error against the clean tokens and what the demo scorer reads in the decoded estimates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax

DEFAULT_TIMESTEPS = "200,500,800,950"


def clean_estimate(noised: jax.Array, velocity: jax.Array, t: int) -> jax.Array:
    """The clean tokens a v-prediction implies: sqrt(a_t) x_t - sqrt(1 - a_t) v."""
    from fluxflow_jax.training.diffusion import alphas_cumprod

    alpha_bar = float(alphas_cumprod()[t])
    return alpha_bar**0.5 * noised - (1 - alpha_bar) ** 0.5 * velocity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run's output directory")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--samples", type=int, default=12, help="demo samples drawn")
    parser.add_argument("--training", action="store_true",
                        help="the run's first training samples instead of held-out ones")
    parser.add_argument("--timesteps", default=DEFAULT_TIMESTEPS,
                        help=f"comma-separated timesteps in [0, 999] (default {DEFAULT_TIMESTEPS})")
    parser.add_argument("--scale", type=int, default=2, help="enlargement of each image")
    args = parser.parse_args(argv)
    timesteps = [int(t) for t in args.timesteps.split(",")]

    import jax
    import jax.numpy as jnp
    from PIL import Image

    from demo_samples_figure import tiled
    from flow_position_probe import run_and_held_out
    from fluxflow_jax.evaluation import demo_scorer
    from fluxflow_jax.evaluation.text_to_image import fixed_starting_noise
    from fluxflow_jax.sampling import latent_grid, to_uint8
    from fluxflow_jax.training.diffusion import add_noise, model_time

    models, held = run_and_held_out(args.run, args.samples, training=args.training)
    models.eval()
    grid = latent_grid(models.config, *held.images.shape[1:3])
    encoded = models.compressor.encode(jnp.asarray(held.images), key=jax.random.key(0)).packed
    clean, hw = encoded[:, :-1], encoded[:, -1:]
    noise = fixed_starting_noise(models, jnp.arange(args.samples), grid)  # evaluate's, by place
    text = models.text_encoder(jnp.asarray(held.input_ids), jnp.asarray(held.attention_mask))

    def decoded(tokens: jax.Array) -> jax.Array:
        return to_uint8(models.expander(jnp.concatenate([tokens, hw], axis=1), hw=grid))

    rows = [to_uint8(held.images), decoded(clean)]
    for t in timesteps:
        step = jnp.full((args.samples,), t)
        noised = add_noise(clean, noise, step)
        v = models.flow_processor(jnp.concatenate([noised, hw], axis=1), text,
                                  model_time(step), hw=grid)[:, :-1]
        estimate = clean_estimate(noised, v, t)
        rows.append(decoded(estimate))
        error = float(jnp.mean((estimate - clean) ** 2))
        scores = demo_scorer.accuracy(list(rows[-1]), held.scenes)
        print(f"t={t:3d}  token mse {error:.4f}  " + "  ".join(
            f"{name} {value:.0%}" for name, value in scores.items()))
    print(f"clean tokens' variance {float(jnp.var(clean)):.4f}")
    Image.fromarray(tiled(rows, args.scale)).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
