"""The training run end to end: stages, freezing, max_steps, transitions, outputs, standard
mode. Runs use the tiny model on 8 demo images of 32 px (4 batches of 2 per epoch)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax import cli
from fluxflow_jax.interop import load_fluxflow
from fluxflow_jax.pipeline.config import ConfigError, load_config
from fluxflow_jax.pipeline.run import Position, Run, transition_due
from fluxflow_jax.pipeline.stages import build_stages
from pipeline_helpers import (TINY_MODEL, VAE_THEN_FLOW, records, same_prefix, tensors,
                              write_config)
from tiny import TINY

# ----------------------------------------------------------------------------- stages

def test_freezing_persists_and_max_steps_ends_each_step(tmp_path, monkeypatch):
    """vae trains the autoencoder; flow freezes it (freeze_vae) and trains the flow; flow2,
    which says nothing about freezing, inherits the frozen autoencoder. Every step stops
    after max_steps batches and exports its own files, which PyTorch loads strictly."""
    config = write_config(tmp_path, VAE_THEN_FLOW + [
        {"name": "flow2", "n_epochs": 1, "max_steps": 3, "train_diff": True}])
    lines, frozen = [], []
    freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freeze(), frozen.append(gc.get_freeze_count())))
    position = Run(load_config(config), echo=lines.append).run()
    out = tmp_path / "run"
    # Each step's compilation put the live objects out of the collector's reach; the end
    # of each step gave them back (a later step's garbage cycles are still collected).
    assert len(frozen) == 3 and min(frozen) > 10_000, frozen
    assert gc.get_freeze_count() == 0

    assert [len(records(out, s)) for s in ("vae", "flow", "flow2")] == [3, 3, 3]
    assert position.global_step == 9 and position.stages_completed == ["vae", "flow", "flow2"]
    assert "Step 'flow' finished: reached max_steps (3 batches)" in lines
    vae, flow, flow2 = (tensors(out / f"flxflow_step_{s}_final.safetensors")
                        for s in ("vae", "flow", "flow2"))
    for part in ("diffuser.compressor.", "diffuser.expander."):
        assert same_prefix(vae, flow, part) and same_prefix(flow, flow2, part), part
    assert not same_prefix(vae, flow, "diffuser.flow_processor.")
    assert not same_prefix(flow, flow2, "diffuser.flow_processor.")
    # The latest export is the last step's, and loads as a whole model.
    assert same_prefix(tensors(out / "flxflow_final.safetensors"), flow2, "diffuser.")
    assert set(load_fluxflow(out).present()) == {"compressor", "flow_processor", "expander",
                                                 "text_encoder", "discriminator"}

    torch = pytest.importorskip("torch")
    from fluxflow.models.pipeline import FluxPipeline

    import torch_reference as ref

    pipe = FluxPipeline(ref.compressor(TINY), ref.flow_processor(TINY), ref.expander(TINY))
    pipe.load_state_dict({k.removeprefix("diffuser."): torch.from_numpy(v)
                          for k, v in vae.items()}, strict=True)


def _stage(tmp_path, transition: dict, n_epochs: int = 5):
    config = load_config(write_config(tmp_path, [
        {"name": "s", "n_epochs": n_epochs, "train_vae": True, "transition_on": transition}]))
    return build_stages(config, batches_per_epoch=4)[0]


def _epoch_ends(stage, values_per_epoch: list[list[float]]) -> tuple[int, str]:
    """Feed one list of metric values per epoch; (epochs run, reason) when the stage ends."""
    position = Position()
    for values in values_per_epoch:
        position.history = (position.history + values)[-20:]
        position.epoch += 1
        done, reason = transition_due(stage, position)
        if done:
            return position.epoch, reason
    raise AssertionError("the stage never ended")


@pytest.mark.parametrize("transition, values, epochs, reason", [
    # threshold met at the first epoch end
    ({"mode": "loss_threshold", "metric": "loss_recon", "threshold": 0.5},
     [[0.4] * 4] * 5, 1, "loss_recon=0.4000 < 0.5"),
    # the reference's metric name; strictly below: a mean of exactly 0.5 at epoch 2 is not
    ({"mode": "loss_threshold", "metric": "vae_loss", "threshold": 0.5},
     [[0.9] * 4, [0.1] * 4] + [[0.1] * 4] * 3, 3, "loss_recon=0.3667 < 0.5"),
    # comparison ">": means 0.1, 0.5 (not strictly above), then 0.6333
    ({"mode": "loss_threshold", "metric": "loss_recon", "threshold": 0.5, "comparison": ">"},
     [[0.1] * 4, [0.9] * 4] + [[0.9] * 4] * 3, 3, "loss_recon=0.6333 > 0.5"),
    # the short form; means 0.5, 0.3667, 0.3, then 0.26
    ("loss_recon < 0.29", [[0.9] * 4, [0.1] * 4] + [[0.1] * 4] * 3, 5, "loss_recon=0.2600"),
    # mean of the last 20: 12 values of 1.0 and 8 of 0.0 is 0.6, not yet below 0.5
    ({"mode": "loss_threshold", "metric": "loss_recon", "threshold": 0.5},
     [[1.0] * 20, [0.0] * 8, [0.0] * 4, [0.0] * 4, [0.0] * 4], 3, "0.4000 < 0.5"),
    # min_epochs: met from the start, but only looked at from epoch 3
    ({"mode": "loss_threshold", "metric": "loss_recon", "threshold": 0.5, "min_epochs": 3},
     [[0.1] * 4] * 5, 3, "threshold met"),
    # patience: below at epochs 1, 3, 4 -> two in a row first at epoch 4
    ({"mode": "loss_threshold", "metric": "loss_recon", "threshold": 0.5, "patience": 2},
     [[0.1] * 20, [0.9] * 20, [0.1] * 20, [0.1] * 20, [0.1] * 20], 4, "2 epoch end(s)"),
    # never met: max_epochs ends it
    ({"mode": "loss_threshold", "metric": "loss_recon", "threshold": 0.01, "max_epochs": 2},
     [[0.4] * 4] * 5, 2, "completed 2 epoch(s)"),
    # epoch mode: n_epochs
    ({"mode": "epoch"}, [[0.0] * 4] * 5, 5, "completed 5 epoch(s)"),
])
def test_transitions(tmp_path, transition, values, epochs, reason):
    ended_after, why = _epoch_ends(_stage(tmp_path, transition), values)
    assert ended_after == epochs
    assert reason in why


def test_threshold_transition_ends_a_running_stage(tmp_path):
    """A threshold every batch meets ends the stage at its first epoch end (of five)."""
    config = write_config(tmp_path, [
        {"name": "a", "n_epochs": 5, "train_vae": True,
         "transition_on": {"mode": "loss_threshold", "metric": "loss_kl",
                           "threshold": 1.0e6}}])
    lines = []
    Run(load_config(config), echo=lines.append).run()
    assert len(records(tmp_path / "run", "a")) == 4
    assert any(line.startswith("Step 'a' finished: loss_kl=") for line in lines)


def test_samples_during_training(tmp_path):
    """At every 2nd checkpoint and each step's end: reconstructions in the VAE step,
    text-to-image at each configured size in the flow step."""
    config = write_config(
        tmp_path, VAE_THEN_FLOW,
        output={"no_samples": False, "checkpoint_save_interval": 1,
                "samples_per_checkpoint": 2, "sample_sizes": [32, "48x32"],
                "sample_steps": 2, "sample_captions": ["a red circle", "a blue star"]})
    Run(load_config(config), echo=lambda line: None).run()
    files = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "run" / "samples").iterdir()}
    assert {name: image.shape for name, image in files.items()} == {
        # rows: the first 2 images; columns: original, with context, without
        "sample_vae_epoch_1_batch_2_vae.png": (64, 96, 3),
        "sample_vae_epoch_1_batch_3_vae.png": (64, 96, 3),
        # the captions side by side
        "sample_flow_epoch_1_batch_2_32x32.png": (32, 64, 3),
        "sample_flow_epoch_1_batch_2_48x32.png": (32, 96, 3),
        "sample_flow_epoch_1_batch_3_32x32.png": (32, 64, 3),
        "sample_flow_epoch_1_batch_3_48x32.png": (32, 96, 3)}
    originals = [files[f"sample_vae_epoch_1_batch_{b}_vae.png"][:, :32] for b in (2, 3)]
    assert np.array_equal(*originals)  # the same fixed images every time
    for kind in ("vae_epoch_1_batch_{}_vae", "flow_epoch_1_batch_{}_32x32"):
        assert not np.array_equal(files[f"sample_{kind.format(2)}.png"],
                                  files[f"sample_{kind.format(3)}.png"]), kind


def test_sample_sizes_the_model_cannot_make_are_reported(tmp_path):
    config = write_config(tmp_path, [{"name": "a", "n_epochs": 1, "train_diff": True}],
                          output={"no_samples": False, "sample_sizes": [30]})
    with pytest.raises(ConfigError, match="output.sample_sizes: 30x30"):
        Run(load_config(config), echo=lambda line: None)


# ----------------------------------------------------------------------------- standard mode

def test_standard_mode_from_yaml_and_flags(tmp_path, capsys):
    """No pipeline: one unnamed step from the training section; flags override the file."""
    config = write_config(tmp_path, None, training={"batch_size": 4, "train_vae": False})
    out = tmp_path / "flags_out"
    status = cli.main(["train", "--config", str(config), "--train_vae", "--batch_size", "2",
                       "--n_epochs", "2", "--max_steps", "3", f"--output_path={out}",
                       "--lr", "1e-3"])
    assert status == 0
    logged = records(out, "")
    assert len(logged) == 3
    assert logged[0]["learning_rates"]["lr_vae"] == pytest.approx(1e-3)
    assert (out / "flxflow_final.safetensors").is_file()
    assert not list(out.glob("flxflow_step_*"))
    assert "TRAINING COMPLETE" in capsys.readouterr().out


def test_a_finished_run_is_not_trained_again_and_no_resume_restarts(tmp_path, capsys):
    # VAE_THEN_FLOW's VAE step (at the pipeline defaults' lr) in standard mode: the same
    # program, so it comes from the compilation cache.
    config = write_config(tmp_path, None, training={"train_vae": True, "lr": 1.0e-3,
                                                    "n_epochs": 1, "max_steps": 3})
    assert cli.main(["train", "--config", str(config)]) == 0
    first = (tmp_path / "run" / "flxflow_final.safetensors").read_bytes()
    assert cli.main(["train", "--config", str(config)]) == 0
    assert "is complete" in capsys.readouterr().out
    assert cli.main(["train", "--config", str(config), "--no_resume", "--seed", "1"]) == 0
    assert (tmp_path / "run" / "flxflow_final.safetensors").read_bytes() != first


def test_resuming_with_other_steps_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, VAE_THEN_FLOW[:1])
    assert cli.main(["train", "--config", str(config)]) == 0
    other = write_config(tmp_path, [{"name": "b", "n_epochs": 1, "train_vae": True}])
    assert cli.main(["train", "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of another run" in err and "--no_resume" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- versions

@pytest.mark.parametrize("version", ["0.7.0", "0.8.0"])
def test_a_context_channel_run_trains_samples_averages_and_restarts_from_its_output(
        tmp_path, version):
    """v070's latents (v080's too, whose flow adds pillar FiLM) carry 5 context channels:
    the VAE-GAN step (its discriminator conditioned on the 21-wide mean token), the flow
    step predicting all 21 channels, its samples, the averages and a new run started from
    the output all work on them."""
    model = {**TINY_MODEL, "model_version": version}
    output = {"no_samples": False, "sample_sizes": [32], "sample_steps": 2,
              "sample_captions": ["a red circle"]}
    config = write_config(tmp_path, VAE_THEN_FLOW, model=model, output=output)
    Run(load_config(config), echo=lambda line: None).run()
    out = tmp_path / "run"
    for step in ("vae", "flow"):
        logged = [m for r in records(out, step) for m in r["metrics"].values()]
        assert len(records(out, step)) == 3 and np.all(np.isfinite(logged)), step
    assert {p.name for p in (out / "samples").iterdir()} == {
        "sample_vae_epoch_1_batch_3_vae.png", "sample_flow_epoch_1_batch_3_32x32.png"}
    flow_ema = tensors(out / "flxflow_step_flow_ema.safetensors")
    assert flow_ema["diffuser.flow_processor.dmodel_to_vae.weight"].shape == (16 + 5, 16)
    loaded = load_fluxflow(out)
    assert loaded.config.model_version == version
    assert loaded.discriminator.ctx_proj[0].linear.kernel.shape[0] == 16 + 5

    again = write_config(tmp_path, VAE_THEN_FLOW[1:], name="again", model=model,
                         model_checkpoint=str(out))
    Run(load_config(again), echo=lambda line: None).run()
    assert all(np.isfinite(list(r["metrics"].values())).all()
               for r in records(tmp_path / "again", "flow"))
