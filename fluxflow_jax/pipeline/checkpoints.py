"""Run checkpoints: the whole train state plus a JSON record, written atomically by orbax.

The record holds what is not an array (pipeline position, data loader state, session);
the state holds every array (parameters, optimizer and schedule states, EMA, loss
histories, counters). Orbax writes a checkpoint under a temporary name and renames it when
complete, so a run killed mid-save keeps its previous checkpoints intact; a writer removes
such leftover temporary directories (``N.orbax-checkpoint-tmp-*``, orbax's own names) when
it opens the directory. A complete checkpoint can still be damaged afterwards (a truncated
copy, a full disk, a bad sector): ``newest_intact`` finds the newest one that reads. Saves
are asynchronous: the arrays are copied off the devices before ``save`` returns (so the next
step may donate them) and written to disk in the background.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from fluxflow_jax.training.state import TrainState


T = TypeVar("T")
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint set aside: orbax lists it no more
_AVERAGES = "ema"  # the state's field of averages, as its leaf names start


class RunCheckpointError(ValueError):
    """A checkpoint that cannot be restored into this run; the message says why."""


class DamagedCheckpoint(RunCheckpointError):
    """A checkpoint whose files cannot be read: truncated, corrupted or partly deleted."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint {step} is damaged ({reason})")
        self.step, self.reason = step, reason


class CheckpointWriteError(RunCheckpointError):
    """A checkpoint the system would not let us write (a full disk, a quota, permissions);
    the checkpoints written before it are intact."""


# How TensorStore (under orbax) words the system's refusals to write.
_SYSTEM_REFUSALS = ("RESOURCE_EXHAUSTED", "No space left", "Disk quota",
                    "Read-only file system", "Permission denied", "PERMISSION_DENIED")


