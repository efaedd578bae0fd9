"""A step that cannot fit in memory is refused after compiling, before its first batch, with
one message: what was asked, what it needs, what is available and what to change."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fluxflow_jax import cli
from fluxflow_jax.pipeline import memory
from fluxflow_jax.pipeline.memory import MIB, DoesNotFit, check_fits
from fluxflow_jax.training.performance import MemoryUse
from pipeline_helpers import VAE_THEN_FLOW, write_config

LEVERS = ("training.batch_size", "data.img_size", "training.precision: bf16",
          "training.remat: true", "training.shard_params: true", "more devices")


def test_train_stops_before_the_first_batch_naming_the_levers(tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setattr(memory, "host_available_bytes", lambda: MIB)
    config = write_config(tmp_path, VAE_THEN_FLOW)
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "fluxflow-jax train: error: the train step of 'vae' (batch_size 2, images " \
           "2x32x32x3, img_size 32, vae_dim" in err
    assert "but only 1 MiB is available host memory" not in err  # the state counts too
    assert "MiB is available host memory; to fit: " in err
    assert all(lever in err for lever in LEVERS), err
    assert "Traceback" not in err
    run = tmp_path / "run"  # no batch trained
    assert not any(p.read_text() for p in (run / "graph").glob("*.jsonl"))
    assert not list((run / "checkpoints").iterdir())


def _device(platform: str, limit: int | None) -> SimpleNamespace:
    return SimpleNamespace(platform=platform, device_kind="NVIDIA H100",
                           memory_stats=lambda: {"bytes_limit": limit} if limit else None)


USE = MemoryUse(arguments=100 * MIB, outputs=10 * MIB, temporary=900 * MIB)  # 1010 MiB


@pytest.mark.parametrize("limit, fits", [(1010 * MIB, True), (1009 * MIB, False),
                                         (None, True)])
def test_an_accelerator_holds_the_whole_program(limit, fits):
    """Arguments, outputs and temporaries against the device's memory; no limit known: no
    refusal."""
    devices = [_device("gpu", limit)] * 4  # each device has its own memory
    if fits:
        check_fits(USE, devices, "the step", "less")
    else:
        with pytest.raises(DoesNotFit, match=r"^the step needs 1,010 MiB \(900 MiB "
                                              r"activations and workspace, 110 MiB state, "
                                              r"batch and outputs, per device, 4 device\(s\)"
                                              r"\), but only 1,009 MiB is NVIDIA H100 memory "
                                              r"per device; to fit: less$"):
            check_fits(USE, devices, "the step", "less")


@pytest.mark.parametrize("free, fits", [(1820 * MIB, True), (1819 * MIB, False)])
def test_cpu_devices_share_the_host_memory(monkeypatch, free, fits):
    """Two CPU devices need 2 x 1010 MiB, of which their arguments (2 x 100 MiB) are
    allocated already."""
    monkeypatch.setattr(memory, "host_available_bytes", lambda: free)
    devices = [_device("cpu", None)] * 2
    if fits:
        check_fits(USE, devices, "the step", "less")
    else:
        with pytest.raises(DoesNotFit, match="needs 2,020 MiB .* but only 2,019 MiB is "
                                             "available host memory"):
            check_fits(USE, devices, "the step", "less")


def test_validate_memory_prints_each_steps_estimate(tmp_path, capsys, monkeypatch):
    config = str(write_config(tmp_path, VAE_THEN_FLOW))
    assert cli.main(["validate", config, "--memory"]) == 0
    out = capsys.readouterr().out
    for step in ("vae", "flow"):
        assert f"Compiled step {step} for " in out
    assert out.count("MiB activations\n  fits: needs ") == 2
    assert out.count(" MiB available host memory\n") == 2

    monkeypatch.setattr(memory, "host_available_bytes", lambda: MIB)
    assert cli.main(["validate", config, "--memory"]) == 2
    err = capsys.readouterr().err
    assert "✗ the train step of 'vae' (batch_size 2" in err
    assert "✗ the train step of 'flow' (batch_size 2" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
