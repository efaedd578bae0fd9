"""Killing a training run at any moment loses nothing: SIGKILLed runs, restarted, log the
same per-batch losses and write the same files, bit for bit, as a run never interrupted."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fluxflow_jax.pipeline.config import load_config
from fluxflow_jax.pipeline.run import Run
from pipeline_helpers import VAE_THEN_FLOW, assert_same_losses, write_config


def _train_process(config: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fluxflow_jax.cli", "train", "--config",
                             str(config)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _logged_batches(output: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in (output / "graph").glob("*.jsonl")) \
        if (output / "graph").is_dir() else 0


def _digest(output: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in output.glob("*.safetensors")}


def test_killed_runs_resume_bit_for_bit(tmp_path):
    """SIGKILL mid-run (checkpoints are written after every batch, so the kill lands
    mid-save too); the restarted run's per-batch losses and final files equal those of a run
    never interrupted, here trained in this process."""
    # The processes load the steps this one compiles from the compilation cache (conftest).
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    output = {"checkpoint_save_interval": 1}
    whole = write_config(tmp_path, VAE_THEN_FLOW, name="whole", output=output)
    killed = write_config(tmp_path, VAE_THEN_FLOW, name="killed", output=output)
    Run(load_config(whole), echo=lambda line: None).run()  # compiles into the cache

    process = _train_process(killed, env)
    while _logged_batches(tmp_path / "killed") < 2 and process.poll() is None:  # of 6
        time.sleep(0.05)
    time.sleep(np.random.default_rng(0).uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    finish = _train_process(killed, env)
    assert finish.wait(timeout=600) == 0, finish.stderr.read().decode()[-2000:]

    assert_same_losses(tmp_path / "killed", tmp_path / "whole")
    assert _digest(tmp_path / "killed") == _digest(tmp_path / "whole")
    assert len(_digest(tmp_path / "whole")) == 15  # per step 3 + 3 averaged; the latest 3
