"""Streaming tar shards (WebDataset format) as one finite, replayable epoch at a time.

Unlike the reference (one endless curl pipe of every shard, so nothing was ever shuffled and
an epoch never ended), each shard is opened on its own, the shard list and the samples are
shuffled by seeded generators, and an epoch ends when its shards are exhausted. The same
(seed, epoch, shard_index, shard_count) therefore always gives the same samples in the same
order, which is what makes a resumed run continue exactly.

Only webdataset's tar reading (``gopen``, ``tar_file_expander``, ``group_by_keys``) is used,
never its torch loaders.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import random
import shlex
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from pathlib import Path
from typing import TypeVar

import braceexpand

from fluxflow_jax.data.captions import finish_caption
from fluxflow_jax.data.errors import DataConfigError
from fluxflow_jax.data.samples import BadSampleError, RawSample

T = TypeVar("T")
log = logging.getLogger(__name__)
_REMOTE = ("http://", "https://")


def _hf_urls(pattern: str, token: str | None) -> list[str]:
    """https URLs of the files an ``hf://datasets/<owner>/<repo>[@rev]/<glob>`` matches."""
    try:
        from huggingface_hub import HfFileSystem, hf_hub_url  # only hf:// needs it
    except ImportError:
        raise DataConfigError(f"{pattern}: hf:// URLs need `pip install huggingface_hub`") from None
    path = pattern.removeprefix("hf://")
    parts = path.split("/", 3)
    if len(parts) < 4 or parts[0] != "datasets":
        raise DataConfigError(f"{pattern}: expected hf://datasets/<owner>/<repo>/<path or glob>")
    repo, _, revision = parts[2].partition("@")
    matches = sorted(HfFileSystem(token=token).glob(path))
    return [
        hf_hub_url(f"{parts[1]}/{repo}", match.split("/", 3)[3], repo_type="dataset",
                   revision=revision or None)
        for match in matches
    ]


def _expand(pattern: str, token: str | None) -> list[str]:
    """The shards one pattern names: brace ranges first, then hf:// or local globs."""
    shards = []
    for item in braceexpand.braceexpand(pattern):
        if item.startswith("hf://"):
            shards += _hf_urls(item, token)
        elif item.startswith(_REMOTE):
            shards.append(item)
        elif glob.has_magic(item):
            shards += sorted(glob.glob(item))
        elif Path(item).is_file():
            shards.append(item)
        else:
            raise DataConfigError(f"WebDataset shard {item} (from {pattern!r}) does not exist")
    if not shards:
        raise DataConfigError(
            f"no WebDataset shards match {pattern!r}; check the path, the glob or the "
            "{000000..000009} range"
        )
    return shards


