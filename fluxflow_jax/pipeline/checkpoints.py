"""Run checkpoints: the whole train state plus a JSON record, written atomically by orbax.

The record holds what is not an array (pipeline position, data loader state, session);
the state holds every array (parameters, optimizer and schedule states, EMA, loss
histories, counters). Orbax writes a checkpoint under a temporary name and renames it when
complete, so a run killed mid-save keeps its previous checkpoints intact. Saves are
asynchronous: the arrays are copied off the devices before ``save`` returns (so the next
step may donate them) and written to disk in the background.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fluxflow_jax.training.state import TrainState


class RunCheckpointError(ValueError):
    """A checkpoint that cannot be restored into this run; the message says why."""


def leaf_names(tree: Any) -> list[str]:
    """The dotted path of every leaf, in leaf order: the same names for a state, its
    abstract twin, a checkpoint's metadata and the arrays restored from it."""
    def name(path: tuple) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)
    return [name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{dotted leaf path: shape} of a state, its abstract twin or a checkpoint's metadata."""
    return {name: tuple(leaf.shape)
            for name, leaf in zip(leaf_names(tree), jax.tree.leaves(tree), strict=True)}


def _differences(stored: dict[str, tuple], wanted: dict[str, tuple]) -> list[str]:
    """What keeps a checkpoint from restoring into a state, checked before reading it."""
    out = [f"missing {key}" for key in wanted if key not in stored]
    out += [f"unexpected {key}" for key in stored if key not in wanted]
    out += [f"{key} is {list(stored[key])}, expected {list(shape)}"
            for key, shape in wanted.items() if key in stored and stored[key] != shape]
    return out


class RunCheckpoints:
    """The checkpoints of one run in ``directory``, the last ``keep_last`` kept."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True,
                                                 enable_async_checkpointing=True),
            # Known up front, so a reopened run can read a checkpoint's metadata.
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "record": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: TrainState, record: Mapping[str, Any]) -> None:
        """Checkpoint ``state`` and ``record`` (JSON-serialisable) as number ``step``."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(dict(record))))

    def latest(self) -> int | None:
        """The newest complete checkpoint's number, or None."""
        return self._manager.latest_step()

    def record(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON record of checkpoint ``step`` (default: the latest), e.g. to learn
        which state structure to restore into."""
        self._manager.wait_until_finished()
        step = self.latest() if step is None else step
        if step is None:
            raise RunCheckpointError(f"no checkpoint in {self.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore())).record

    def restore(self, like: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict[str, Any]]:
        """(state, record) of checkpoint ``step`` (default: the latest).

        ``like`` gives the structure, dtypes and placement to restore into (a state, or its
        ``jax.eval_shape``): a checkpoint written on 8 devices restores onto 1 and back.
        """
        self._manager.wait_until_finished()
        step = self.latest() if step is None else step
        if step is None:
            raise RunCheckpointError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        problems = _differences(_shapes(self._manager.item_metadata(step)["state"]),
                                _shapes(target))
        if problems:
            raise RunCheckpointError(
                f"checkpoint {step} in {self.directory} does not fit this run (another model "
                f"or stage configuration?): {'; '.join(problems[:5])}"
                + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
        return restored.state, restored.record

    def restore_arrays(self, step: int | None = None) -> dict[str, Any]:
        """Checkpoint ``step``'s state (default: the latest) as nested dicts of host arrays,
        without knowing the run's configuration (e.g. to export its weights)."""
        self._manager.wait_until_finished()
        step = self.latest() if step is None else step
        if step is None:
            raise RunCheckpointError(f"no checkpoint in {self.directory}")
        host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host),
                              self._manager.item_metadata(step)["state"])
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        return jax.tree.map(np.asarray, restored.state)

    def close(self) -> None:
        """Wait for pending saves to be on disk, then release the writer threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
