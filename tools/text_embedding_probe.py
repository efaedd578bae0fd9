"""What a run's text encoder tells the flow: a linear probe of its caption embeddings.

    python tools/text_embedding_probe.py RUN_DIR [--fresh SEED] [--train 2048] [--test 512]

The flow sees a caption only as the text encoder's one pooled embedding. For each caption
attribute of the demo data (background, shape colour, position, shape, size) this fits a
ridge regression from the embeddings of ``--train`` demo captions to the attribute (one-hot)
and prints how often it names the attribute of ``--test`` other captions. An attribute
the probe cannot read is one the flow can hardly draw. ``--fresh SEED`` probes a freshly
initialised text encoder of the run's architecture instead of the trained one.
docs/learning.md (section 2.2) records the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ATTRIBUTES = ("background", "colour", "position", "shape", "size")
RIDGE = 1e-3
BATCH = 256


def probe_accuracy(train_x: np.ndarray, train_labels: list[str], test_x: np.ndarray,
                   test_labels: list[str]) -> float:
    """Held-out accuracy of a ridge regression from features to one-hot labels."""
    classes = sorted(set(train_labels) | set(test_labels))
    targets = np.eye(len(classes))[[classes.index(label) for label in train_labels]]
    with_bias = lambda x: np.c_[x, np.ones(len(x))]  # noqa: E731
    a = with_bias(train_x)
    weights = np.linalg.solve(a.T @ a + RIDGE * np.eye(a.shape[1]), a.T @ targets)
    predicted = np.argmax(with_bias(test_x) @ weights, axis=1)
    return float(np.mean([classes[p] == label for p, label in zip(predicted, test_labels)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run's output directory")
    parser.add_argument("--fresh", type=int, default=None, metavar="SEED",
                        help="probe a freshly initialised text encoder instead")
    parser.add_argument("--train", type=int, default=2048, help="captions fitted")
    parser.add_argument("--test", type=int, default=512, help="captions scored")
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    from flax import nnx

    from fluxflow_jax.data.demo import DemoSource
    from fluxflow_jax.evaluation.checkpoint import recorded_data
    from fluxflow_jax.models.bundle import FluxFlowModels
    from fluxflow_jax.pipeline.export import run_models
    from fluxflow_jax.pipeline.setup import load_tokenizer

    data = recorded_data(args.run)
    if data is None:
        print(f"{args.run} records no training data", file=sys.stderr)
        return 2
    models = run_models(args.run)
    if args.fresh is not None:
        models = FluxFlowModels.create(models.config, nnx.Rngs(args.fresh), ("text_encoder",))
    encoder = models.eval().text_encoder
    source = DemoSource(args.train + args.test, data.img_size, seed=data.seed)
    scenes = [source.scene(i) for i in range(len(source))]
    ids, mask = load_tokenizer(data).encode(tuple(s.caption for s in scenes), data.max_length)
    embeddings = np.concatenate([
        np.asarray(encoder(jnp.asarray(ids[i:i + BATCH]), jnp.asarray(mask[i:i + BATCH])))
        for i in range(0, len(ids), BATCH)])
    for attribute in ATTRIBUTES:
        labels = [str(getattr(scene, attribute)) for scene in scenes]
        accuracy = probe_accuracy(embeddings[:args.train], labels[:args.train],
                                  embeddings[args.train:], labels[args.train:])
        print(f"{attribute:<10} {len(set(labels)):>3} values  probe accuracy {accuracy:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
