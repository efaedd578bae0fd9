"""Images written during training, from the same inputs and noise every time, so that they
compare over the run: reconstructions of fixed images (with and without the decoder's SPADE
context) and text-to-image for fixed captions, as the modes table says for the stage (VAE
stages: reconstructions; flow stages: text-to-image).

Files go to ``<output_path>/samples/`` as ``sample_<step>_epoch_<N>_batch_<M>_<variant>.png``
(variant ``vae``, or the generated size ``<W>x<H>``).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from fluxflow_jax.atomic import atomic_write
from fluxflow_jax.data import BadSampleError, DataLoader, RawSample
from fluxflow_jax.data.images import fixed_size, to_array
from fluxflow_jax.data.samples import decode_image
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.pipeline.config import ConfigError, OutputConfig, RunConfig
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.sampling import generate, latent_grid, to_uint8
from fluxflow_jax.training import modes

log = logging.getLogger(__name__)
FIXED_IMAGES = 2  # reconstructed when output.test_image_address names none
SAMPLE_SEED = 1234  # the noise of every sample


@nnx.jit(static_argnames=("use_context", "hw"))
def _reconstruct(compressor: nnx.Module, expander: nnx.Module, images: jax.Array,
                 key: jax.Array, use_context: bool, hw: tuple[int, int]) -> jax.Array:
    return expander(compressor(images, key=key), use_context=use_context, hw=hw)


def _sizes(config: RunConfig) -> list[tuple[int, int]]:
    """(height, width) of each configured sample size (default: the training size)."""
    out = []
    for size in config.output.sample_sizes or [config.data.img_size]:
        if isinstance(size, str):
            width, height = (int(v) for v in size.split("x"))
        elif isinstance(size, (list, tuple)):
            width, height = size
        else:
            width = height = size
        out.append((height, width))
    return out


def samples_enabled(output: OutputConfig) -> bool:
    return not output.no_samples and output.samples_per_checkpoint > 0


def sample_sizes(config: RunConfig, model: FluxFlowConfig) -> list[tuple[int, int]]:
    """The text-to-image sample sizes, (height, width); ``ConfigError`` naming a size the
    model cannot generate."""
    sizes = _sizes(config)
    for height, width in sizes:
        try:
            latent_grid(model, height, width)
        except ValueError as err:
            raise ConfigError([f"output.sample_sizes: {width}x{height}: {err}"]) from None
    return sizes


class Samples:
    """Writes a stage's samples; ``write`` takes the models holding the weights to show."""

    def __init__(self, config: RunConfig, loader: DataLoader, model: FluxFlowConfig):
        self.directory = Path(config.output.output_path) / "samples"
        self.steps = config.output.sample_steps
        self.sizes = sample_sizes(config, model)
        self.images = self._fixed_images(config, loader)
        captions = list(config.output.sample_captions)
        self.tokens = loader.tokenizer.encode(captions, config.data.max_length) \
            if captions else None

    @staticmethod
    def _fixed_images(config: RunConfig, loader: DataLoader) -> np.ndarray | None:
        """[N, S, S, 3] in [-1, 1]: the configured test images, else the source's first."""
        if config.output.test_image_address:
            samples = [RawSample(p, Path(p), "") for p in config.output.test_image_address]
        elif hasattr(loader.source, "__getitem__"):
            samples = [loader.source[i] for i in range(min(FIXED_IMAGES,
                                                           len(loader.source)))]
        else:
            return None  # a streaming source: only output.test_image_address
        arrays = []
        for sample in samples:
            try:
                image = decode_image(sample)
            except BadSampleError as err:
                log.warning("sample image skipped: %s", err)
                continue
            arrays.append(to_array(fixed_size(image, config.data.img_size)))
        return np.stack(arrays) if arrays else None

    def write(self, models: FluxFlowModels, stage: Stage, epoch: int, batch: int
              ) -> list[Path]:
        """The stage's samples after ``batch`` batches of its epoch ``epoch`` (1-based)."""
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        prefix = f"sample_{stage.label}_epoch_{epoch}_batch_{batch}"
        written = []
        key = jax.random.PRNGKey(SAMPLE_SEED)
        kinds = modes.sampled(stage.config.vae, stage.config.flow)
        if modes.RECONSTRUCTIONS in kinds and self.images is not None:
            images = jnp.asarray(self.images)
            hw = models.compressor.latent_shape(*images.shape[1:3])
            rows = [images] + [_reconstruct(models.compressor, models.expander, images, key,
                                            use_context=context, hw=hw)
                               for context in (True, False)]
            grid = np.concatenate([np.concatenate(list(to_uint8(r)), axis=0) for r in rows],
                                  axis=1)  # columns: original, with context, without
            written.append(self._save(grid, f"{prefix}_vae.png"))
        if modes.GENERATIONS in kinds and self.tokens is not None:
            ids, mask = (jnp.asarray(a) for a in self.tokens)
            for height, width in self.sizes:
                images = generate(models, ids, mask, height=height, width=width, key=key,
                                  num_steps=self.steps)
                grid = np.concatenate(list(to_uint8(images)), axis=1)
                written.append(self._save(grid, f"{prefix}_{width}x{height}.png"))
        return written

    def _save(self, pixels: np.ndarray, name: str) -> Path:
        if jax.process_index() != 0:  # every process samples (over all devices), one writes
            return self.directory / name
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="png")
        atomic_write(self.directory / name, buffer.getvalue())
        return self.directory / name
