"""Cached latents: each training image encoded once by a frozen compressor, kept on disk.

A flow step whose compressor is frozen encodes the same images to the same latent
distribution every epoch. With ``cache_latents: true`` each image's posterior (the
compressor's convolutions up to mu, log sigma^2 and the latent grid:
``FluxCompressor.posterior``) is computed once and stored; the train step then samples the
tokens from it (``FluxCompressor.sample``: the noise, the token attention and, from v060 on,
the final LayerNorm + tanh), so for the same noise it gets the tokens the images give.
Entries are found by the image's pixels and size (``encoding_cache``); images the loader
skips never reach the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from fluxflow_jax.pipeline.encoding_cache import EncodingCache, own_copy, weights_digest
from fluxflow_jax.training.flow_step import POSTERIOR_KEYS
from fluxflow_jax.training.state import Networks


class LatentCache(EncodingCache):
    """The posteriors of one frozen compressor, stored in ``root / <weights digest>``."""

    def __init__(self, root: Path, nets: Networks, params: Any, buffers: Any,
                 model_version: str):
        folder = Path(root) / weights_digest(params, buffers, model_version,
                                             nets.compute_dtype)
        encode = jax.jit(lambda p, b, images: tuple(
            nets.outputs(x) for x in nets.bind("compressor", p, b).posterior(
                nets.inputs(images))))
        compressor = {"compressor": own_copy(params)}, {"compressor": own_copy(buffers)}
        super().__init__(folder, lambda images: encode(*compressor, images), ("images",),
                         POSTERIOR_KEYS)
