"""Cached latents: each training image encoded once by a frozen compressor, kept on disk.

A flow step whose compressor is frozen encodes the same images to the same latent
distribution every epoch. With ``cache_latents: true`` each image's posterior (the
compressor's convolutions up to mu, log sigma^2 and the latent grid:
``FluxCompressor.posterior``) is computed once and stored; the train step then samples the
tokens from it (``FluxCompressor.sample``: the noise, the token attention and, from v060 on,
the final LayerNorm + tanh), so for the same noise it gets the tokens the images give.

The cache is a folder per compressor: its name is a digest of the compressor's weights,
architecture and arithmetic, so a changed compressor finds no cache. Inside, each entry is
named by a digest of the image's pixels (its data and size), so a changed dataset or image
size finds no entries and is encoded anew. A resumed run finds its cache again; images the
loader skips never reach it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from fluxflow_jax.atomic import atomic_write
from fluxflow_jax.training.flow_step import POSTERIOR_KEYS
from fluxflow_jax.training.state import Networks


def weights_digest(params: Any, buffers: Any, model_version: str, compute_dtype: Any) -> str:
    """A digest of a compressor: every weight's path, shape, dtype and bytes, its
    architecture version and the arithmetic it encodes in."""
    digest = hashlib.sha256(f"{model_version}|{compute_dtype}".encode())
    for tree in (params, buffers):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            array = np.asarray(jax.device_get(leaf))
            digest.update(f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


def pixels_digest(image: np.ndarray) -> str:
    """A digest of one image's pixels and shape: what its cache entry is found by."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=20)
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


class LatentCache:
    """The posteriors of one frozen compressor, stored in ``root / <weights digest>``."""

    def __init__(self, root: Path, nets: Networks, params: Any, buffers: Any,
                 model_version: str):
        compressor = {"compressor": params}, {"compressor": buffers}
        self.folder = Path(root) / weights_digest(params, buffers, model_version,
                                                  nets.compute_dtype)
        self._params = compressor
        self._encode = jax.jit(lambda p, b, images: tuple(
            nets.outputs(x) for x in nets.bind("compressor", p, b).posterior(
                nets.inputs(images))))
        self.encoded = 0  # images encoded (not found in the cache) so far

    def inputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` (host arrays) with its images replaced by their posteriors
        (``POSTERIOR_KEYS``), encoding and storing those the cache lacks."""
        images = batch["images"]
        paths = [self.folder / f"{pixels_digest(image)}.npz" for image in images]
        found = [_read(path) for path in paths]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:  # the whole batch: one program per batch shape
            encoded = jax.device_get(self._encode(*self._params, images))
            for i in missing:
                found[i] = {key: np.asarray(part[i]) for key, part in
                            zip(POSTERIOR_KEYS, encoded)}
                _write(paths[i], found[i])
            self.encoded += len(missing)
        stacked = {key: np.stack([entry[key] for entry in found]) for key in POSTERIOR_KEYS}
        return {**{k: v for k, v in batch.items() if k != "images"}, **stacked}


def _read(path: Path) -> dict[str, np.ndarray] | None:
    """A stored entry; None when absent or unreadable (it is then encoded again)."""
    try:
        with np.load(path, allow_pickle=False) as entry:
            return {key: entry[key] for key in POSTERIOR_KEYS}
    except (OSError, KeyError, ValueError):
        return None


def _write(path: Path, entry: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **entry)
    atomic_write(path, buffer.getvalue())
