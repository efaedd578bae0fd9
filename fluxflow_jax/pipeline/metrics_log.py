"""Per-step JSONL training metrics that survive crashes and resumes.

``<output>/graph/training_metrics_<step>.jsonl`` holds one JSON object per line, appended and
flushed per record, so a killed run loses at most the line being written. Next to it,
``session_<step>.json`` (replaced atomically) keeps the session id of the run's first start.
An empty step name uses ``training_metrics.jsonl`` and ``session.json``.

Resuming from a checkpoint at global step N drops every record past N: a run killed after
logging but before its checkpoint would otherwise leave lines the resumed run writes again.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from fluxflow_jax.atomic import atomic_write

LR_PREFIX = "lr_"  # metrics with this prefix go to the record's "learning_rates"
VALIDATION_PREFIX = "val_"  # held-out metrics (fluxflow_jax.pipeline.validation)


class MetricsFileError(ValueError):
    """A metrics file or directory that cannot be read as training metrics."""


def metrics_path(output_path: Path | str, step_name: str) -> Path:
    """Where step ``step_name``'s metrics go."""
    return Path(output_path) / "graph" / f"training_metrics{_suffix(step_name)}.jsonl"


def session_path(output_path: Path | str, step_name: str) -> Path:
    """Where step ``step_name``'s session file goes."""
    return Path(output_path) / "graph" / f"session{_suffix(step_name)}.json"


def _suffix(step_name: str) -> str:
    if "/" in step_name or "\\" in step_name:
        raise ValueError(f"step name {step_name!r} must not contain a path separator")
    return f"_{step_name}" if step_name else ""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _finite(value: Any) -> float | None:
    """JSON has no NaN or infinity: a non-finite value is written as null."""
    number = float(value)
    return number if math.isfinite(number) else None


def _extra(value: Any) -> int | float | None:
    """Counts (e.g. skipped batches) stay integers; everything else as a metric."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return _finite(value)


def _parse(line: bytes) -> dict | None:
    """The record on a complete line, or None when the line is torn or not a record."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("global_step"), int):
        return None
    return record


def _scan(path: Path) -> Iterator[tuple[int, dict]]:
    """``(end offset, record)`` per line. A bad last line is a write cut short by a kill and
    is left out; a bad line anywhere else means the file is damaged."""
    bad_line = 0
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if bad_line:
                raise MetricsFileError(f"{path}: line {bad_line} is not a metrics record")
            offset += len(line)
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                bad_line = number
                continue
            yield offset, record


def read_metrics(path: Path | str) -> list[dict]:
    """Every record in a metrics file, without a torn last line."""
    return [record for _, record in _scan(Path(path))]


class MetricsLog:
    """Appends one record per logged batch to a step's metrics file.

    ``resume_from_step``: None starts new files (a new session); a global step continues the
    existing ones, keeping the session id, counting the resume and dropping records past it.
    """

    def __init__(self, output_path: Path | str, step_name: str,
                 resume_from_step: int | None = None) -> None:
        self.path = metrics_path(output_path, step_name)
        self.session_file = session_path(output_path, step_name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = _now()
        if resume_from_step is None:
            self.session = {"session_id": now.strftime("%Y%m%d_%H%M%S"),
                            "created_at": _iso(now), "resumed_count": 0}
            self._handle = open(self.path, "w", encoding="utf-8")
        else:
            first = self._truncate_after(resume_from_step)
            self.session = self._previous_session(first, now)
            self.session["resumed_count"] += 1
            self.session["last_resume_at"] = _iso(now)
            self._handle = open(self.path, "a", encoding="utf-8")
        self._write_session()

    @property
    def session_id(self) -> str:
        return self.session["session_id"]

    def _truncate_after(self, global_step: int) -> dict | None:
        """Cut the file after its last record at or before ``global_step`` (records are
        written in step order); the first record kept, if any."""
        if not self.path.exists():
            return None
        keep, first = 0, None
        for end, record in _scan(self.path):
            if record["global_step"] > global_step:
                break
            keep, first = end, first or record
        with open(self.path, "r+b") as handle:
            handle.truncate(keep)
        return first

    def _previous_session(self, first: dict | None, now: datetime) -> dict:
        """The session file's contents; without one, a session named after the first kept
        record (or now)."""
        if self.session_file.exists():
            try:
                return json.loads(self.session_file.read_text(encoding="utf-8"))
            except ValueError as err:
                raise MetricsFileError(f"{self.session_file}: {err}") from err
        session_id = first.get("session_id") if first else None
        return {"session_id": session_id or now.strftime("%Y%m%d_%H%M%S"),
                "created_at": _iso(now), "resumed_count": 0}

    def _write_session(self) -> None:
        self.session["last_update"] = _iso(_now())
        text = json.dumps(self.session, indent=2) + "\n"
        atomic_write(self.session_file, text.encode("utf-8"))

    def log(self, epoch: int, batch: int, global_step: int, metrics: Mapping[str, Any],
            extras: Mapping[str, Any] | None = None) -> None:
        """Append one record: every metric the step reported (``lr_*`` ones under
        ``learning_rates``), plus ``extras`` such as batch_time or a skipped-batch count.
        ``epoch`` is 0-based; values may be Python, NumPy or JAX scalars."""
        record = {
            "timestamp": _iso(_now()),
            "session_id": self.session_id,
            "epoch": int(epoch),
            "batch": int(batch),
            "global_step": int(global_step),
            "metrics": {k: _finite(v) for k, v in metrics.items()
                        if not k.startswith(LR_PREFIX)},
            "learning_rates": {k: _finite(v) for k, v in metrics.items()
                               if k.startswith(LR_PREFIX)},
            "extras": {k: _extra(v) for k, v in (extras or {}).items()},
        }
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the file and stamp the session's last update (not per record: each session
        write is a synced file replacement)."""
        if not self._handle.closed:
            self._handle.close()
            self._write_session()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