def resolve_shards(urls: str | Sequence[str], token: str | None = None) -> list[str]:
    """Every shard ``urls`` names, in order: local paths or http(s) URLs."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns:
        raise DataConfigError("no WebDataset URLs given")
    return [shard for pattern in patterns for shard in _expand(pattern, token)]


def buffer_shuffle(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle through a buffer of ``size`` items, as webdataset does, but with ``rng``.

    An item leaves the buffer at a random slot as each new one arrives, so memory stays at
    ``size`` items; a buffer at least as long as the input gives a full uniform shuffle, and
    a size of 1 or less keeps the order.
    """
    size = max(size, 1)
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class WebDatasetSource:
    """Streaming source over tar shards: local paths, globs, ``{a..b}`` ranges, http(s) URLs
    (streamed through curl, with a bearer ``token`` when given) or ``hf://datasets/...``.

    A sample's image is the raw bytes of its ``image_key`` member. Its caption is the text
    of the ``caption_key`` member when the sample has one (e.g. "txt"), otherwise the
    ``caption_key`` field of the JSON ``label_key`` member.

    The keys are checked once per source, on the first ``iterate``, against one sample the
    data alone fixes: the first sample of the first readable shard in listed order. If it
    lacks a member, the keys are wrong (``DataConfigError`` listing the members it does
    have). Every sample an epoch reads without a usable image or caption is then yielded with
    empty image bytes or an empty caption, so that the loader skips and counts it as it does
    every bad sample (raising from the iterator would end the epoch). A shard that cannot be
    read (download failure, not a tar) is logged and yielded as one such empty sample named by
    the shard; the epoch goes on with the next shard. A local tar cut short at a member
    boundary just ends there, as tar readers do; a download cut short fails through curl's
    exit status.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        image_key: str = "jpg",
        label_key: str = "json",
        caption_key: str = "prompt",
        token: str | None = None,
        samples_per_epoch: int | None = None,
        samples_per_shard: int = 1000,
        shardshuffle: int = 10,
        shuffle: int = 100,
        fixed_prompt_prefix: str | None = None,
    ):
        for name, value in (("samples_per_epoch", samples_per_epoch),
                            ("samples_per_shard", samples_per_shard)):
            if value is not None and value < 1:
                raise DataConfigError(f"WebDataset {name} must be at least 1, got {value}")
        self.shards = resolve_shards(urls, token)
        # group_by_keys lower-cases member extensions, so the keys are compared lower-cased.
        self._image_key, self._label_key = image_key.lower(), label_key.lower()
        self._caption_key = caption_key
        self._token = token
        self._limit = samples_per_epoch
        self.samples_per_epoch = samples_per_epoch or len(self.shards) * samples_per_shard
        self._shardshuffle, self._shuffle = shardshuffle, shuffle
        self._prefix = fixed_prompt_prefix
        self._keys_checked = False

    def iterate(
        self, *, seed: int, epoch: int, shard_index: int = 0, shard_count: int = 1
    ) -> Iterator[RawSample]:
        """One epoch of samples for reader ``shard_index`` of ``shard_count`` (hosts x workers).

        The shard order is a shuffle buffer of ``shardshuffle`` over the shard list, seeded by
        (seed, epoch) so that every reader agrees on it. Reader i then takes every
        shard_count-th shard from the i-th; with fewer shards than readers every reader reads
        all shards and keeps every shard_count-th sample instead. Its samples go through a
        ``shuffle`` buffer seeded by (seed, epoch, shard_index). With ``samples_per_epoch``
        given, the readers together yield at most that many samples (bad ones included).
        """
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
        if not self._keys_checked:
            self._check_keys()
        shards = list(buffer_shuffle(
            self.shards, self._shardshuffle, random.Random(f"shards:{seed}:{epoch}")
        ))
        by_shard = len(shards) >= shard_count
        samples = self._samples(shards[shard_index::shard_count] if by_shard else shards)
        if not by_shard:
            samples = islice(samples, shard_index, None, shard_count)
        samples = buffer_shuffle(
            samples, self._shuffle, random.Random(f"samples:{seed}:{epoch}:{shard_index}")
        )
        if self._limit is not None:
            share, extra = divmod(self._limit, shard_count)
            samples = islice(samples, share + (shard_index < extra))
        return samples

    def _check_keys(self) -> None:
        """Check the keys on a sample that no seed or epoch chooses, so that one bad sample
        shuffled to the front of some epoch cannot pass for a configuration mistake."""
        for shard in self.shards:
            with contextlib.closing(self._read_shard(shard)) as reader:
                first = next(reader, None)
            if isinstance(first, dict):  # not an empty or unreadable shard
                self._sample(first, strict=True)
                break
        self._keys_checked = True

    def _samples(self, shards: list[str]) -> Iterator[RawSample]:
        """Every sample of ``shards``; an unreadable shard's empty sample passes as it is."""
        for item in chain.from_iterable(self._read_shard(shard) for shard in shards):
            yield item if isinstance(item, RawSample) else self._sample(item)

    def _read_shard(self, shard: str) -> Iterator[dict | RawSample]:
        """The shard's samples; a failure logs and yields one empty sample named by the shard."""
        try:
            yield from self._read_tar(shard)
        except Exception as err:  # noqa: BLE001 - any read failure costs this shard only
            message = str(err).replace(self._token, "***") if self._token else str(err)
            log.warning("WebDataset shard %s could not be read, skipping the rest of it: %s",
                        shard, message)
            yield RawSample(shard, b"", "")

    def _read_tar(self, shard: str) -> Iterator[dict]:
        """The shard's samples as {member extension: bytes} plus ``__key__``/``__url__``.

        curl's exit status is the only sign of a download cut off between two members, so the
        stream is read to its end and closed, which raises on a failed status. Only a reader
        stopped early (the epoch's sample cap, a closed generator) or already failing closes it
        quietly: closing the pipe kills curl, whose status then says nothing.
        """
        # Deferred: importing webdataset imports torch whenever torch is installed.
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        stream = gopen(self._open_url(shard))
        try:
            yield from group_by_keys(tar_file_expander([{"url": shard, "stream": stream}]))
            while stream.read(1 << 16):  # the tar reader stops before the stream's end
                pass
        except BaseException:
            with contextlib.suppress(OSError):
                stream.close()
            raise
        stream.close()

    def _open_url(self, shard: str) -> str:
        if not shard.startswith(_REMOTE):
            return shard
        command = ["curl", "-s", "-S", "-L", "--fail", "--retry", "3", "--connect-timeout", "30"]
        if self._token:
            command += ["-H", f"Authorization: Bearer {self._token}"]
        return "pipe:" + shlex.join([*command, shard])

    def _sample(self, raw: dict, strict: bool = False) -> RawSample:
        """The sample, with nothing usable left empty; ``strict`` raises ``DataConfigError``
        instead, for the sample that checks the keys."""
        key = f"{raw['__url__']}#{raw['__key__']}"
        image = self._member(raw, self._image_key, "image_key", key, strict)
        try:
            caption = finish_caption(key, self._caption(raw, key, strict), self._prefix)
        except BadSampleError:  # an empty caption: left empty, the loader counts it as bad
            caption = ""
        return RawSample(key, image or b"", caption)

    def _caption(self, raw: dict, key: str, strict: bool) -> str:
        """The caption text, or "" when this sample has none usable."""
        if self._caption_key in raw:
            return _text(raw[self._caption_key])
        label = self._member(raw, self._label_key, "label_key", key, strict)
        try:
            fields = json.loads(label or b"")
        except (json.JSONDecodeError, UnicodeDecodeError):
            if strict:
                raise DataConfigError(
                    f"{key}: the '{self._label_key}' member is not JSON; set label_key to the "
                    "sample's JSON member, or caption_key to its text member"
                ) from None
            return ""
        if not isinstance(fields, dict) or self._caption_key not in fields:
            if strict:
                names = ", ".join(fields) if isinstance(fields, dict) else type(fields).__name__
                raise DataConfigError(
                    f"{key}: '{self._label_key}' has no '{self._caption_key}' field (it has: "
                    f"{names}); set caption_key to one of them"
                )
            return ""
        caption = fields[self._caption_key]
        return caption if isinstance(caption, str) else ""

    @staticmethod
    def _member(raw: dict, member: str, option: str, key: str, strict: bool) -> bytes | None:
        """The member's bytes; None when missing, unless ``strict`` (then a wrong key)."""
        if member in raw:
            return raw[member]
        if strict:
            present = ", ".join(sorted(name for name in raw if not name.startswith("__")))
            raise DataConfigError(
                f"{key}: no '{member}' member (it has: {present}); set {option} to one of them"
            )
        return None


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return ""
