"""Killing a training run at any moment loses nothing: SIGKILLed runs, restarted, log the
same per-batch losses and write the same files, bit for bit, as a run never interrupted.
SIGTERM and SIGINT (once or repeated) stop a run after its batch with a complete checkpoint
and exit status 128 + the signal, and the resumed run goes on exactly."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fluxflow_jax.pipeline.checkpoints import RunCheckpoints
from fluxflow_jax.pipeline.config import load_config
from fluxflow_jax.pipeline.run import Run
from pipeline_helpers import VAE_THEN_FLOW, assert_same_losses, write_config


# The processes load the steps this one compiles from the compilation cache (conftest).
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _train_process(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fluxflow_jax.cli", "train", "--config",
                             str(config)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _logged_batches(output: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in (output / "graph").glob("*.jsonl")) \
        if (output / "graph").is_dir() else 0


def _wait_for_batches(process: subprocess.Popen, output: Path, count: int) -> None:
    while _logged_batches(output) < count and process.poll() is None:
        time.sleep(0.05)


def _digest(output: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in output.glob("*.safetensors")}


def test_killed_runs_resume_bit_for_bit(tmp_path):
    """SIGKILL mid-run (checkpoints are written after every batch, so the kill lands
    mid-save too); the restarted run's per-batch losses and final files equal those of a run
    never interrupted, here trained in this process."""
    output = {"checkpoint_save_interval": 1}
    whole = write_config(tmp_path, VAE_THEN_FLOW, name="whole", output=output)
    killed = write_config(tmp_path, VAE_THEN_FLOW, name="killed", output=output)
    Run(load_config(whole), echo=lambda line: None).run()  # compiles into the cache

    process = _train_process(killed)
    _wait_for_batches(process, tmp_path / "killed", 2)
    time.sleep(np.random.default_rng(0).uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    finish = _train_process(killed)
    assert finish.wait(timeout=600) == 0, finish.stderr.read().decode()[-2000:]

    assert_same_losses(tmp_path / "killed", tmp_path / "whole")
    assert _digest(tmp_path / "killed") == _digest(tmp_path / "whole")
    assert len(_digest(tmp_path / "whole")) == 15  # per step 3 + 3 averaged; the latest 3


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """The output of VAE_THEN_FLOW trained without interruption (default checkpoint
    interval: a stopped run's only mid-run checkpoint is the one its stop writes)."""
    tmp = tmp_path_factory.mktemp("whole")
    Run(load_config(write_config(tmp, VAE_THEN_FLOW)), echo=lambda line: None).run()
    return tmp / "run"


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGTERM,
                                                         signal.SIGINT)],
                         ids=["sigterm", "repeated"])
def test_a_stop_signal_saves_the_batch_and_exits_with_its_status(whole_run, tmp_path,
                                                                    signals):
    """The first signal decides the status; the later ones, sent while the batch finishes
    and its checkpoint is written, change nothing. The checkpoint holds every batch the run
    logged, and the resumed run logs what the uninterrupted one did."""
    config = write_config(tmp_path, VAE_THEN_FLOW, name="stopped")
    output = tmp_path / "stopped"
    process = _train_process(config)
    _wait_for_batches(process, output, 2)  # of 6
    for signum in signals:
        process.send_signal(signum)
        time.sleep(0.01)
    assert process.wait(timeout=120) == 128 + signals[0]
    stderr = process.stderr.read().decode()
    assert "Traceback" not in stderr
    logged = _logged_batches(output)
    assert f"stopped by {signals[0].name} after global step {logged}: checkpoint {logged} " \
        f"is saved in {output / 'checkpoints'}; run the same command again to resume" in stderr
    if len(signals) > 1:
        assert f"{signals[1].name} received again" in stderr
    names = [p.name for p in (output / "checkpoints").iterdir()]
    assert all(name.isdigit() for name in names) and max(map(int, names)) == logged, names
    with RunCheckpoints(output / "checkpoints", read_only=True) as checkpoints:
        step, _, damaged = checkpoints.newest_intact(checkpoints.restore_arrays, fix="")
    assert (step, damaged) == (logged, [])

    Run(load_config(config), echo=lambda line: None).run()
    assert_same_losses(output, whole_run)
