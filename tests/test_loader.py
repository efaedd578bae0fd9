"""The host loader: shapes, determinism, resume exactness, sharding, bad samples."""

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.data.demo import DemoSource
from fluxflow_jax.data.loader import DataLoader, LoaderConfig
from fluxflow_jax.data.samples import BadSampleError, RawSample
from fluxflow_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load()


def demo(length=40):
    return DemoSource(length=length, image_size=32, seed=1, aspect_ratios=(1.0, 1.5, 0.75))


def captions(batches):
    return [c for batch in batches for c in batch.captions]


def keys(batches):
    return [k for batch in batches for k in batch.keys]


def test_reference_mode_batches_have_one_size_each_from_a_bounded_set(tokenizer):
    loader = DataLoader(demo(), tokenizer, LoaderConfig(batch_size=4, image_size=32))
    batches = list(loader.epoch(0))
    assert len(batches) == loader.batches_per_epoch() == 10
    shapes = {batch.images.shape for batch in batches}
    assert all(shape[0] == 4 and shape[3] == 3 and shape[1] % 16 == 0 and shape[2] % 16 == 0
               for shape in shapes)
    assert 1 < len(shapes) <= 3
    assert sorted(keys(batches)) == sorted(f"demo/{i}" for i in range(40))
    for batch in batches:
        assert batch.images.dtype == np.float32
        assert -1 <= batch.images.min() and batch.images.max() <= 1
        ids, mask = tokenizer.encode(list(batch.captions), 128)
        np.testing.assert_array_equal(batch.input_ids, ids)
        np.testing.assert_array_equal(batch.attention_mask, mask)


def test_order_is_a_function_of_seed_and_epoch(tokenizer):
    config = LoaderConfig(batch_size=4, image_size=32, seed=7)
    first = [b.captions for b in DataLoader(demo(), tokenizer, config).epoch(0)]
    again = [b.captions for b in DataLoader(demo(), tokenizer, config).epoch(0)]
    next_epoch = [b.captions for b in DataLoader(demo(), tokenizer, config).epoch(1)]
    assert first == again and first != next_epoch
    assert sorted(itertools.chain(*first)) == sorted(itertools.chain(*next_epoch))


@pytest.mark.parametrize("streaming", [False, True], ids=["random_access", "streaming"])
def test_resume_continues_with_exactly_the_uninterrupted_batches(tokenizer, streaming):
    make = (lambda: ListStream(demo(30))) if streaming else (lambda: demo(30))
    config = LoaderConfig(batch_size=4, image_size=32, workers=2, prefetch_batches=2)
    reference = DataLoader(make(), tokenizer, config)
    uninterrupted = list(reference.epoch(0)) + list(reference.epoch(1))

    interrupted = DataLoader(make(), tokenizer, config)
    done = list(itertools.islice(interrupted.epoch(0), 3))
    state = interrupted.state()
    assert state == {"seed": 42, "epoch": 0, "position": 3}
    resumed = DataLoader(make(), tokenizer, config)
    resumed.restore(state)
    rest = list(resumed.epoch(0)) + list(resumed.epoch(1))
    assert keys(done + rest) == keys(uninterrupted)
    for a, b in zip(done + rest, uninterrupted, strict=True):
        np.testing.assert_array_equal(a.images, b.images)


def test_restore_refuses_another_seed(tokenizer):
    loader = DataLoader(demo(8), tokenizer, LoaderConfig(batch_size=4, image_size=32, seed=1))
    with pytest.raises(ValueError, match="seed 2"):
        loader.restore({"seed": 2, "epoch": 0, "position": 1})


def test_fixed_size_mode_and_reduced_scales(tokenizer):
    fixed = DataLoader(demo(8), tokenizer, LoaderConfig(batch_size=4, image_size=32,
                                                        fixed_size=True))
    assert {b.images.shape for b in fixed.epoch(0)} == {(4, 32, 32, 3)}
    multi = DataLoader(DemoSource(length=8, image_size=64, seed=0), tokenizer,
                       LoaderConfig(batch_size=4, image_size=64, reduced_min_sizes=(32,)))
    for batch in multi.epoch(0):
        assert [s.shape for s in batch.scales] == [(4, 32, 32, 3), (4, 64, 64, 3)]
        assert batch.step_inputs(0)["images"] is batch.scales[0]


