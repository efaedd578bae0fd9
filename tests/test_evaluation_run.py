"""Validation during a tiny training run, and ``fluxflow-jax evaluate`` on its output.

The run trains the tiny model on the demo data at 32 px: a flow step on the fresh
autoencoder (whose latents are still small, so the flow's loss is of order one), then the
autoencoder. Both are validated on 4 held-out samples every 8 batches, and the flow step
at its epoch ends (4 batches), where it may end on its validation metric.
"""

from __future__ import annotations

import json

import pytest
import yaml
from flax import nnx

from fluxflow_jax import cli
from fluxflow_jax.evaluation import metric_names
from fluxflow_jax.interop import save_fluxflow
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import (ConfigError, DataConfig, OutputConfig, RunConfig,
                                          TransitionConfig, load_config)
from fluxflow_jax.pipeline.graphs import write_graphs
from fluxflow_jax.pipeline.run import Run
from fluxflow_jax.pipeline.stages import build_stages
from fluxflow_jax.pipeline.validation import Validation
from pipeline_helpers import records, write_config
from tiny import TINY

HELD_OUT = 4
FLOW_TARGET = 0.63  # the flow step's val_flow_v_loss starts near 0.67
STEPS = [
    {"name": "flow", "n_epochs": 6, "train_diff": True, "freeze_vae": True,
     "optimizers": {"flow": {"type": "AdamW", "lr": 3.0e-3, "weight_decay": 0.0}},
     "transition_on": f"val_flow_v_loss < {FLOW_TARGET}"},
    {"name": "vae", "n_epochs": 12, "train_vae": True, "freeze_vae": False}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lpips_files):
    """(output directory, console lines) of the tiny validated run."""
    tmp_path = tmp_path_factory.mktemp("validated")
    path = write_config(tmp_path, STEPS, output={"validation_interval": 8},
                        training={"lpips_weights": str(lpips_files["weights"])})
    document = yaml.safe_load(path.read_text())
    document["data"]["validation_samples"] = HELD_OUT
    path.write_text(yaml.safe_dump(document))
    lines: list[str] = []
    Run(load_config(path), echo=lines.append).run()
    return tmp_path / "run", lines


def _validations(output, step: str) -> list[dict]:
    return [r["metrics"] for r in records(output, step)
            if any(name.startswith("val_") for name in r["metrics"])]


def test_validation_metrics_improve_and_end_a_step(trained):
    output, lines = trained
    flow, vae = _validations(output, "flow"), _validations(output, "vae")
    # The flow step ended on its validation metric, before its 6 epochs.
    assert any("Step 'flow' finished: val_flow_v_loss=" in line and "threshold met" in line
               for line in lines), lines
    assert 2 <= len(flow) < 6 and flow[-1]["val_flow_v_loss"] < FLOW_TARGET
    assert flow[-1]["val_flow_v_loss"] < 0.95 * flow[0]["val_flow_v_loss"]
    # Reconstructions improve (slowly: the reference autoencoder learns slowly).
    assert len(vae) == 6
    assert vae[-1]["val_psnr"] > vae[0]["val_psnr"] + 0.2, [v["val_psnr"] for v in vae]
    assert set(vae[0]) == {f"val_{n}" for n in metric_names(["autoencoder"], True)}
    assert set(flow[0]) == {f"val_{n}" for n in metric_names(["flow", "text_to_image"], True)}
    assert output / "graph" / "validation_vae.png" in write_graphs(output)


def test_evaluate_command_reports_every_metric(trained, lpips_files, capsys):
    output, _ = trained
    json_file = output.parent / "metrics.json"
    assert cli.main(["evaluate", str(output), "--samples", str(HELD_OUT), "--json",
                     str(json_file), "--lpips_weights", str(lpips_files["weights"])]) == 0
    metrics = json.loads(json_file.read_text())
    assert list(metrics) == list(metric_names(["autoencoder", "flow", "text_to_image"], True))
    # The final weights are the ones the vae step's last validation measured.
    last = _validations(output, "vae")[-1]
    assert metrics["psnr"] == pytest.approx(last["val_psnr"], rel=1e-5)
    assert 0 <= metrics["background_accuracy"] <= 1
    assert "psnr" in capsys.readouterr().out


def _error(capsys, *args: str) -> str:
    """The message of a failing ``evaluate``, which exits 2 with one line."""
    assert cli.main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_evaluate_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert "does not exist" in _error(capsys, str(tmp_path / "missing"))
    assert "holds no checkpoint" in _error(capsys, str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    assert "only read from .safetensors" in _error(capsys, str(tmp_path / "notes.txt"))
    # Weights without a record of their data: the fix is --config.
    save_fluxflow(tmp_path / "bare", FluxFlowModels.create(TINY, nnx.Rngs(0)))
    assert "--config" in _error(capsys, str(tmp_path / "bare"))
    assert "--samples" in _error(capsys, str(tmp_path / "bare"), "--samples", "0")


def test_a_validation_transition_reads_and_needs_validation(tmp_path):
    config = write_config(tmp_path, [{"name": "vae", "n_epochs": 1, "train_vae": True,
                                      "transition_on": "val_psnr > 24"}])
    assert load_config(config).steps()[0].transition_on == TransitionConfig(
        mode="loss_threshold", metric="val_psnr", threshold=24.0, comparison=">")
    with pytest.raises(ConfigError, match="validation metrics need "
                                          "output.validation_interval"):
        build_stages(load_config(config), batches_per_epoch=4)


def test_validation_needs_held_out_data():
    run = RunConfig(data=DataConfig(data_path="images", captions_file="captions.txt"),
                    output=OutputConfig(validation_interval=2))
    with pytest.raises(ConfigError, match="output.validation_interval: .*built-in demo"):
        Validation(run, tokenizer=None, lpips=None)
