"""The held-out samples evaluation runs on: data the run never trained on.

For the built-in demo data these are the indices past the training range: the dataset is
a function of (seed, index), so ``demo_samples + k`` is as much a sample of it as any
training index, yet no epoch ever reads it. Other sources have no held-out share yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from fluxflow_jax.data import DataConfigError, DemoSource
from fluxflow_jax.data.demo import Scene, render
from fluxflow_jax.data.images import to_array
from fluxflow_jax.data.loader import Tokenizer
from fluxflow_jax.pipeline.config import DataConfig


class HeldOutError(DataConfigError):
    """The configured data has no held-out samples to evaluate on."""


@dataclass(frozen=True)
class HeldOut:
    """Held-out images with their captions, tokenised; the demo scenes they were drawn
    from (what the text-to-image scorer checks)."""

    images: np.ndarray  # float32 [N, H, W, 3] in [-1, 1]
    input_ids: np.ndarray  # int32 [N, L]
    attention_mask: np.ndarray  # bool [N, L]
    captions: tuple[str, ...]
    scenes: tuple[Scene, ...]

    def __len__(self) -> int:
        return len(self.captions)


def held_out(data: DataConfig, tokenizer: Tokenizer, count: int | None = None) -> HeldOut:
    """``count`` held-out samples (default ``data.validation_samples``) of ``data``."""
    count = data.validation_samples if count is None else count
    if not data.use_demo:
        raise HeldOutError("evaluation needs held-out data, which only the built-in demo "
                           "data (data.use_demo: true) provides so far")
    if count < 1:
        raise HeldOutError(f"evaluation needs at least one held-out sample, got {count} "
                           "(data.validation_samples or --samples)")
    first = data.demo_samples
    source = DemoSource(length=first + count, image_size=data.img_size, seed=data.seed)
    scenes = tuple(source.scene(index) for index in range(first, first + count))
    images = np.stack([to_array(Image.fromarray(render(scene))) for scene in scenes])
    captions = tuple(scene.caption for scene in scenes)
    input_ids, attention_mask = tokenizer.encode(captions, data.max_length)
    return HeldOut(images=images, input_ids=input_ids,
                   attention_mask=attention_mask, captions=captions, scenes=scenes)
