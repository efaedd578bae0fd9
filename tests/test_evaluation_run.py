"""Validation during a tiny training run, and ``fluxflow-jax evaluate`` on its output.

The run trains the tiny model's flow on the demo data at 32 px, with the fresh autoencoder
frozen (its latents are still small, so the flow's loss is of order one), validating on 4
held-out samples every 4 batches (an epoch) until its validation loss meets the step's
threshold. (The tiny autoencoder moves its held-out PSNR by only ~0.2 dB in 50 batches,
too little to tell from noise in a test of seconds.)
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
FLOW_TARGET = 0.53  # the flow step's val_flow_v_loss starts near 0.58 (v060 latents)
STEPS = [{"name": "flow", "n_epochs": 6, "train_diff": True, "freeze_vae": True,
          "optimizers": {"flow": {"type": "AdamW", "lr": 3.0e-3, "weight_decay": 0.0}},
          "transition_on": f"val_flow_v_loss < {FLOW_TARGET}"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lpips_files):
    """(output directory, console lines) of the tiny validated run."""
    tmp_path = tmp_path_factory.mktemp("validated")
    path = write_config(tmp_path, STEPS, output={"validation_interval": 4},
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
    flow = _validations(output, "flow")
    assert set(flow[0]) == {f"val_{n}" for n in metric_names(["flow", "text_to_image"], True)}
    # The step ended on its validation metric, before its 6 epochs, having learnt.
    assert any("Step 'flow' finished: val_flow_v_loss=" in line and "threshold met" in line
               for line in lines), lines
    assert 2 <= len(flow) < 6 and flow[-1]["val_flow_v_loss"] < FLOW_TARGET
    assert flow[-1]["val_flow_v_loss"] < 0.95 * flow[0]["val_flow_v_loss"]
    assert output / "graph" / "validation_flow.png" in write_graphs(output)


def test_evaluate_command_reports_every_metric(trained, capsys):
    output, _ = trained
    json_file = output.parent / "metrics.json"
    # Without LPIPS: compiling VGG16 would double the test's time (LPIPS: test_lpips.py).
    assert cli.main(["evaluate", str(output), "--samples", str(HELD_OUT), "--json",
                     str(json_file), "--no_lpips"]) == 0
    metrics = json.loads(json_file.read_text())
    assert list(metrics) == list(metric_names(["autoencoder", "flow", "text_to_image"],
                                              with_lpips=False))
    # The final weights are the ones the step's last validation measured.
    last = _validations(output, "flow")[-1]
    assert metrics["flow_v_loss"] == pytest.approx(last["val_flow_v_loss"], rel=1e-5)
    assert metrics["position_accuracy"] == last["val_position_accuracy"]
    assert 0 < metrics["ssim"] < 1 and metrics["psnr"] > 0
    assert "flow_v_loss" in capsys.readouterr().out


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
    # The tiny text encoder's 64 ids against the tokenizer's vocabulary.
    config = write_config(tmp_path, [{"name": "vae", "n_epochs": 1, "train_vae": True}])
    assert "64-token vocabulary" in _error(capsys, str(tmp_path / "bare"), "--config",
                                           str(config))


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
