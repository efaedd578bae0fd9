"""Tiny training-run configs and readers of a run's outputs, shared by the run tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import safetensors.numpy
import yaml

from fluxflow_jax.models import FluxFlowConfig
from tiny import TINY

# The tiny model with the real tokenizer's vocabulary (the demo captions use every id).
TINY_MODEL = {f.name: getattr(TINY, f.name) for f in dataclasses.fields(FluxFlowConfig)
              if getattr(TINY, f.name) != f.default and f.name != "text_vocab_size"}
DATA = {"use_demo": True, "demo_samples": 8, "img_size": 32, "max_length": 16}
# A VAE step, then a flow step with the VAE frozen, each stopped by max_steps. Tests that run
# these same steps compile each once; the others load the programs from the cache.
VAE_THEN_FLOW = [{"name": "vae", "n_epochs": 1, "max_steps": 3, "train_vae": True},
                 {"name": "flow", "n_epochs": 3, "max_steps": 3, "train_diff": True,
                  "freeze_vae": True}]


def write_config(tmp_path: Path, steps: list[dict] | None, *, name: str = "run",
                 training: dict | None = None, output: dict | None = None,
                 model: dict | None = None, **top: object) -> Path:
    """A tiny-model config (or ``model``); ``steps`` None makes it a standard-mode config;
    ``top`` adds top-level keys (model_checkpoint)."""
    training = {"batch_size": 2, "devices": 1, **(training or {})}
    if steps is not None:
        training["pipeline"] = {"defaults": {"lr": 1.0e-3}, "steps": steps}
    document = {"model": TINY_MODEL if model is None else model, "data": DATA, "training": training,
                "output": {"output_path": str(tmp_path / name), "log_interval": 1,
                           "generate_diagrams": False, "no_samples": True,
                           **(output or {})}, **top}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def records(output: Path, step: str) -> list[dict]:
    suffix = f"_{step}" if step else ""
    lines = (output / "graph" / f"training_metrics{suffix}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_same_losses(output: Path, expected: Path, steps: tuple[str, ...] = ("vae", "flow")
                       ) -> None:
    """Both runs logged the same metrics at the same global steps, in each of ``steps``."""
    for step in steps:
        assert [(r["global_step"], r["metrics"]) for r in records(output, step)] == \
            [(r["global_step"], r["metrics"]) for r in records(expected, step)], step


def tensors(path: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(path))


def same_prefix(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(np.array_equal(a[k], b[k]) for k in keys)