class _ReportedWriteErrors(logging.Filter):
    """Drops what orbax's writer threads and their asyncio tasks log, tracebacks included,
    about a write the system refused: the save's caller gets the same error and reports it
    once, as ``CheckpointWriteError``."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not any(refusal in text for refusal in _SYSTEM_REFUSALS)


for _logger in ("absl", "asyncio"):
    logging.getLogger(_logger).addFilter(_ReportedWriteErrors())


@contextlib.contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """A save's or wait's failure to write as ``CheckpointWriteError``."""
    try:
        yield
    except Exception as err:  # orbax re-raises its threads' errors, TensorStore's included
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        if not (isinstance(err, OSError) or any(s in reason for s in _SYSTEM_REFUSALS)):
            raise
        raise CheckpointWriteError(
            f"could not write a checkpoint in {directory} ({reason}); the checkpoints before "
            "it are intact: free space (or fix the permissions) and run the same command "
            "again to resume") from None


@contextlib.contextmanager
def _reading(step: int) -> Iterator[None]:
    """Errors reading checkpoint ``step`` as ``DamagedCheckpoint``. Orbax and TensorStore
    raise anything from JSON, key and OS errors to a bare ``Exception`` for bad files, so
    every error but our own (a checkpoint that reads but does not fit) means damage."""
    try:
        yield
    except RunCheckpointError:
        raise
    except Exception as err:  # see the docstring: no narrower class covers them
        reason = str(err).split(". ")[0].splitlines()[0][:160] or type(err).__name__
        raise DamagedCheckpoint(step, reason) from err


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

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, *,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_last, create=not read_only, read_only=read_only,
                enable_async_checkpointing=True, cleanup_tmp_directories=not read_only),
            # Known up front, so a reopened run can read a checkpoint's metadata.
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "record": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: TrainState, record: Mapping[str, Any]) -> None:
        """Checkpoint ``state`` and ``record`` (JSON-serialisable) as number ``step``."""
        with _writing(self.directory):
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(dict(record))))

    def latest(self) -> int | None:
        """The newest complete checkpoint's number, or None."""
        return self._manager.latest_step()

    def newest_intact(self, load: Callable[[int], T], fix: str
                      ) -> tuple[int, T, list[DamagedCheckpoint]]:
        """(step, ``load(step)``, the damaged newer ones) for the newest checkpoint that
        ``load`` reads without ``DamagedCheckpoint``. With none intact, a
        ``RunCheckpointError`` naming the directory and ``fix``."""
        self._manager.wait_until_finished()
        damaged = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return step, load(step), damaged
            except DamagedCheckpoint as err:
                damaged.append(err)
        found = "; ".join(str(err) for err in damaged) or "there are none"
        raise RunCheckpointError(f"no intact checkpoint in {self.directory} ({found}); {fix}")

    def fallback_line(self, step: int, damaged: list[DamagedCheckpoint]) -> str:
        """The one line saying which checkpoint is used instead of the damaged newer ones."""
        return (f"{'; '.join(str(err) for err in damaged)}: using checkpoint {step} of "
                f"{self.directory}")

    def set_aside(self, step: int) -> Path:
        """Rename damaged checkpoint ``step`` out of the run's sequence (kept to inspect);
        a resumed run saves a new checkpoint ``step`` later."""
        path = self.directory / str(step)
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        count = 1
        while aside.exists():
            count += 1
            aside = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{count}")
        path.rename(aside)
        self._manager.reload()
        return aside

    def record(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON record of checkpoint ``step`` (default: the latest), e.g. to learn
        which state structure to restore into."""
        self._manager.wait_until_finished()
        step = self.latest() if step is None else step
        if step is None:
            raise RunCheckpointError(f"no checkpoint in {self.directory}")
        with _reading(step):
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
        problems = _differences(_shapes(self._state_metadata(step)), _shapes(target))
        if problems and all(p.startswith(f"unexpected {_AVERAGES}.") for p in problems):
            return self._without_extra_averages(target, step), self.record(step)
        if problems:
            raise RunCheckpointError(
                f"checkpoint {step} in {self.directory} does not fit this run (another model "
                f"or stage configuration?): {'; '.join(problems[:5])}"
                + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
        with _reading(step):
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
        return restored.state, restored.record

    def _without_extra_averages(self, target: Any, step: int) -> TrainState:
        """Checkpoint ``step``'s arrays for ``target``'s leaves, matched by name: for a
        checkpoint whose averages also hold leaves their stage does not train (as written
        before averages left those out), which are dropped."""
        stored = self.restore_arrays(step)
        by_name = dict(zip(leaf_names(stored), jax.tree.leaves(stored), strict=True))
        leaves = [jax.device_put(by_name[name], leaf.sharding)
                  for name, leaf in zip(leaf_names(target), jax.tree.leaves(target), strict=True)]
        return jax.tree.unflatten(jax.tree.structure(target), leaves)

    def _state_metadata(self, step: int) -> Any:
        """The stored state's structure, shapes and dtypes (without reading its arrays)."""
        with _reading(step):
            metadata = self._manager.item_metadata(step)["state"]
            if not jax.tree.leaves(metadata):
                raise DamagedCheckpoint(step, "its state metadata is missing")
        return metadata

    def restore_arrays(self, step: int | None = None) -> dict[str, Any]:
        """Checkpoint ``step``'s state (default: the latest) as nested dicts of host arrays,
        without knowing the run's configuration (e.g. to export its weights)."""
        self._manager.wait_until_finished()
        step = self.latest() if step is None else step
        if step is None:
            raise RunCheckpointError(f"no checkpoint in {self.directory}")
        host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host),
                              self._state_metadata(step))
        with _reading(step):
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
        return jax.tree.map(np.asarray, restored.state)

    def wait(self) -> None:
        """Block until every pending save is on disk and its writer thread has ended."""
        with _writing(self.directory):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves to be on disk, then release the writer threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc_info: Any) -> None:
        """Close; a failed write is raised unless an error is on its way already (which
        it would hide: a full disk fails the weight files too)."""
        try:
            self.close()
        except CheckpointWriteError:
            if kind is None:
                raise