def test_hosts_get_disjoint_equal_shares(tokenizer):
    shares = [list(DataLoader(demo(), tokenizer, LoaderConfig(
        batch_size=4, image_size=32, shard_index=i, shard_count=2)).epoch(0)) for i in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert sorted(keys(shares[0]) + keys(shares[1])) == sorted(f"demo/{i}" for i in range(40))


# --------------------------------------------------------------------------- bad input


def png_bytes(size=(32, 32), colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


class ListSource:
    """A random-access source over given samples."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    def image_size(self, index):
        payload = self.samples[index].image
        try:
            with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload) as im:
                return im.height, im.width
        except (OSError, ValueError):
            return None


class ListStream:
    """A streaming source replaying a random-access one in a seeded order."""

    def __init__(self, source):
        self.source = source
        self.samples_per_epoch = len(source)

    def iterate(self, *, seed, epoch, shard_index=0, shard_count=1):
        order = np.random.default_rng([seed, epoch]).permutation(len(self.source))
        for index in order[shard_index::shard_count]:
            yield self.source[int(index)]


def bad_samples(tmp_path):
    good = png_bytes()
    truncated = png_bytes()[:60]
    (tmp_path / "empty.png").write_bytes(b"")
    # The header of this one reads fine; its pixels do not.
    header_only = png_bytes((32, 32))[:-40]
    return [RawSample(f"good{i}", good, f"caption {i}") for i in range(6)] + [
        RawSample("truncated", truncated, "x"),
        RawSample("zero-bytes", tmp_path / "empty.png", "x"),
        RawSample("missing", tmp_path / "missing.png", "x"),
        RawSample("no-caption", good, "  "),
        RawSample("bad-pixels", header_only, "x"),
        RawSample("garbage", b"not an image at all", "x"),
    ]


def test_bad_samples_are_skipped_counted_and_replaced(tokenizer, tmp_path):
    loader = DataLoader(ListSource(bad_samples(tmp_path)), tokenizer,
                        LoaderConfig(batch_size=3, image_size=32))
    batches = list(loader.epoch(0))
    assert loader.bad_samples.count == 6
    assert {e.split(":")[0] for e in loader.bad_samples.examples} == {
        "truncated", "zero-bytes", "missing", "no-caption", "bad-pixels", "garbage"}
    assert all(batch.images.shape == (3, 32, 32, 3) for batch in batches)
    assert set(keys(batches)) == {f"good{i}" for i in range(6)}


def test_bad_samples_can_stop_the_run(tokenizer, tmp_path):
    samples = bad_samples(tmp_path)
    loader = DataLoader(ListSource(samples[:6] + [samples[9]]), tokenizer,
                        LoaderConfig(batch_size=7, image_size=32, on_bad_sample="error"))
    with pytest.raises(BadSampleError, match="no-caption: empty caption"):
        list(loader.epoch(0))


def test_prefetch_places_batches_with_the_sharding_in_order(tokenizer):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from fluxflow_jax.data.prefetch import prefetch_to_device

    loader = DataLoader(demo(16), tokenizer, LoaderConfig(batch_size=8, image_size=32,
                                                          fixed_size=True))
    host = [b.step_inputs() for b in DataLoader(demo(16), tokenizer, loader.config).epoch(0)]
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    placed = list(prefetch_to_device((b.step_inputs() for b in loader.epoch(0)), 1, sharding))
    assert len(placed) == len(host) == 2
    for on_device, on_host in zip(placed, host, strict=True):
        assert on_device["images"].sharding == sharding
        assert len(on_device["images"].addressable_shards) == len(jax.devices())
        for key in on_host:
            np.testing.assert_array_equal(np.asarray(on_device[key]), on_host[key])
