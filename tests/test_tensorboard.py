"""TensorBoard event files, sample images every ``sample_interval`` global steps and a
profiler trace, read back from a tiny two-step run; a resumed run continues the curves
without duplicate steps. The events are read with the writer package's own protocol buffers
and a plain TFRecord reader written here."""

from __future__ import annotations

import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest

from fluxflow_jax.pipeline.config import ConfigError, load_config
from fluxflow_jax.pipeline.run import Run
from pipeline_helpers import VAE_THEN_FLOW, records, write_config

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")

OUTPUT = {"checkpoint_save_interval": 1, "keep_last": 10, "tensorboard": True, "no_samples": False,
          "sample_interval": 2, "sample_steps": 2, "profile_steps": "1:2"}


def events(directory: Path) -> list:
    """Every event of every file in ``directory``."""
    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            out.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return out


def summaries(directory: Path) -> Counter:
    """How often each (tag, global step) was written."""
    return Counter((value.tag, event.step) for event in events(directory)
                   if event.HasField("summary") for value in event.summary.value)


def scalars(directory: Path, tag: str) -> dict[int, float]:
    return {event.step: value.simple_value for event in events(directory)
            if event.HasField("summary") for value in event.summary.value
            if value.tag == tag}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    tmp = tmp_path_factory.mktemp("tensorboard")
    config = write_config(tmp, VAE_THEN_FLOW, output=OUTPUT)
    lines: list[str] = []
    Run(load_config(config), echo=lines.append).run()
    return config, tmp / "run", lines


def test_scalars_images_and_steps(whole):
    _, output, _ = whole
    vae, flow = (summaries(output / "tensorboard" / name) for name in ("vae", "flow"))
    assert max(vae.values()) == max(flow.values()) == 1  # no (tag, step) twice
    for tag in ("train/loss_recon", "train/loss_kl", "learning_rate/vae",
                "speed/images_per_second", "speed/seconds_per_batch"):
        assert {step for t, step in vae if t == tag} == {1, 2, 3}, tag
    for tag in ("train/flow_loss", "learning_rate/flow", "train/grad_norm_flow"):
        assert {step for t, step in flow if t == tag} == {4, 5, 6}, tag
    # Samples every 2 global steps and at each stage's end, as images.
    assert {step for t, step in vae if t == "samples/vae"} == {2, 3}
    assert {step for t, step in flow if t == "samples/32x32"} == {4, 6}
    assert sorted(p.name for p in (output / "samples").iterdir()) == [
        "sample_flow_epoch_1_batch_1_32x32.png", "sample_flow_epoch_1_batch_3_32x32.png",
        "sample_vae_epoch_1_batch_2_vae.png", "sample_vae_epoch_1_batch_3_vae.png"]
    # The curves are the metrics file's values.
    logged = {r["global_step"]: r["metrics"]["flow_loss"] for r in records(output, "flow")}
    assert scalars(output / "tensorboard" / "flow", "train/flow_loss") == \
        pytest.approx(logged, rel=1e-6)


def test_the_profile_of_the_chosen_steps_is_written(whole):
    _, output, lines = whole
    for pattern in ("*.xplane.pb", "perfetto_trace.json.gz"):
        traces = list((output / "profile").rglob(pattern))
        assert len(traces) == 1 and traces[0].stat().st_size > 0, pattern
    assert f"Profile of global steps 2-2 written to {output / 'profile'}" in " ".join(lines)


@pytest.mark.parametrize("stop", [2, 4])  # within the first stage, within the second
def test_a_resumed_run_continues_the_curves_without_duplicates(whole, tmp_path, stop):
    """The stopped copy's event files hold the whole run's later steps (as after a kill
    between two checkpoints): the resumed run drops them and writes them once."""
    config, output, _ = whole
    stopped = tmp_path / "stopped"
    shutil.copytree(output, stopped)
    for later in (stopped / "checkpoints").iterdir():
        if later.name.isdigit() and int(later.name) > stop:
            shutil.rmtree(later)
    lines: list[str] = []
    Run(load_config(config, {"output": {"output_path": str(stopped), "profile_steps": None}}),
        echo=lines.append).run()
    assert any(line.startswith(f"Resuming from checkpoint {stop}") for line in lines)
    for name in ("vae", "flow"):
        again, first = (summaries(o / "tensorboard" / name) for o in (stopped, output))
        assert set(again) == set(first) and max(again.values()) == 1, name
    assert scalars(stopped / "tensorboard" / "flow", "train/flow_loss") == \
        scalars(output / "tensorboard" / "flow", "train/flow_loss")


def test_a_bad_profile_range_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"output.profile_steps' must be 'A:B'.*got '5:5'"):
        load_config(write_config(tmp_path, VAE_THEN_FLOW, output={"profile_steps": "5:5"}))
