"""Evaluating a training run directory or a checkpoint: its weights, the held-out data of
the data it trained on (recorded by the run in ``model_metadata.json``, or named by a
config), and the LPIPS network."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from fluxflow_jax.evaluation.evaluate import BATCH_SIZE, evaluate
from fluxflow_jax.evaluation.held_out import HeldOutError, held_out
from fluxflow_jax.evaluation.text_to_image import SOLVER_STEPS
from fluxflow_jax.interop import CheckpointError, load_fluxflow
from fluxflow_jax.interop.checkpoint import METADATA_FILE
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import DataConfig, load_config, read_config
from fluxflow_jax.pipeline.export import run_models
from fluxflow_jax.pipeline.setup import load_tokenizer
from fluxflow_jax.training.lpips import LPIPS

DATA_RECORD = "data"  # the key of model_metadata.json's training_info


def data_record(data: DataConfig) -> dict[str, Any]:
    """What a run adds to its weights' ``training_info`` so that they can be evaluated
    on the samples it held out."""
    return {DATA_RECORD: dataclasses.asdict(data)}


def recorded_data(path: Path) -> DataConfig | None:
    """The data section a run recorded beside its weights, if any."""
    metadata = (path if path.is_dir() else path.parent) / METADATA_FILE
    try:
        info = json.loads(metadata.read_text()).get("training_info", {})
    except (OSError, ValueError, AttributeError):
        return None
    data = info.get(DATA_RECORD) if isinstance(info, dict) else None
    return read_config({"data": data}, source=str(metadata)).data if data else None


def _models(path: Path, ema: bool) -> FluxFlowModels:
    """A run directory's newest weights (its averages with ``ema``), or a checkpoint's."""
    if path.is_dir():
        return run_models(path, ema=ema)
    if ema:
        raise CheckpointError(f"{path} is a checkpoint file, which keeps no averages; "
                              "give the run directory for --ema, or drop --ema")
    return load_fluxflow(path)


def evaluate_checkpoint(path: str | os.PathLike, *, ema: bool = False,
                        config: str | os.PathLike | None = None, samples: int | None = None,
                        lpips_weights: str | os.PathLike | None = None,
                        use_lpips: bool = True, batch_size: int = BATCH_SIZE,
                        steps: int = SOLVER_STEPS) -> dict[str, float]:
    """Every held-out metric of the weights at ``path`` (``evaluate``), on the held-out
    share of the data the run recorded (or ``config``'s data section)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a training run's output "
                              "directory or a checkpoint")
    models = _models(path, ema)
    data = load_config(config).data if config is not None else recorded_data(path)
    if data is None:
        raise HeldOutError(f"{path} records no training data to hold samples out of (a "
                           "run of this version records it at each step end); pass "
                           "--config with the config the model trained with")
    lpips = LPIPS.from_file(lpips_weights) if use_lpips else None
    return evaluate(models, held_out(data, load_tokenizer(data), samples), lpips=lpips,
                    batch_size=batch_size, steps=steps)
