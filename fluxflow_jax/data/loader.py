"""The host loader: deterministic, resumable batches of one image size, decoded in threads.

Order. An epoch's batches are a pure function of (seed, epoch, shard): for random-access
sources the whole epoch is planned up front from the images' header sizes (the reference's
bucketing: each size group shuffled and cut into full batches, leftovers pooled into mixed
batches that take their most common size, the batch list shuffled); streaming sources are
grouped by size as they arrive. Batches therefore come in a bounded set of shapes, so the
jitted step compiles once per shape, not per batch.

Resume. The loader's position is (epoch, batches consumed in that epoch), with the settings
that give it a meaning. Restoring it replans the epoch (random access) or reads the stream
again up to there, parsing image headers only (streaming), and continues with exactly the
batches the interrupted run would have seen.

Bad samples. An unreadable, truncated or missing image or an empty caption is skipped and
counted (``on_bad_sample: skip``), its place in the batch taken by a good sample of the same
batch so shapes stay fixed (a batch with no good sample repeats the previous batch);
``on_bad_sample: error`` stops with a ``DataConfigError`` naming the sample instead.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
from fluxflow_jax.checks import check_bool, field_problems, integer_at_least, one_of
from fluxflow_jax.data import images
from fluxflow_jax.data.errors import DataConfigError
from fluxflow_jax.data.samples import BadSampleError, RawSample, decode_image, header_size

log = logging.getLogger(__name__)
Size = tuple[int, int]  # (height, width)


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> RawSample: ...
    def image_size(self, index: int) -> Size: ...  # BadSampleError when unreadable


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

    def problems(self) -> list[str]:
        """Every invalid field, each phrased with its fix."""
        out = field_problems(self, {
            "batch_size": integer_at_least(1), "image_size": integer_at_least(16),
            "max_length": integer_at_least(2), "seed": integer_at_least(0),
            "workers": integer_at_least(1), "prefetch_batches": integer_at_least(1),
            "on_bad_sample": one_of(("skip", "error")), "fixed_size": check_bool,
            "shard_index": integer_at_least(0), "shard_count": integer_at_least(1)})
        out += [f"'reduced_min_sizes' entries must be integers in [16, image_size), got "
                f"{size!r}" for size in self.reduced_min_sizes
                if isinstance(size, bool) or not isinstance(size, int) or size < 16
                or (isinstance(self.image_size, int) and size >= self.image_size)]
        if not out and self.shard_index >= self.shard_count:
            out.append(f"'shard_index' ({self.shard_index}) must be below 'shard_count' "
                       f"({self.shard_count})")
        return out


class Batch(NamedTuple):
    scales: tuple[np.ndarray, ...]  # [B, H, W, 3] in [-1, 1], smallest first; last = main
    input_ids: np.ndarray  # int32 [B, max_length]
    attention_mask: np.ndarray  # bool [B, max_length]
    captions: tuple[str, ...]
    keys: tuple[str, ...]  # where each sample came from
    loader_state: dict[str, Any]  # the loader's state once this batch is consumed

    @property
    def images(self) -> np.ndarray:
        return self.scales[-1]

    def step_inputs(self, scale: int = -1) -> dict[str, np.ndarray]:
        """What a train step reads, at one scale (arrays only, ready for the devices)."""
        return {"images": self.scales[scale], "input_ids": self.input_ids,
                "attention_mask": self.attention_mask}


class _Planned(NamedTuple):
    size: Size  # the main scale's (height, width) for every image of the batch
    members: tuple[int | RawSample, ...]  # source indices, or streamed samples


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

    def summary(self, since: int = 0) -> str:
        """One line: the samples skipped after the first ``since``, the total, the first."""
        return (f"{self.count - since} unreadable sample(s) skipped ({self.count} in all; "
                f"the first: {self.examples[0]})")


class DataLoader:
    """Batches from a random-access or streaming source; iterate with ``epoch(n)``.

    Every epoch has exactly ``batches_per_epoch()`` batches on every host, so data-parallel
    hosts step in lockstep: a streaming epoch that runs short replays its stream from the
    start, and a batch whose every sample is bad is replaced by the previous batch.
    """

    def __init__(self, source: RandomAccessSource | StreamingSource, tokenizer: Tokenizer,
                 config: LoaderConfig):
        problems = config.problems()
        if problems:
            raise DataConfigError("invalid data loader settings: " + "; ".join(problems))
        self.source, self.tokenizer, self.config = source, tokenizer, config
        self.bad_samples = BadSampleReport()
        self._epoch, self._position = 0, 0
        self._streaming = hasattr(source, "iterate")
        # Uncaptioned sources (noise) train with the empty caption.
        self._captions_required = getattr(source, "captions_required", True)
        self._sizes = None if self._streaming else self._scan_sizes()
        if self.batches_per_epoch() == 0:
            raise DataConfigError(
                f"an epoch of this source gives no batch of {config.batch_size} per host "
                f"({config.shard_count} host(s)); lower batch_size or add data")

    # -- position -------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        """What a position means: the same position under other settings is other data.

        It is the same on every host, so any process can restore the state process 0
        checkpointed. Random-access epochs are planned as global batches whatever the
        number of hosts, so a run may resume on another host count; a stream is split by
        host, so its host count is part of what a position means.
        """
        meaning = {"seed": self.config.seed,
                   "global_batch_size": self.config.batch_size * self.config.shard_count,
                   "image_size": self.config.image_size, "fixed_size": self.config.fixed_size,
                   "samples": (self.source.samples_per_epoch if self._streaming
                               else len(self.source))}
        return {**meaning, "hosts": self.config.shard_count} if self._streaming else meaning

    def position_state(self, epoch: int, position: int = 0) -> dict[str, Any]:
        """The state of the loader at batch ``position`` of epoch ``epoch``."""
        return {**self._fingerprint(), "epoch": epoch, "position": position}

    def state(self) -> dict[str, Any]:
        """Where the loader is (the batches handed out so far), for a checkpoint. With batches
        prefetched ahead of training, checkpoint ``batch.loader_state`` of the last batch
        trained on instead."""
        return self.position_state(self._epoch, self._position)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken; the data settings must be the same."""
        state = _in_current_layout(state)
        differing = [f"{key} was {state.get(key)!r}, is {value!r}"
                     for key, value in self._fingerprint().items() if state.get(key) != value]
        if differing:
            raise DataConfigError("cannot resume the data order: " + "; ".join(differing)
                                  + " (resume with the settings the run started with)")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    def seek(self, epoch: int) -> None:
        """Start at the beginning of epoch ``epoch`` (e.g. after leaving one unfinished)."""
        self._epoch, self._position = epoch, 0

    def batches_per_epoch(self) -> int:
        """Batches in every epoch, on every host."""
        if self._streaming:
            per_shard = self.source.samples_per_epoch // self.config.shard_count
            return per_shard // self.config.batch_size
        return len(self._plan(self._epoch))

    # -- iteration --------------------------------------------------------------------

    def epoch(self, number: int) -> Iterator[Batch]:
        """The batches of epoch ``number``; after ``restore``, the rest of that epoch."""
        if self._position and number != self._epoch:
            raise ValueError(f"the loader is at batch {self._position} of epoch {self._epoch}; "
                             f"finish that epoch before epoch {number}")
        skip = self._position
        self._epoch = number
        planned = self._stream_epoch(number) if self._streaming else iter(self._plan(number))
        for _ in range(skip):
            next(planned)
        if self._streaming:  # network and tar reading off the training thread
            planned = _in_background(planned, self.config.prefetch_batches)
        pool = ThreadPoolExecutor(self.config.workers)
        pending: collections.deque[Future] = collections.deque()
        previous = None
        try:
            for item in planned:
                pending.append(pool.submit(self._load, item))
                if len(pending) > self.config.prefetch_batches:
                    previous = self._deliver(pending.popleft(), previous, number)
                    yield previous
            while pending:
                previous = self._deliver(pending.popleft(), previous, number)
                yield previous
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        self._epoch, self._position = number + 1, 0

    def _deliver(self, future: Future, previous: Batch | None, epoch: int) -> Batch:
        batch = future.result()
        self._position += 1
        state = self.position_state(epoch, self._position)
        if batch is None:  # every sample bad: keep the batch count
            if previous is None:
                raise DataConfigError(f"every sample of the first batch of epoch {epoch} is "
                                      f"unreadable: {self.bad_samples.examples[-1]}")
            batch = previous
        return batch._replace(loader_state=state)

    # -- planning ---------------------------------------------------------------------

    def _bucket(self, size: Size) -> Size:
        if self.config.fixed_size:
            return (self.config.image_size, self.config.image_size)
        height, width = size
        return images.bucket_of(width, height, self.config.image_size)

    def _scan_sizes(self) -> list[Size | None]:
        """Header sizes of every image; one that cannot be read is a bad sample now."""
        sizes: list[Size | None] = []
        for index in range(len(self.source)):
            try:
                sizes.append(self.source.image_size(index))
            except BadSampleError as err:
                self._bad(err)
                sizes.append(None)
        return sizes

    def _plan(self, epoch: int) -> list[_Planned]:
        """The epoch's batches of source indices for this host (random-access sources).

        Every host plans the same global batches (``shard_count`` host batches each) and
        takes its rows of each: all hosts' k-th batches have one image size, and the global
        batch is the same whatever the number of hosts.
        """
        rng = np.random.default_rng([self.config.seed, epoch])
        groups: dict[Size, list[int]] = collections.defaultdict(list)
        for index, size in enumerate(self._sizes):
            if size is not None:
                groups[self._bucket(size)].append(index)
        per_host, host = self.config.batch_size, self.config.shard_index
        batches = _cut_into_batches(groups, per_host * self.config.shard_count, rng)
        rows = slice(host * per_host, (host + 1) * per_host)
        return [_Planned(size, tuple(members[rows]))
                for size, members in (batches[i] for i in rng.permutation(len(batches)))]

    def _stream_epoch(self, epoch: int) -> Iterator[_Planned]:
        """Exactly ``batches_per_epoch()`` batches of a streaming epoch: extra ones dropped,
        a short stream replayed from its start."""
        wanted, produced = self.batches_per_epoch(), 0
        while True:
            before = produced
            for item in self._group_stream(epoch):
                yield item
                produced += 1
                if produced == wanted:
                    return
            if produced == before:
                raise DataConfigError(f"epoch {epoch} of the stream gave no complete batch of "
                                      f"{self.config.batch_size} images")

    def _group_stream(self, epoch: int) -> Iterator[_Planned]:
        """One pass of the stream grouped by size as it arrives (headers only)."""
        pending: dict[Size, list[RawSample]] = collections.defaultdict(list)
        stream = self.source.iterate(seed=self.config.seed, epoch=epoch,
                                     shard_index=self.config.shard_index,
                                     shard_count=self.config.shard_count)
        for sample in stream:
            try:
                size = header_size(sample.image, sample.key)
            except BadSampleError as err:
                self._bad(err)
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
            raise DataConfigError(f"bad sample {error}; on_bad_sample is 'error' (set it to "
                                  "'skip' to skip and count such samples)")
        self.bad_samples.add(error)

    def _fetch(self, member: int | RawSample) -> RawSample:
        if isinstance(member, RawSample):
            return member
        return self.source[member]  # reads the record here, in a worker

    def _load(self, planned: _Planned) -> Batch | None:
        """Decode, resize and tokenise one batch; bad samples replaced by good ones."""
        versions, good = [], []
        for member in planned.members:
            try:
                sample = self._fetch(member)
                if not sample.caption.strip() and self._captions_required:
                    raise BadSampleError(sample.key, "empty caption")
                image = decode_image(sample)
                if self.config.fixed_size:
                    image = images.fixed_size(image, self.config.image_size)
                versions.append(images.batch_versions(image, planned.size,
                                                      self.config.reduced_min_sizes))
                good.append(sample)
            except BadSampleError as err:
                self._bad(err)
        if not good:
            return None
        count = len(good)
        for i in range(len(planned.members) - count):  # keep the batch shape
            versions.append(versions[i % count])
            good.append(good[i % count])
        captions = [sample.caption for sample in good]
        ids, mask = self.tokenizer.encode(captions, self.config.max_length)
        scales = tuple(np.stack([images.to_array(v[level]) for v in versions])
                       for level in range(len(versions[0])))
        return Batch(scales, ids.astype(np.int32), mask.astype(bool), tuple(captions),
                     tuple(sample.key for sample in good), {})


def _in_current_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A loader state as this version writes it. Earlier versions recorded the host's own
    batch size and shard (``batch_size``, ``shard_index``, ``shard_count``), which tied
    the state to one host."""
    if "global_batch_size" in state or "batch_size" not in state:
        return state
    hosts = state.get("shard_count", 1)
    return {**state, "global_batch_size": state["batch_size"] * hosts, "hosts": hosts}


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


_DONE = object()


def _in_background(items: Iterator, size: int) -> Iterator:
    """``items`` produced by a thread, ``size`` ahead, in order; its errors re-raised here."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((_DONE, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            buffer.put((_DONE, err))

    threading.Thread(target=produce, daemon=True).start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
