"""The host loader: deterministic, resumable batches of one image size, decoded in threads.

Order. An epoch's batches are a pure function of (seed, epoch, shard): for random-access
sources the whole epoch is planned up front from the images' header sizes (the reference's
bucketing: each size group shuffled and cut into full batches, leftovers pooled into mixed
batches that take their most common size, the batch list shuffled); streaming sources are
grouped by size as they arrive. Batches therefore come in a bounded set of shapes, so the
jitted step compiles once per shape, not per batch.

Resume. The loader's position is (epoch, batches consumed in that epoch). Restoring it
replans the epoch (random access) or replays the stream reading headers only (streaming)
and continues with exactly the batches the interrupted run would have seen.

Bad samples. An unreadable, truncated or missing image or an empty caption is skipped and
counted (``on_bad_sample: skip``), its place in the batch taken by a good sample of the same
batch so shapes stay fixed; ``on_bad_sample: error`` raises ``BadSampleError`` instead.
"""

from __future__ import annotations

import collections
import io
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
from PIL import Image

from fluxflow_jax.data import images
from fluxflow_jax.data.samples import BadSampleError, RawSample, decode_image

log = logging.getLogger(__name__)
Size = tuple[int, int]  # (height, width)


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> RawSample: ...
    def image_size(self, index: int) -> Size | None: ...


class StreamingSource(Protocol):
    samples_per_epoch: int

    def iterate(self, *, seed: int, epoch: int, shard_index: int = 0,
                shard_count: int = 1) -> Iterator[RawSample]: ...


