"""The host loader: shapes, determinism, resume exactness, sharding, bad samples."""

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.data.demo import DemoSource
from fluxflow_jax.data.errors import DataConfigError
from fluxflow_jax.data.loader import Batch, DataLoader, LoaderConfig
from fluxflow_jax.data.samples import BadSampleError, RawSample, header_size
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
    state = done[-1].loader_state
    assert state == interrupted.state() and (state["epoch"], state["position"]) == (0, 3)
    resumed = DataLoader(make(), tokenizer, config)
    resumed.restore(state)
    rest = list(resumed.epoch(0)) + list(resumed.epoch(1))
    assert keys(done + rest) == keys(uninterrupted)
    for a, b in zip(done + rest, uninterrupted, strict=True):
        np.testing.assert_array_equal(a.images, b.images)


def test_restore_refuses_other_data_settings(tokenizer):
    state = DataLoader(demo(8), tokenizer,
                       LoaderConfig(batch_size=4, image_size=32, seed=1)).state()
    other = DataLoader(demo(8), tokenizer, LoaderConfig(batch_size=2, image_size=32, seed=2))
    with pytest.raises(DataConfigError, match="seed was 1, is 2; global_batch_size was 4, is 2"):
        other.restore(state)


def test_a_state_any_host_wrote_resumes_on_any_host_count(tokenizer):
    """A checkpoint records process 0's state, which every process restores: random-access
    data then continues with the same global batches on 2 hosts as on 1, and back."""
    def host(index, count):
        return DataLoader(demo(), tokenizer, LoaderConfig(
            batch_size=4 // count, image_size=32, shard_index=index, shard_count=count))

    whole = list(host(0, 1).epoch(0))
    one = host(0, 1)
    state = list(itertools.islice(one.epoch(0), 3))[-1].loader_state
    halves = [host(i, 2) for i in (0, 1)]
    for half in halves:
        half.restore(state)
    rest = list(zip(*(half.epoch(0) for half in halves), strict=True))
    assert [a.keys + b.keys for a, b in rest] == [b.keys for b in whole[3:]]

    first_half = host(0, 2)
    state = list(itertools.islice(first_half.epoch(0), 4))[-1].loader_state
    again = host(0, 1)
    again.restore(state)
    assert keys(again.epoch(0)) == keys(whole[4:])


def test_a_stream_resumes_on_its_own_host_count_only(tokenizer):
    def host(index, count):
        return DataLoader(ListStream(demo(32)), tokenizer, LoaderConfig(
            batch_size=4 // count, image_size=32, shard_index=index, shard_count=count))

    first = host(0, 2)
    state = list(itertools.islice(first.epoch(0), 2))[-1].loader_state
    second, uninterrupted = host(1, 2), list(host(1, 2).epoch(0))
    second.restore(state)
    assert keys(second.epoch(0)) == keys(uninterrupted[2:])
    with pytest.raises(DataConfigError, match="hosts was 2, is 1"):
        host(0, 1).restore(state)


def test_a_state_in_the_earlier_per_host_layout_still_restores(tokenizer):
    config = LoaderConfig(batch_size=2, image_size=32, shard_index=1, shard_count=2)
    uninterrupted = keys(DataLoader(demo(), tokenizer, config).epoch(0))
    loader = DataLoader(demo(), tokenizer, config)
    loader.restore({"seed": 42, "batch_size": 2, "image_size": 32, "fixed_size": False,
                    "shard_index": 0, "shard_count": 2, "samples": 40, "epoch": 0,
                    "position": 3})
    assert keys(loader.epoch(0)) == uninterrupted[3 * 2:]


def test_resume_through_device_prefetch_uses_the_trained_batch_state(tokenizer):
    """Prefetching hands batches out ahead of training; the checkpoint must record the
    position of the batch trained on, which each batch carries."""
    from fluxflow_jax.data.prefetch import prefetch_to_device

    config = LoaderConfig(batch_size=4, image_size=32, fixed_size=True)
    uninterrupted = keys(DataLoader(demo(32), tokenizer, config).epoch(0))
    loader = DataLoader(demo(32), tokenizer, config)
    trained = []
    for batch, _ in prefetch_to_device(loader.epoch(0), 3, inputs=Batch.step_inputs):
        trained.append(batch)
        if len(trained) == 2:
            break
    assert loader.state()["position"] > 2  # handed out ahead of training
    resumed = DataLoader(demo(32), tokenizer, config)
    resumed.restore(trained[-1].loader_state)
    assert keys(trained) + keys(resumed.epoch(0)) == uninterrupted


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


def test_hosts_rows_make_the_single_host_batches(tokenizer):
    """Two hosts of 2 rows each load, batch by batch, the 4-row batches one host loads
    (same images, same size): the global batch does not depend on the number of hosts."""
    whole = list(DataLoader(demo(), tokenizer, LoaderConfig(batch_size=4, image_size=32))
                 .epoch(0))
    hosts = [list(DataLoader(demo(), tokenizer, LoaderConfig(
        batch_size=2, image_size=32, shard_index=i, shard_count=2)).epoch(0)) for i in (0, 1)]
    assert len({batch.images.shape for batch in whole}) > 1  # several sizes in the epoch
    for one, first, second in zip(whole, *hosts, strict=True):
        assert one.keys == first.keys + second.keys
        np.testing.assert_array_equal(one.images, np.concatenate([first.images,
                                                                  second.images]))


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
        return header_size(self.samples[index].image, self.samples[index].key)


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
    assert "missing: image file not found" in loader.bad_samples.examples
    assert all(batch.images.shape == (3, 32, 32, 3) for batch in batches)
    assert set(keys(batches)) == {f"good{i}" for i in range(6)}


def test_bad_samples_can_stop_the_run(tokenizer, tmp_path):
    samples = bad_samples(tmp_path)
    loader = DataLoader(ListSource(samples[:6] + [samples[9]]), tokenizer,
                        LoaderConfig(batch_size=7, image_size=32, on_bad_sample="error"))
    with pytest.raises(DataConfigError, match="bad sample no-caption: empty caption; "
                                              "on_bad_sample is 'error'"):
        list(loader.epoch(0))


def test_prefetch_places_batches_with_the_sharding_in_order(tokenizer):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from fluxflow_jax.data.prefetch import prefetch_to_device

    loader = DataLoader(demo(16), tokenizer, LoaderConfig(batch_size=8, image_size=32,
                                                          fixed_size=True))
    host = [b.step_inputs() for b in DataLoader(demo(16), tokenizer, loader.config).epoch(0)]
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    placed = [inputs for _, inputs in
              prefetch_to_device(loader.epoch(0), 1, sharding, inputs=Batch.step_inputs)]
    assert len(placed) == len(host) == 2
    for on_device, on_host in zip(placed, host, strict=True):
        assert on_device["images"].sharding == sharding
        assert len(on_device["images"].addressable_shards) == len(jax.devices())
        for key in on_host:
            np.testing.assert_array_equal(np.asarray(on_device[key]), on_host[key])


def test_invalid_settings_are_reported_together(tokenizer):
    config = LoaderConfig(batch_size=0, image_size=32, on_bad_sample="ignore",
                          reduced_min_sizes=(8,))
    with pytest.raises(DataConfigError) as raised:
        DataLoader(demo(4), tokenizer, config)
    message = str(raised.value)
    for part in ("'batch_size' must be an integer >= 1, got 0",
                 "'on_bad_sample' must be one of ['skip', 'error'], got 'ignore'",
                 "'reduced_min_sizes' entries must be integers in [16, image_size), got 8"):
        assert part in message


def test_records_are_read_in_the_workers_not_while_planning(tokenizer):
    import threading

    class Recording(ListSource):
        threads = set()

        def __getitem__(self, index):
            self.threads.add(threading.current_thread().name)
            return super().__getitem__(index)

    source = Recording([RawSample(f"s{i}", png_bytes(), f"c{i}") for i in range(8)])
    loader = DataLoader(source, tokenizer, LoaderConfig(batch_size=4, image_size=32))
    Recording.threads.clear()
    list(loader.epoch(0))
    assert Recording.threads and threading.main_thread().name not in Recording.threads


class UnevenStream:
    """Host 0 gets 20 samples an epoch, host 1 only 8; nominally 28."""

    samples_per_epoch = 28

    def iterate(self, *, seed, epoch, shard_index=0, shard_count=1):
        for i in range(20 if shard_index == 0 else 8):
            yield RawSample(f"h{shard_index}/{epoch}/{i}", png_bytes(), f"caption {i}")


def test_every_host_gets_exactly_the_nominal_batches_of_a_stream(tokenizer):
    counts = []
    for host in (0, 1):
        loader = DataLoader(UnevenStream(), tokenizer, LoaderConfig(
            batch_size=4, image_size=32, shard_index=host, shard_count=2))
        batches = list(loader.epoch(0))
        counts.append(len(batches))
        if host == 1:  # 2 batches from the stream, then its first one again
            assert keys(batches[2:]) == keys(batches[:1])
    assert counts == [3, 3]


class FixedStream:
    """A streaming source yielding the given samples in order, every epoch."""

    def __init__(self, samples):
        self.samples, self.samples_per_epoch = samples, len(samples)

    def iterate(self, *, seed, epoch, shard_index=0, shard_count=1):
        yield from self.samples


def test_a_batch_of_only_bad_samples_repeats_the_previous_one(tokenizer):
    good = [RawSample(f"good{i}", png_bytes(), f"c{i}") for i in range(2)]
    bad = [RawSample(f"empty{i}", png_bytes(), " ") for i in range(2)]
    loader = DataLoader(FixedStream(good + bad), tokenizer,
                        LoaderConfig(batch_size=2, image_size=32))
    batches = list(loader.epoch(0))
    assert [b.keys for b in batches] == [("good0", "good1")] * 2
    assert [b.loader_state["position"] for b in batches] == [1, 2]
    assert loader.bad_samples.count == 2
    with pytest.raises(DataConfigError, match="every sample of the first batch"):
        list(DataLoader(FixedStream(bad + good), tokenizer,
                        LoaderConfig(batch_size=2, image_size=32)).epoch(0))


def test_scales_are_the_same_in_every_batch(tokenizer):
    """Images of one bucket but different originals get identical scale sets."""
    samples = [RawSample(f"s{i}", png_bytes((600, 600) if i % 2 else (300, 300)), f"c{i}")
               for i in range(8)]
    loader = DataLoader(ListSource(samples), tokenizer,
                        LoaderConfig(batch_size=4, image_size=256, reduced_min_sizes=(128,)))
    for batch in loader.epoch(0):
        assert [s.shape for s in batch.scales] == [(4, 128, 128, 3), (4, 256, 256, 3)]


def test_too_little_data_and_out_of_order_epochs_are_errors(tokenizer):
    with pytest.raises(DataConfigError, match="no batch of 8 per host"):
        DataLoader(demo(6), tokenizer, LoaderConfig(batch_size=8, image_size=32))
    loader = DataLoader(demo(8), tokenizer, LoaderConfig(batch_size=2, image_size=32))
    loader.restore({**loader.state(), "position": 1})
    with pytest.raises(ValueError, match="finish that epoch before epoch 1"):
        next(loader.epoch(1))


def test_an_oversized_image_is_a_bad_sample_not_a_crash(tokenizer, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)  # 64x64 now counts as a bomb
    samples = [RawSample(f"s{i}", png_bytes(), f"c{i}") for i in range(4)]
    samples.append(RawSample("huge", png_bytes((64, 64)), "x"))
    loader = DataLoader(ListSource(samples), tokenizer, LoaderConfig(batch_size=4,
                                                                     image_size=32))
    assert len(list(loader.epoch(0))) == 1 and loader.bad_samples.count == 1
