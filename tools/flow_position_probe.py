"""Can the flow tell where an image token sits? A probe of PyTorch fluxflow's own v060 flow
and of a trained fluxflow-jax run.

    python tools/flow_position_probe.py [RUN_DIR [--samples N]]

The flow's image tokens get positions only through rotary embeddings, which depend on the
distance between two tokens, not on where either one is. Everything else that could tell
a token its place is global or at the sequence's ends: the context mixed from the first
four tokens and added to all, the side branch that updates the first four, and the ends
of the sequence, where a token has neighbours on one side only. A flow that uses none of
these predicts for shifted input tokens the shifted prediction:
f(roll(x, k)) = roll(f(x), k) away from the ends. Generation from Gaussian noise tokens
gives such a flow nothing that says where a token lies, so it cannot put a shape where the
caption says: what it draws moves with the noise. A flow trained against encoded noise
images (``model.flow_noise``) gets positions from its noise, and its shift error shows
whether it learnt to use them.

The probe feeds Gaussian noise tokens on an 8x8 latent grid at timesteps 1.0 / 0.7 / 0.4
and prints, for shifts of 1 and 9 tokens (one cell right; one cell right and one down),
the mean |f(roll(x, k)) - roll(f(x), k)| over tokens at least 2k from either end,
relative to the mean |f(x)|: 0 for a flow blind to positions. Without RUN_DIR it probes
PyTorch ``fluxflow`` 0.8.1's v060 ``FluxFlowProcessor`` as initialised (the demo's
widths); with it, that run's trained flow and text encoder on its first held-out
captions, and then the background accuracy of its generations (as ``evaluate`` scores
them, on ``--samples`` held-out captions) for one-colour and two-tone backgrounds apart:
a flow blind to positions cannot paint the top half in one colour and the bottom half in
another. The numbers are recorded in docs/learning.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fluxflow_jax.evaluation.held_out import HeldOut
    from fluxflow_jax.models.bundle import FluxFlowModels

GRID, BATCH = 8, 8
TIMESTEPS = (1.0, 0.7, 0.4)
SHIFTS = (1, GRID + 1)

Flow = Callable[[np.ndarray, float], np.ndarray]  # noise tokens [B, T, D], t -> [B, T, D]


def shift_residuals(flow: Flow, width: int, seed: int = 0) -> dict[tuple[float, int], float]:
    """(t, shift) -> interior |f(roll x) - roll f(x)| / |f(x)| for noise tokens x."""
    x = np.random.default_rng(seed).standard_normal((BATCH, GRID * GRID, width))
    x = x.astype(np.float32)
    out = {}
    for t in TIMESTEPS:
        base = flow(x, t)
        for k in SHIFTS:
            diff = flow(np.roll(x, k, axis=1), t) - np.roll(base, k, axis=1)
            out[t, k] = float(np.abs(diff[:, 2 * k:-2 * k]).mean() / np.abs(base).mean())
    return out


def reference_flow(vae_dim: int = 16, flow_dim: int = 32, embed: int = 32) -> Flow:
    """PyTorch fluxflow's v060 flow at its initialisation, on random text embeddings."""
    import torch
    from fluxflow.models.v060.flow import FluxFlowProcessor

    torch.manual_seed(0)
    model = FluxFlowProcessor(d_model=flow_dim, vae_dim=vae_dim, embedding_size=embed,
                              n_head=2, n_layers=2).eval()
    text = torch.randn(BATCH, embed)
    hw = torch.zeros(BATCH, 1, vae_dim)
    hw[:, 0, :2] = GRID / 1024

    def run(tokens: np.ndarray, t: float) -> np.ndarray:
        packed = torch.cat([torch.from_numpy(tokens), hw], dim=1)
        with torch.no_grad():
            return model(packed, text, torch.full((BATCH,), t))[:, :-1].numpy()

    return run


def run_and_held_out(run_dir: Path, samples: int, *, training: bool = False
                     ) -> tuple[FluxFlowModels, HeldOut]:
    """A fluxflow-jax run's newest models and ``samples`` of its held-out data (of its
    first training samples with ``training``); exits with status 2 for a directory that
    records no data section."""
    import dataclasses

    from fluxflow_jax.evaluation.checkpoint import recorded_data
    from fluxflow_jax.evaluation.held_out import held_out
    from fluxflow_jax.pipeline.export import run_models
    from fluxflow_jax.pipeline.setup import load_tokenizer

    data = recorded_data(run_dir)
    if data is None:
        print(f"{run_dir} records no data section: give the output directory of a finished "
              "fluxflow-jax run", file=sys.stderr)
        raise SystemExit(2)
    source = dataclasses.replace(data, demo_samples=0) if training else data
    return run_models(run_dir), held_out(source, load_tokenizer(data), samples)


def trained_flow(models: FluxFlowModels, held: HeldOut) -> tuple[Flow, int]:
    """A trained flow on the first ``BATCH`` held-out captions, and its latent width."""
    import jax.numpy as jnp

    from fluxflow_jax.models.geometry import hw_token

    models.text_encoder.eval()
    models.flow_processor.eval()
    text = models.text_encoder(jnp.asarray(held.input_ids[:BATCH]),
                               jnp.asarray(held.attention_mask[:BATCH]))
    width = models.config.latent_width
    hw = hw_token(BATCH, GRID, GRID, width, models.config.max_hw, jnp.float32)

    def run(tokens: np.ndarray, t: float) -> np.ndarray:
        packed = jnp.concatenate([jnp.asarray(tokens), hw], axis=1)
        out = models.flow_processor(packed, text, jnp.full((BATCH,), t), hw=(GRID, GRID))
        return np.asarray(out[:, :-1])

    return run, width


def background_by_kind(models: FluxFlowModels, held: HeldOut
                       ) -> dict[str, tuple[int, float]]:
    """Background accuracy of the generations for one-colour and two-tone backgrounds:
    kind -> (held-out samples of that kind, share right)."""
    import jax.numpy as jnp

    from fluxflow_jax.evaluation import demo_scorer
    from fluxflow_jax.evaluation.text_to_image import generated
    from fluxflow_jax.sampling import to_uint8

    height, width = held.images.shape[1:3]
    images = to_uint8(generated(models, jnp.asarray(held.input_ids),
                                jnp.asarray(held.attention_mask),
                                jnp.arange(len(held), dtype=jnp.int32),  # evaluate's noise
                                height=height, width=width))
    out = {}
    for kind, tones in (("one-colour", 1), ("two-tone", 2)):
        chosen = [i for i, scene in enumerate(held.scenes) if len(scene.background) == tones]
        right = demo_scorer.accuracy([images[i] for i in chosen],
                                     [held.scenes[i] for i in chosen])["background"]
        out[kind] = len(chosen), right
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path,
                        help="a fluxflow-jax run; without it, PyTorch's initialised flow")
    parser.add_argument("--samples", type=int, default=32, help="held-out captions scored")
    args = parser.parse_args(argv)
    if args.run_dir:
        models, held = run_and_held_out(args.run_dir, args.samples)
        flow, width = trained_flow(models, held)
        print(f"trained flow of {args.run_dir}")
    else:
        flow, width = reference_flow(), 16
        print("PyTorch fluxflow 0.8.1 v060 FluxFlowProcessor, initialised")
    for (t, k), residual in shift_residuals(flow, width).items():
        print(f"t={t:.1f} shift {k}: |f(roll x) - roll f(x)| / |f(x)| = {residual:.4f}")
    if args.run_dir:
        for kind, (count, right) in background_by_kind(models, held).items():
            print(f"background right, {kind} backgrounds ({count} samples): {right:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
