"""Whether an output folder's run checkpoints belong to the run a config describes.

Each run checkpoint's record names the run's steps and its architecture (``run_record``).
A run resumes only from checkpoints of its own steps and architecture: another run's, left
in the same ``output_path``, would restore the wrong state, or (a changed head count keeps
every shape) silently train another network. ``validate`` and ``train`` both refuse such a
folder (``check_own_checkpoints``) and delete nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.pipeline.checkpoints import RunCheckpointError, RunCheckpoints
from fluxflow_jax.pipeline.config import ConfigError

RECORD_FORMAT = 1


def run_record(stages: list[str], model: FluxFlowConfig) -> dict[str, Any]:
    """What a checkpoint's record says about the run that wrote it."""
    return {"format": RECORD_FORMAT, "stages": stages, "model": dataclasses.asdict(model)}


def differences(record: dict[str, Any], stages: list[str], model: FluxFlowConfig
                ) -> list[str]:
    """How the run that wrote ``record`` differs from this one (empty: the same run).
    Records written before the architecture was recorded are compared by steps only."""
    if record.get("format") != RECORD_FORMAT:
        return [f"its record format is {record.get('format')!r}, this version writes "
                f"{RECORD_FORMAT}"]
    out = []
    if record.get("stages") != stages:
        out.append(f"its steps are {record.get('stages')}, this config has {stages}")
    recorded = record.get("model") or {}
    out += [f"model.{name} is {recorded[name]!r} there, {value!r} here"
            for name, value in dataclasses.asdict(model).items()
            if name in recorded and recorded[name] != value]
    return out


def refusal(output: Path, found: list[str]) -> ConfigError:
    """The error for an output folder holding another run's checkpoints."""
    return ConfigError([
        f"output.output_path: {output} holds checkpoints of another run ({'; '.join(found)}); "
        "resume with the config that run started with, choose another output_path, or pass "
        "--no_resume to `train` to start afresh (it deletes those checkpoints)"])


def check_own_checkpoints(output: Path, stages: list[str], model: FluxFlowConfig) -> None:
    """Refuse (``ConfigError``) an ``output`` whose newest readable checkpoint record is
    another run's; a folder without checkpoints passes. Reads, never writes."""
    directory = output / "checkpoints"
    if not directory.is_dir():
        return
    with RunCheckpoints(directory, read_only=True) as checkpoints:
        if checkpoints.latest() is None:
            return
        try:  # damaged newer ones are skipped, as the run skips them
            _, record, _ = checkpoints.newest_intact(checkpoints.record, fix="")
        except RunCheckpointError:  # none intact: the run says so, with its fix
            return
    found = differences(record, stages, model)
    if found:
        raise refusal(output, found)
