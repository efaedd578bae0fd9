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
import orbax.checkpoint as ocp

from fluxflow_jax.training.state import TrainState


class RunCheckpointError(ValueError):
    """A checkpoint that cannot be restored into this run; the message says why."""


class RunCheckpoints:
    """The checkpoints of one run in ``directory``, the last ``keep_last`` kept."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True,
                                                 enable_async_checkpointing=True))

    def save(self, step: int, state: TrainState, record: Mapping[str, Any]) -> None:
        """Checkpoint ``state`` and ``record`` (JSON-serialisable) as number ``step``."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(dict(record))))

    def latest(self) -> int | None:
        """The newest complete checkpoint's number, or None."""
        return self._manager.latest_step()

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
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as err:
            raise RunCheckpointError(
                f"checkpoint {step} in {self.directory} does not fit this run (another model "
                f"or stage configuration?): {err}") from None
        return restored.state, restored.record

    def close(self) -> None:
        """Wait for pending saves to be on disk, then release the writer threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
