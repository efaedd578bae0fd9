"""Data parallelism: a step on 8 (CPU) devices equals the single-device step (the VAE-GAN
step here, the flow step within the run below), and a run moves between device counts."""

import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.parallel import data_mesh, sharded_spec
from fluxflow_jax.pipeline import run as run_module
from fluxflow_jax.pipeline.config import load_config
from fluxflow_jax.pipeline.run import Run
from fluxflow_jax.training import StageConfig, TrainStep, VAEOptions
from pipeline_helpers import DATA, records, tensors, write_config
from tiny import TINY
from tiny_steps import CONSTANT

SGD = {"type": "SGD", "lr": 0.05}
BATCH = 8
RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(-1, 1, (BATCH, 32, 32, 3)).astype(np.float32)
# R1 on the second batch, adaptive weights, EMA, GAN routing: everything the step has.
VAE_GAN = StageConfig(vae=VAEOptions(use_lpips=False, r1_interval=2),
                      optimizers={"vae": SGD, "discriminator": SGD},
                      schedulers={"vae": CONSTANT, "discriminator": CONSTANT}, total_steps=2)


def two_steps(stage, batch, mesh):
    models = FluxFlowModels.create(TINY, nnx.Rngs(0))
    step = TrainStep(models, stage, mesh=mesh)
    state = step.init_state(models)
    metrics = []
    for k in range(2):
        state, m = step(state, batch, jax.random.key(k))
        metrics.append({name: float(v) for name, v in m.items()})
    return state, metrics


def test_eight_devices_equal_one():
    assert len(jax.devices()) == 8
    single_state, single = two_steps(VAE_GAN, {"images": IMAGES}, None)
    multi_state, multi = two_steps(VAE_GAN, {"images": IMAGES}, data_mesh())
    for a, b in zip(single, multi, strict=True):
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
    leaf = jax.tree.leaves(multi_state.params)[0]
    assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x),
                                                         rtol=1e-5, atol=1e-6),
                 single_state.params, multi_state.params)


def test_a_batch_that_does_not_split_is_named():
    models = FluxFlowModels.create(TINY, nnx.Rngs(0))
    step = TrainStep(models, VAE_GAN, mesh=data_mesh())
    with pytest.raises(ValueError, match="batch of 6 cannot be split over 8 devices"):
        step(step.init_state(models), {"images": IMAGES[:6]}, jax.random.key(0))


def test_sharded_leaves_split_their_largest_divisible_axis():
    assert sharded_spec((30522, 64), 8) == PartitionSpec(None, "data")
    assert sharded_spec((3, 3, 64, 128), 8) == PartitionSpec(None, None, None, "data")
    assert sharded_spec((64, 64), 8, min_elements=4096) == PartitionSpec("data", None)
    assert sharded_spec((63, 65), 8) == PartitionSpec()  # no axis divides
    assert sharded_spec((4096,), 8, min_elements=8192) == PartitionSpec()  # too small
    assert sharded_spec((), 8) == PartitionSpec()


def test_an_eight_device_run_resumes_on_one_device(tmp_path, monkeypatch):
    """An 8-device run with sharded parameters (its checkpoint after the 2nd batch
    continues on 1 device): the same 4 logged batches and final weights as the
    uninterrupted 8-device run, whose flow steps (text dropout included) the 1-device
    steps thus equal. Its log lines carry the compile time, the speed and (with a known
    device peak) the MFU."""
    # SGD: Adam-like updates would turn the float noise of exactly-zero gradients (a
    # key bias under softmax) into full-size steps of either sign.
    steps = [{"name": "flow", "n_epochs": 1, "max_steps": 4, "train_diff": True,
              "cfg_dropout_prob": 0.5,
              "optimizers": {"flow": SGD, "text_encoder": SGD},
              "schedulers": {"flow": CONSTANT, "text_encoder": CONSTANT}}]
    whole = write_config(tmp_path, steps, name="whole", data={**DATA, "demo_samples": 32},
                         training={"batch_size": 8, "devices": 8, "shard_params": True},
                         output={"checkpoint_save_interval": 2})
    lines: list[str] = []
    monkeypatch.setattr(run_module, "peak_flops", lambda device, precision: 1e12)
    Run(load_config(whole), echo=lines.append).run()

    # The run as it was after batch 2: its later checkpoint gone.
    shutil.copytree(tmp_path / "whole", tmp_path / "stopped")
    shutil.rmtree(tmp_path / "stopped" / "checkpoints" / "4")
    resumed: list[str] = []
    Run(load_config(whole, {"training": {"devices": 1},
                            "output": {"output_path": str(tmp_path / "stopped")}}),
        echo=resumed.append).run()
    assert any(line.startswith("Resuming from checkpoint 2") for line in resumed)

    expected, actual = records(tmp_path / "whole", "flow"), records(tmp_path / "stopped", "flow")
    assert [r["global_step"] for r in actual] == [1, 2, 3, 4]
    for a, b in zip(expected, actual, strict=True):
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name in ("flxflow_step_flow_final", "text_encoder_step_flow"):
        want, got = (tensors(tmp_path / run / f"{name}.safetensors")
                     for run in ("whole", "stopped"))
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)

    compiled = [line for line in lines if line.startswith("Compiled step flow for ")]
    assert len(compiled) == 1 and "images 8x32x32x3" in compiled[0]  # once for the stage
    gflop = float(re.search(r"([0-9.e+]+) GFLOP per call and device", compiled[0])[1])
    for record in expected:
        extras = record["extras"]
        assert extras["images_per_second"] == pytest.approx(8 / extras["batch_time"])
        assert extras["mfu"] == pytest.approx(gflop * 1e9 / extras["batch_time"] / 1e12,
                                              rel=1e-3)
    assert re.search(r"\| [0-9.]+ img/s \| MFU [0-9.]+% \| [0-9.]+s/batch$",
                     [line for line in lines if "Batch 4/" in line][0])
