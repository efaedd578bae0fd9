"""Decoded images per second through the host loader, for every data source.

    python tools/bench_data.py [--images 512] [--size 256] [--workers 2] [--train-step]

Writes the same procedural images as JPEG files (folder + captions), WebDataset tar shards
and a TFDS ArrayRecord dataset (when tensorflow-datasets is installed) into a temporary
directory, then times one epoch of ``DataLoader`` over each, after a warm-up batch. With
``--train-step`` it also times the tiny VAE-GAN train step of the README on CPU, to show
whether the loader keeps ahead of it.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fluxflow_jax.data import (CaptionedFolder, DataLoader, DemoSource, LoaderConfig,
                               Tokenizer, WebDatasetSource)


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_folder(demo: DemoSource, root: Path) -> CaptionedFolder:
    lines = []
    for index in range(len(demo)):
        sample = demo[index]
        (root / f"{index:06d}.jpg").write_bytes(jpeg(sample.image))
        lines.append(f"{index:06d}.jpg\t{sample.caption}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return CaptionedFolder(root, root / "captions.tsv")


def write_shards(demo: DemoSource, root: Path, per_shard: int = 128) -> WebDatasetSource:
    for start in range(0, len(demo), per_shard):
        with tarfile.open(root / f"shard-{start // per_shard:04d}.tar", "w") as tar:
            for index in range(start, min(start + per_shard, len(demo))):
                sample = demo[index]
                for suffix, payload in (("jpg", jpeg(sample.image)),
                                        ("txt", sample.caption.encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return WebDatasetSource(str(root / "shard-*.tar"), image_key="jpg", caption_key="txt",
                            samples_per_shard=per_shard, samples_per_epoch=len(demo))


def write_tfds(demo: DemoSource, root: Path):
    """A TFDS ArrayRecord dataset of the demo images, or None without tensorflow-datasets."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    from fluxflow_jax.data import TFDSSource

    class FluxflowBenchImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index in range(len(demo)):
                sample = demo[index]
                yield index, {"image": jpeg(sample.image), "caption": sample.caption}

    FluxflowBenchImages(data_dir=root, file_format="array_record").download_and_prepare()
    return TFDSSource("fluxflow_bench_images", data_dir=str(root))


def throughput(source, tokenizer: Tokenizer, config: LoaderConfig) -> tuple[float, float]:
    """(seconds to the first batch, images per second after it)."""
    start = time.perf_counter()
    batches = DataLoader(source, tokenizer, config).epoch(0)
    next(batches)  # includes planning / header scans, the thread pool, first decodes
    first = time.perf_counter() - start
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += batch.images.shape[0]
    return first, count / (time.perf_counter() - start)


def train_step_images_per_second(batch_size: int = 4, size: int = 64, steps: int = 10) -> float:
    """The README's tiny VAE-GAN step on this machine (compiled first)."""
    import jax
    from flax import nnx

    from fluxflow_jax.models import FluxFlowConfig, FluxFlowModels
    from fluxflow_jax.training import StageConfig, TrainStep, VAEOptions

    config = FluxFlowConfig(vae_dim=16, downscales=2, upscales=2, vae_attn_layers=1,
                            flow_dim=16, flow_attn_heads=2, flow_transformer_layers=1,
                            text_embed_dim=16, disc_base_channels=8, disc_depth=2)
    models = FluxFlowModels.create(config, nnx.Rngs(0))
    adamw = {"type": "AdamW", "lr": 1e-4}
    step = TrainStep(models, StageConfig(vae=VAEOptions(use_lpips=False), total_steps=100,
                                         optimizers={"vae": adamw, "discriminator": adamw}))
    state = step.init_state(models)
    images = np.zeros((batch_size, size, size, 3), np.float32)
    state, metrics = step(state, {"images": images}, jax.random.key(0))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for n in range(steps):
        state, metrics = step(state, {"images": images}, jax.random.key(n))
    jax.block_until_ready(metrics)
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256, help="training image size (px)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-step", action="store_true")
    args = parser.parse_args()

    tokenizer = Tokenizer.load()
    demo = DemoSource(length=args.images, image_size=args.size, aspect_ratios=(1.0, 1.5))
    config = LoaderConfig(batch_size=args.batch_size, image_size=args.size,
                          workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("folder", "shards", "tfds"):
            (root / name).mkdir()
        sources = {"demo (rendered)": demo,
                   "folder + captions (JPEG)": write_folder(demo, root / "folder"),
                   "WebDataset (JPEG shards)": write_shards(demo, root / "shards"),
                   "TFDS ArrayRecord (JPEG)": write_tfds(demo, root / "tfds")}
        print(f"{args.images} images, {args.size} px, batch {args.batch_size}, "
              f"{args.workers} workers")
        for name, source in sources.items():
            if source is None:
                print(f"  {name:28s} skipped (pip install -e '.[tfds]')")
                continue
            first, rate = throughput(source, tokenizer, config)
            print(f"  {name:28s} {rate:8.0f} images/s   first batch {first:5.2f} s")
    if args.train_step:
        print(f"tiny VAE-GAN train step (64 px, batch 4): "
              f"{train_step_images_per_second():.0f} images/s")


if __name__ == "__main__":
    main()
