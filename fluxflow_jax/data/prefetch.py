"""Batches placed on the devices ahead of the step that reads them.

``jax.device_put`` returns at once and copies in the background, so keeping the next few
batches already "put" overlaps the host-to-device transfer with the running step; the
loader's threads overlap decoding. With a sharding, each process contributes its local
part of the global batch (multi-host data parallelism).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import jax

T = TypeVar("T")


def to_device(batch: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """One batch (a pytree of host arrays) on the devices, split by ``sharding``."""
    if sharding is not None and jax.process_count() > 1:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                            batch)
    return jax.device_put(batch, sharding)


def prefetch_to_device(batches: Iterable[T], size: int = 2,
                       sharding: jax.sharding.Sharding | None = None,
                       inputs: Callable[[T], Any] = lambda batch: batch
                       ) -> Iterator[tuple[T, Any]]:
    """``(batch, inputs(batch) on the devices)`` pairs, ``size`` transfers ahead.

    The host batch comes along so the caller still has what is not an array (captions, the
    loader state to checkpoint once this batch is trained on).
    """
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append((batch, to_device(inputs(batch), sharding)))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
