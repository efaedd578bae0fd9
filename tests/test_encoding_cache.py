"""The encoding cache's memory: entries found or encoded once are not read from disk again,
up to the cache's share of memory."""

import numpy as np

from fluxflow_jax.pipeline.encoding_cache import EncodingCache

BATCH = {"x": np.arange(12, dtype=np.float32).reshape(4, 3), "label": np.arange(4)}


def _doubling_cache(folder, **memory):
    return EncodingCache(folder, lambda x: (x * 2,), ("x",), ("y",), **memory)


def _forget_disk(cache):
    for entry in cache.folder.iterdir():
        entry.unlink()


def test_entries_are_kept_in_memory(tmp_path):
    cache = _doubling_cache(tmp_path / "cache")
    first = cache.inputs(BATCH)
    _forget_disk(cache)
    second = cache.inputs(BATCH)
    assert cache.encoded == 4
    np.testing.assert_array_equal(second["y"], BATCH["x"] * 2)
    np.testing.assert_array_equal(second["label"], first["label"])


def test_entries_read_from_disk_are_kept_too(tmp_path):
    _doubling_cache(tmp_path / "cache").inputs(BATCH)
    resumed = _doubling_cache(tmp_path / "cache")
    resumed.inputs(BATCH)
    _forget_disk(resumed)
    np.testing.assert_array_equal(resumed.inputs(BATCH)["y"], BATCH["x"] * 2)
    assert resumed.encoded == 0


def test_memory_holds_only_its_share(tmp_path):
    """Room for two rows (3 float32 each): the other two are read from disk, here gone, so
    encoded again."""
    cache = _doubling_cache(tmp_path / "cache", memory_bytes=2 * 3 * 4)
    cache.inputs(BATCH)
    _forget_disk(cache)
    np.testing.assert_array_equal(cache.inputs(BATCH)["y"], BATCH["x"] * 2)
    assert cache.encoded == 4 + 2
