"""A frozen network's outputs, computed once per input and kept on disk.

A frozen network gives the same outputs for the same inputs every epoch, so a step may read
them back instead of running it again (``LatentCache``: the compressor's posteriors,
``TextCache``: the language model's features). The cache is a folder per network: its name
is a digest of the weights, the architecture version and the arithmetic, so a changed
network finds no cache. Inside, each batch row's entry is named by a digest of its inputs
(their sizes and bytes), so changed data finds no entries and is encoded anew. A resumed run
finds its cache again. Entries also stay in memory, up to ``MEMORY_BYTES`` per cache, so a
dataset that fits is read from disk at most once per run.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax.atomic import atomic_write

MEMORY_BYTES = 1 << 30  # entries each cache keeps in memory besides the disk


def weights_digest(params: Any, buffers: Any, model_version: str, compute_dtype: Any) -> str:
    """A digest of a network: every weight's path, shape, dtype and bytes, its architecture
    version and the arithmetic it encodes in."""
    digest = hashlib.sha256(f"{model_version}|{compute_dtype}".encode())
    for tree in (params, buffers):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            array = np.asarray(jax.device_get(leaf))
            digest.update(f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


def own_copy(tree: Any) -> Any:
    """The cache's own copy of a network's weights: the train step donates the state's
    arrays, which leaves them deleted after its first call."""
    return jax.tree.map(jnp.copy, tree)


def row_digest(rows: Mapping[str, np.ndarray]) -> str:
    """A digest of one batch row's inputs (each one's shape and bytes, in the given order):
    what its cache entry is found by."""
    digest = hashlib.blake2b(digest_size=20)
    for value in rows.values():
        digest.update(str(value.shape).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


class EncodingCache:
    """``encode``'s outputs per batch row, stored in ``folder``.

    ``encode`` takes the batch's ``input_keys`` entries (whole batches: one program per
    batch shape) and returns one array per ``output_keys`` entry, batch first.
    """

    def __init__(self, folder: Path, encode: Callable[..., tuple],
                 input_keys: tuple[str, ...], output_keys: tuple[str, ...],
                 memory_bytes: int = MEMORY_BYTES):
        self.folder = Path(folder)
        self._encode = encode
        self.input_keys, self.output_keys = input_keys, output_keys
        self.encoded = 0  # rows encoded (not found in the cache) so far
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self._memory_room = memory_bytes

    def inputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` (host arrays) with its ``input_keys`` replaced by the stored outputs
        (``output_keys``), encoding and storing those the cache lacks."""
        count = len(batch[self.input_keys[0]])
        names = [row_digest({k: batch[k][i] for k in self.input_keys}) for i in range(count)]
        found = [self._find(name) for name in names]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:  # the whole batch: one program per batch shape
            encoded = jax.device_get(self._encode(*(batch[k] for k in self.input_keys)))
            for i in missing:
                found[i] = {key: np.asarray(part[i])
                            for key, part in zip(self.output_keys, encoded, strict=True)}
                _write(self._path(names[i]), found[i])
                self._remember(names[i], found[i])
            self.encoded += len(missing)
        stacked = {key: np.stack([entry[key] for entry in found]) for key in self.output_keys}
        return {**{k: v for k, v in batch.items() if k not in self.input_keys}, **stacked}

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def _find(self, name: str) -> dict[str, np.ndarray] | None:
        """The entry named ``name``, from memory, else from disk; None when absent or
        unreadable (it is then encoded again)."""
        if name in self._memory:
            return self._memory[name]
        try:
            with np.load(self._path(name), allow_pickle=False) as stored:
                entry = {key: stored[key] for key in self.output_keys}
        except (OSError, KeyError, ValueError):
            return None
        self._remember(name, entry)
        return entry

    def _remember(self, name: str, entry: dict[str, np.ndarray]) -> None:
        """Keep ``entry`` in memory while the cache's share of memory lasts."""
        size = sum(value.nbytes for value in entry.values())
        if name not in self._memory and size <= self._memory_room:
            self._memory[name] = entry
            self._memory_room -= size


def _write(path: Path, entry: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **entry)
    atomic_write(path, buffer.getvalue())
