"""TensorBoard event files: the logged metrics (losses, learning rates, gradient norms,
speed), the validation metrics and the sample images, in ``<output>/tensorboard/<stage>``.

``output.tensorboard`` switches it on (default: on when ``tensorboardX`` is installed, the
``tensorboard`` extra). A stage that starts (or resumes) at global step N first drops the
events past N that an earlier, killed attempt wrote, so the curves continue without
duplicate steps.
"""

from __future__ import annotations

import importlib.util
import struct
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from fluxflow_jax.atomic import atomic_write
from fluxflow_jax.pipeline.config import ConfigError, OutputConfig
from fluxflow_jax.pipeline.hooks import Hook, StepInfo
from fluxflow_jax.pipeline.metrics_log import LR_PREFIX, VALIDATION_PREFIX
from fluxflow_jax.pipeline.position import Position
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training.state import PackedState

PACKAGE = "tensorboardX"


def tensorboard_enabled(output: OutputConfig) -> bool:
    """``output.tensorboard``, or (unset) whether the writer package is installed;
    ``ConfigError`` when it is asked for and missing."""
    installed = importlib.util.find_spec(PACKAGE) is not None
    if output.tensorboard and not installed:
        raise ConfigError([f"output.tensorboard is true, but {PACKAGE} is not installed; "
                           "pip install 'fluxflow-jax[tensorboard]', or set "
                           "output.tensorboard: false"])
    return installed if output.tensorboard is None else output.tensorboard


def scalar_tag(name: str) -> str:
    """``learning_rate/flow`` for ``lr_flow``, ``validation/psnr`` for ``val_psnr``,
    ``train/<name>`` for the others."""
    if name.startswith(LR_PREFIX):
        return "learning_rate/" + name.removeprefix(LR_PREFIX)
    if name.startswith(VALIDATION_PREFIX):
        return "validation/" + name.removeprefix(VALIDATION_PREFIX)
    return "train/" + name


def _records(path: Path) -> list[bytes]:
    """The framed records of an event file (TFRecord: length, its CRC, data, its CRC); a
    record cut short by a kill ends the list."""
    data, records, offset = path.read_bytes(), [], 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        end = offset + 12 + length + 4
        if end > len(data):
            break
        records.append(data[offset:end])
        offset = end
    return records


def drop_after(directory: Path, global_step: int) -> None:
    """Remove the events past ``global_step`` from the event files in ``directory``; a file
    left without any summary goes."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(directory.glob("events.out.tfevents.*")):
        records = _records(path)
        events = [Event.FromString(record[12:-4]) for record in records]
        kept = [r for r, e in zip(records, events) if e.step <= global_step]
        if not any(e.HasField("summary") and e.step <= global_step for e in events):
            path.unlink()
        elif len(kept) < len(records) or sum(map(len, records)) < path.stat().st_size:
            atomic_write(path, b"".join(kept))


class TensorBoard(Hook):
    def __init__(self, output: Path):
        self.directory = output / "tensorboard"
        self.writer = None

    def start_stage(self, stage: Stage, position: Position, resuming: bool) -> None:
        from tensorboardX import SummaryWriter

        logdir = self.directory / stage.label
        if logdir.is_dir():
            drop_after(logdir, position.global_step)
        # The writer names its file after the second and the host: a run restarted within
        # the same second would replace the file, so each gets a suffix of its own.
        self.writer = SummaryWriter(str(logdir), filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def __call__(self, state: PackedState, info: StepInfo) -> None:
        step = info.global_step
        if info.logged:
            averages, speed = info.report
            for name, value in averages.items():
                self.writer.add_scalar(scalar_tag(name), value, step)
            self.writer.add_scalar("speed/images_per_second", speed.images_per_second, step)
            self.writer.add_scalar("speed/seconds_per_batch", speed.seconds_per_batch, step)
            if speed.mfu is not None:
                self.writer.add_scalar("speed/mfu", speed.mfu, step)
        for name, value in (info.validation or {}).items():
            self.writer.add_scalar(scalar_tag(name), value, step)
        for path in info.samples:
            variant = path.stem.rsplit("_", 1)[-1]  # vae, or the size WxH
            self.writer.add_image(f"samples/{variant}", np.asarray(Image.open(path)), step,
                                  dataformats="HWC")
        if info.logged or info.validation or info.samples:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
