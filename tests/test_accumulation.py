"""Gradient accumulation: N micro-batches of B make the update one batch of N*B makes (both
updates, one device and eight; the flow update with remat too), runs with it log what bigger batches log and resume exactly,
and its settings are checked and read from YAML and flags."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.cli import build_parser
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.parallel import data_mesh
from fluxflow_jax.pipeline.config import ConfigError, load_config
from fluxflow_jax.pipeline.flags import overrides
from fluxflow_jax.pipeline.run import Run
from fluxflow_jax.pipeline.stages import build_stages
from fluxflow_jax.training import StageConfig, TrainStep, VAEOptions
from fluxflow_jax.training.accumulation import MicroBatches, pooled_std
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.train_step import StageConfigError
from pipeline_helpers import TINY_MODEL, records, tensors, write_config
from tiny import TINY
from tiny_steps import CONSTANT

SGD = {"type": "SGD", "lr": 0.05}
# Text dropout off: its masks are drawn per micro-batch (docs/pipeline.md), so with it on
# the flow updates would differ by more than float rounding.
NO_DROPOUT = {"text_dropout": 0.0, "text_attention_dropout": 0.0}
RNG = np.random.default_rng(0)
BATCH = {"images": RNG.uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32),
         "input_ids": RNG.integers(0, TINY.text_vocab_size, (16, 8)).astype(np.int32),
         "attention_mask": np.arange(8)[None] < RNG.integers(1, 9, (16, 1))}
# Both updates on one batch: GAN with R1 on the second update, adaptive weights, KL
# warm-up, EMA, and the flow with the text encoder.
BOTH = StageConfig(vae=VAEOptions(use_lpips=False, r1_interval=2, kl_warmup_steps=10),
                   flow=FlowOptions(cfg_dropout_prob=0.5),
                   optimizers={g: SGD for g in ("vae", "discriminator", "flow",
                                                "text_encoder")},
                   schedulers={g: CONSTANT for g in ("vae", "discriminator", "flow",
                                                     "text_encoder")},
                   total_steps=2)


def test_micro_batches_take_each_devices_rows_in_turn():
    rows = np.arange(16)
    np.testing.assert_array_equal(MicroBatches(2).split(rows), [rows[:8], rows[8:]])
    # Over 4 devices (4 rows each), micro-batch i is every device's i-th 2 rows.
    split = MicroBatches(2, data_mesh(jax.devices()[:4])).split(rows)
    np.testing.assert_array_equal(split, [[0, 1, 4, 5, 8, 9, 12, 13],
                                          [2, 3, 6, 7, 10, 11, 14, 15]])


def test_pooled_std_is_the_std_of_the_union():
    groups = RNG.normal(3.0, 2.0, (4, 50))
    deviations = ((groups - groups.mean(1, keepdims=True)) ** 2).sum(1)
    assert float(pooled_std(groups.mean(1), deviations, 50)) == pytest.approx(
        np.std(groups, ddof=1), rel=1e-6)


def _two_updates(stage: StageConfig, mesh=None, remat: bool = False,
                 flow_noise: str = "gaussian"):
    config = dataclasses.replace(TINY, **NO_DROPOUT, flow_noise=flow_noise)
    models = FluxFlowModels.create(config, nnx.Rngs(0))
    step = TrainStep(models, stage, mesh=mesh, remat=remat)
    state, metrics = step.init_state(models), []
    for k in range(2):
        state, m = step(state, BATCH, jax.random.key(k))
        metrics.append({name: float(v) for name, v in m.items()})
    return jax.device_get(state), metrics


def test_micro_batches_on_eight_devices_give_one_devices_big_batch_updates():
    """One batch of 16 on one device against 2 micro-batches of 8 on eight devices (one row
    of each micro-batch per device): the same losses, weights and averages. (One device
    with micro-batches: the run test below.)"""
    whole_state, whole = _two_updates(BOTH)
    state, metrics = _two_updates(dataclasses.replace(BOTH, gradient_accumulation_steps=2),
                                  data_mesh())
    for a, b in zip(whole, metrics, strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-7), key
    for tree in ("params", "ema", "buffers"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=2e-5, atol=1e-6),
                     getattr(whole_state, tree), getattr(state, tree))
    assert whole[1]["r1_penalty"] > 0


@pytest.mark.parametrize("flow_noise", ["gaussian", "encoded_noise_image"])
def test_the_flow_update_accumulates_with_remat(flow_noise):
    """Two micro-batches of 8 with remat against one batch of 16 without (a regression:
    the compressor bound outside the micro-batch scan made remat raise a trace error),
    with either noise (encoded noise images pass the compressor per micro-batch)."""
    flow = StageConfig(flow=FlowOptions(cfg_dropout_prob=0.5),
                       optimizers={g: SGD for g in ("flow", "text_encoder")},
                       schedulers={g: CONSTANT for g in ("flow", "text_encoder")},
                       total_steps=2)
    whole_state, whole = _two_updates(flow, flow_noise=flow_noise)
    state, metrics = _two_updates(dataclasses.replace(flow, gradient_accumulation_steps=2),
                                  remat=True, flow_noise=flow_noise)
    for a, b in zip(whole, metrics, strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-7), key
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=2e-5, atol=1e-6),
                 whole_state.params, state.params)
    assert whole[1]["flow_loss"] > 0


def test_a_batch_that_is_not_whole_micro_batches_is_named():
    models = FluxFlowModels.create(TINY, nnx.Rngs(0))
    stage = StageConfig(vae=VAEOptions(use_lpips=False, use_gan=False),
                        gradient_accumulation_steps=3)
    step = TrainStep(models, stage)
    with pytest.raises(ValueError, match="batch of 16 is not 3 equal micro-batches"):
        step.compile(step.init_state(models), {"images": BATCH["images"]}, jax.random.key(0))
    with pytest.raises(StageConfigError, match="'gradient_accumulation_steps' must be an "
                                               "integer >= 1, got 0"):
        TrainStep(models, dataclasses.replace(stage, gradient_accumulation_steps=0))


def test_accumulation_is_set_for_the_run_or_per_step(tmp_path):
    args = build_parser().parse_args(["train", "--gradient_accumulation_steps", "4"])
    assert overrides(args) == {"training": {"gradient_accumulation_steps": 4}}
    steps = [{"name": "a", "n_epochs": 1, "train_vae": True},
             {"name": "b", "n_epochs": 1, "train_vae": True, "gradient_accumulation_steps": 2}]
    path = write_config(tmp_path, steps)
    config = load_config(path, overrides(args))
    assert [s.config.gradient_accumulation_steps for s in build_stages(config, 4)] == [4, 2]
    bad = write_config(tmp_path, [{**steps[1], "gradient_accumulation_steps": 0}], name="bad")
    with pytest.raises(ConfigError, match=r"'training.pipeline.steps\[0\]."
                                          r"gradient_accumulation_steps' must be an integer"):
        load_config(bad)


def _steps(accumulation: int | None) -> list[dict]:
    """A VAE-GAN step, then a flow step, 2 updates each."""
    keys = {} if accumulation is None else {"gradient_accumulation_steps": accumulation}
    groups = ("vae", "discriminator", "flow", "text_encoder")
    optimization = {"optimizers": {g: SGD for g in groups},
                    "schedulers": {g: CONSTANT for g in groups}}
    return [{"name": "vae", "n_epochs": 1, "max_steps": 2, "train_vae": True,
             "gan_training": True, "r1_interval": 2, **optimization, **keys},
            {"name": "flow", "n_epochs": 1, "max_steps": 2, "train_diff": True,
             "freeze_vae": True, "cfg_dropout_prob": 0.5, **optimization}]


def test_runs_that_accumulate_log_what_bigger_batches_log_and_resume_exactly(tmp_path):
    """Batches of 4 against 2 micro-batches of 2 (the VAE step's own setting, the flow
    step's from the run): the same samples in the same order, so the same logged losses and
    weights. The accumulating run, stopped at its first checkpoint and resumed, logs and
    writes the same as uninterrupted."""
    model = {**TINY_MODEL, **NO_DROPOUT}
    big = write_config(tmp_path, _steps(None), name="big", model=model,
                       training={"batch_size": 4})
    Run(load_config(big), echo=lambda line: None).run()
    small = write_config(tmp_path, _steps(2), name="small", model=model,
                         training={"batch_size": 2, "gradient_accumulation_steps": 2},
                         output={"checkpoint_save_interval": 1, "keep_last": 8})
    Run(load_config(small), echo=lambda line: None).run()
    for step in ("vae", "flow"):
        expected, actual = records(tmp_path / "big", step), records(tmp_path / "small", step)
        assert [r["global_step"] for r in actual] == [r["global_step"] for r in expected]
        for a, b in zip(expected, actual, strict=True):
            for key, value in a["metrics"].items():
                assert b["metrics"][key] == pytest.approx(value, rel=2e-5, abs=1e-7), key
            assert b["extras"]["images_per_second"] == pytest.approx(
                4 / b["extras"]["batch_time"])

    shutil.copytree(tmp_path / "small", tmp_path / "stopped")
    for later in (tmp_path / "stopped" / "checkpoints").iterdir():
        if later.name.isdigit() and int(later.name) > 1:
            shutil.rmtree(later)
    resumed: list[str] = []
    Run(load_config(small, {"output": {"output_path": str(tmp_path / "stopped")}}),
        echo=resumed.append).run()
    assert any(line.startswith("Resuming from checkpoint 1") for line in resumed)
    for step in ("vae", "flow"):
        expected = [(r["global_step"], r["metrics"]) for r in records(tmp_path / "small", step)]
        actual = [(r["global_step"], r["metrics"]) for r in records(tmp_path / "stopped",
                                                                   step)]
        assert actual == expected, step
    for name in ("flxflow_step_flow_final", "flxflow_step_vae_final"):
        want, got = (tensors(tmp_path / run / f"{name}.safetensors")
                     for run in ("small", "stopped"))
        assert all(np.array_equal(want[k], got[k]) for k in want)