class Tokenizer(Protocol):
    def encode(self, texts: Sequence[str], max_length: int = 128
               ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int
    image_size: int = 256  # short side the images are brought to
    fixed_size: bool = False  # resize + centre crop to image_size x image_size
    reduced_min_sizes: tuple[int, ...] = ()  # extra smaller scales (reference mode)
    max_length: int = 128  # caption tokens
    seed: int = 42
    workers: int = 2
    prefetch_batches: int = 4
    on_bad_sample: Literal["skip", "error"] = "skip"
    shard_index: int = 0  # this host's share of every epoch
    shard_count: int = 1


class Batch(NamedTuple):
    scales: tuple[np.ndarray, ...]  # [B, H, W, 3] in [-1, 1], smallest first; last = main
    input_ids: np.ndarray  # int32 [B, max_length]
    attention_mask: np.ndarray  # bool [B, max_length]
    captions: tuple[str, ...]
    keys: tuple[str, ...]  # where each sample came from

    @property
    def images(self) -> np.ndarray:
        return self.scales[-1]

    def step_inputs(self, scale: int = -1) -> dict[str, np.ndarray]:
        """What a train step reads, at one scale."""
        return {"images": self.scales[scale], "input_ids": self.input_ids,
                "attention_mask": self.attention_mask}


class _Planned(NamedTuple):
    size: Size  # the main scale's (height, width) for every image of the batch
    samples: tuple[RawSample, ...]


@dataclass
class BadSampleReport:
    """Samples skipped so far (worker threads add to it)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)  # the first few, for the log
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, error: BadSampleError) -> None:
        with self._lock:
            self.count += 1
            if len(self.examples) < 10:
                self.examples.append(str(error))
                log.warning("skipped bad sample %s", error)


class DataLoader:
    """Batches from a random-access or streaming source; iterate with ``epoch(n)``."""

    def __init__(self, source: RandomAccessSource | StreamingSource, tokenizer: Tokenizer,
                 config: LoaderConfig):
        self.source, self.tokenizer, self.config = source, tokenizer, config
        self.bad_samples = BadSampleReport()
        self._epoch, self._position = 0, 0
        self._streaming = hasattr(source, "iterate")
        self._sizes = None if self._streaming else self._scan_sizes()

    # -- position -------------------------------------------------------------------

    def state(self) -> dict[str, int]:
        """Where the loader is, for a checkpoint."""
        return {"seed": self.config.seed, "epoch": self._epoch, "position": self._position}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.config.seed) != self.config.seed:
            raise ValueError(f"the checkpointed data order used seed {state['seed']}, this "
                             f"run has seed {self.config.seed}; resume with the same seed")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    def batches_per_epoch(self) -> int:
        """Batches in an epoch (for streaming sources, the nominal count)."""
        if self._streaming:
            per_shard = self.source.samples_per_epoch // self.config.shard_count
            return per_shard // self.config.batch_size
        return len(self._plan(self._epoch))

    # -- iteration --------------------------------------------------------------------

    def epoch(self, number: int) -> Iterator[Batch]:
        """The batches of epoch ``number``; after ``restore``, the rest of that epoch."""
        skip = self._position if number == self._epoch else 0
        self._epoch, self._position = number, skip
        planned = self._stream_plan(number) if self._streaming else iter(self._plan(number))
        for _ in range(skip):
            next(planned, None)
        with ThreadPoolExecutor(max(1, self.config.workers)) as pool:
            pending: collections.deque[Future] = collections.deque()
            for item in planned:
                pending.append(pool.submit(self._load, item))
                if len(pending) > self.config.prefetch_batches:
                    yield from self._deliver(pending.popleft())
            while pending:
                yield from self._deliver(pending.popleft())
        self._epoch, self._position = number + 1, 0

    def _deliver(self, future: Future) -> Iterator[Batch]:
        batch = future.result()
        self._position += 1
        if batch is not None:
            yield batch

    # -- planning ---------------------------------------------------------------------

    def _bucket(self, size: Size) -> Size:
        if self.config.fixed_size:
            return (self.config.image_size, self.config.image_size)
        height, width = size
        return images.bucket_of(width, height, self.config.image_size)

    def _scan_sizes(self) -> list[Size | None]:
        """Header sizes of every image; one that cannot be read is a bad sample now."""
        sizes = []
        for index in range(len(self.source)):
            size = self.source.image_size(index)
            if size is None:
                self._bad(BadSampleError(self._key(index), "image header unreadable"))
            sizes.append(size)
        return sizes

    def _key(self, index: int) -> str:
        try:
            return self.source[index].key
        except BadSampleError as err:
            return err.key

    def _plan(self, epoch: int) -> list[_Planned]:
        """The epoch's batches for this shard (random-access sources)."""
        rng = np.random.default_rng([self.config.seed, epoch])
        groups: dict[Size, list[int]] = collections.defaultdict(list)
        for index, size in enumerate(self._sizes):
            if size is not None:
                groups[self._bucket(size)].append(index)
        batches = _cut_into_batches(groups, self.config.batch_size, rng)
        order = rng.permutation(len(batches))
        mine = [batches[i] for i in order][self.config.shard_index::self.config.shard_count]
        per_shard = len(batches) // self.config.shard_count  # equal counts across hosts
        return [_Planned(size, tuple(self._sample(i) for i in members))
                for size, members in mine[:per_shard]]

    def _sample(self, index: int) -> RawSample:
        try:
            return self.source[index]
        except BadSampleError as err:  # e.g. an empty caption: decoded as bad, later
            return RawSample(err.key, b"", "")

    def _stream_plan(self, epoch: int) -> Iterator[_Planned]:
        """Group a streaming epoch by size as it arrives (headers only, no decoding)."""
        pending: dict[Size, list[RawSample]] = collections.defaultdict(list)
        stream = self.source.iterate(seed=self.config.seed, epoch=epoch,
                                     shard_index=self.config.shard_index,
                                     shard_count=self.config.shard_count)
        for sample in stream:
            size = _header_size(sample)
            if size is None:
                self._bad(BadSampleError(sample.key, "image header unreadable"))
                continue
            bucket = self._bucket(size)
            pending[bucket].append(sample)
            if len(pending[bucket]) == self.config.batch_size:
                yield _Planned(bucket, tuple(pending.pop(bucket)))
        leftovers = [(bucket, s) for bucket in sorted(pending) for s in pending[bucket]]
        for start in range(0, len(leftovers) - self.config.batch_size + 1,
                           self.config.batch_size):
            chunk = leftovers[start:start + self.config.batch_size]
            yield _Planned(_most_common([b for b, _ in chunk]), tuple(s for _, s in chunk))

    # -- decoding (worker threads) ----------------------------------------------------

    def _bad(self, error: BadSampleError) -> None:
        if self.config.on_bad_sample == "error":
            raise error
        self.bad_samples.add(error)

    def _load(self, planned: _Planned) -> Batch | None:
        """Decode, resize and tokenise one batch; bad samples replaced by good ones."""
        versions, good = [], []
        for sample in planned.samples:
            try:
                if not sample.caption.strip():
                    raise BadSampleError(sample.key, "empty caption")
                versions.append(self._versions(decode_image(sample), planned.size))
                good.append(sample)
            except BadSampleError as err:
                self._bad(err)
        if not good:
            return None
        count = len(good)
        for i in range(len(planned.samples) - count):  # keep the batch shape
            versions.append(versions[i % count])
            good.append(good[i % count])
        captions = [sample.caption for sample in good]
        ids, mask = self.tokenizer.encode(captions, self.config.max_length)
        return Batch(_stack_scales(versions), ids.astype(np.int32), mask.astype(bool),
                     tuple(captions), tuple(sample.key for sample in good))

    def _versions(self, image: Image.Image, size: Size) -> list[Image.Image]:
        """Every scale of one image, smallest first, the main one at the batch's size."""
        if self.config.fixed_size:
            return [images.fixed_size(image, self.config.image_size)]
        scales = images.reference_versions(image, self.config.image_size,
                                           self.config.reduced_min_sizes)
        main = scales[-1]
        if (main.height, main.width) != size:  # a mixed batch: its most common size
            main = main.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        return scales[:-1] + [main]


def _cut_into_batches(groups: dict[Size, list[int]], batch_size: int,
                      rng: np.random.Generator) -> list[tuple[Size, list[int]]]:
    """Full batches per size group, then the pooled leftovers as mixed batches."""
    batches, leftovers = [], []
    for size in sorted(groups):
        members = [int(i) for i in rng.permutation(groups[size])]
        full = len(members) // batch_size * batch_size
        batches += [(size, members[i:i + batch_size]) for i in range(0, full, batch_size)]
        leftovers += [(size, i) for i in members[full:]]
    leftovers = [leftovers[i] for i in rng.permutation(len(leftovers))]
    for start in range(0, len(leftovers) - batch_size + 1, batch_size):
        chunk = leftovers[start:start + batch_size]
        batches.append((_most_common([s for s, _ in chunk]), [i for _, i in chunk]))
    return batches


def _most_common(sizes: Sequence[Size]) -> Size:
    counts = collections.Counter(sizes)
    return max(counts, key=lambda size: (counts[size], size))


def _stack_scales(versions: list[list[Image.Image]]) -> tuple[np.ndarray, ...]:
    """Scale levels every image has, each at its most common size, as float arrays."""
    levels = min(len(v) for v in versions)
    stacked = []
    for level in range(-levels, 0):
        level_images = [v[level] for v in versions]
        height, width = _most_common([(im.height, im.width) for im in level_images])
        stacked.append(np.stack([
            images.to_array(im if (im.height, im.width) == (height, width)
                            else im.resize((width, height), Image.Resampling.LANCZOS))
            for im in level_images]))
    return tuple(stacked)


def _header_size(sample: RawSample) -> Size | None:
    """(height, width) from the image header, without decoding the pixels."""
    payload = sample.image
    if isinstance(payload, np.ndarray):
        return payload.shape[0], payload.shape[1]
    try:
        with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload) as im:
            return im.height, im.width
    except (OSError, ValueError, SyntaxError):
        return None
