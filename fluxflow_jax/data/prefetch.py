"""Batches placed on the devices ahead of the step that reads them.

``jax.device_put`` returns at once and copies in the background, so keeping the next few
batches already "put" overlaps the host-to-device transfer with the running step; the
loader's threads overlap decoding. With a sharding, each process contributes its local
part of the global batch (multi-host data parallelism).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import jax


def to_device(batch: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """One batch (a pytree of host arrays) on the devices, split by ``sharding``."""
    if sharding is not None and jax.process_count() > 1:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                            batch)
    return jax.device_put(batch, sharding)


def prefetch_to_device(batches: Iterable[Any], size: int = 2,
                       sharding: jax.sharding.Sharding | None = None) -> Iterator[Any]:
    """``batches`` on the devices, ``size`` of them transferred ahead."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(to_device(batch, sharding))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
