"""Unreadable samples in a training run: reported before training (a header scan, which
``validate`` shows too), counted per epoch in the log, or stopping the run when asked."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from fluxflow_jax.cli import main
from pipeline_helpers import TINY_MODEL


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def dataset(folder: Path, missing: bool) -> dict:
    """Three good images, one whose header reads but whose pixels do not, and (if
    ``missing``) a captioned image that does not exist."""
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in "abc":
        (images / f"{name}.png").write_bytes(_png(rng.integers(0, 255, (32, 32, 3), np.uint8)))
    (images / "cut.png").write_bytes(_png(rng.integers(0, 255, (32, 32, 3), np.uint8))[:-200])
    names = ["a.png", "b.png", "c.png", "cut.png"] + (["gone.png"] if missing else [])
    captions = folder / "captions.txt"
    captions.write_text("".join(f"{name}\ta shape\n" for name in names))
    return {"data_path": str(images), "captions_file": str(captions), "img_size": 32,
            "max_length": 16}


def write_config(folder: Path, data: dict) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "data": data,
        "training": {"batch_size": 2, "devices": 1, "pipeline": {"steps": [
            {"name": "vae", "n_epochs": 1, "train_vae": True}]}},
        "output": {"output_path": str(folder / "out"), "no_samples": True,
                   "generate_diagrams": False}}))
    return path


def test_skips_are_reported_before_training_and_per_epoch(tmp_path, capsys):
    config = write_config(tmp_path, dataset(tmp_path, missing=True))
    assert main(["validate", str(config)]) == 0
    gone = tmp_path / "images" / "gone.png"
    assert (f"Data: 1 unreadable sample(s) skipped (1 in all; the first: {gone}: image file "
            "not found)") in capsys.readouterr().out
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"Before training: 1 unreadable sample(s) skipped (1 in all; the first: {gone}" in out
    assert "Epoch 1: 1 unreadable sample(s) skipped (2 in all;" in out


def test_on_bad_sample_error_stops_the_run_naming_the_sample(tmp_path, capsys):
    config = write_config(tmp_path, {**dataset(tmp_path, missing=False),
                                     "on_bad_sample": "error"})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"bad sample {tmp_path / 'images' / 'cut.png'}: unreadable image" in err
    assert "on_bad_sample is 'error'" in err
