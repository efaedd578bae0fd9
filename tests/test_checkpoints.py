"""Run checkpoints: bitwise round trip, donation-safe async saves, keep_last, resharding."""

import jax
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.parallel import data_mesh, replicated
from fluxflow_jax.pipeline.checkpoints import RunCheckpointError, RunCheckpoints
from fluxflow_jax.training import StageConfig, TrainStep, VAEOptions
from fluxflow_jax.training.flow_step import FlowOptions
from tiny import TINY

IMAGES = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
STAGE = StageConfig(vae=VAEOptions(use_gan=False, use_lpips=False),
                    optimizers={"vae": {"type": "AdamW", "lr": 1e-3}}, total_steps=10)


@pytest.fixture(scope="module")
def setup():
    models = FluxFlowModels.create(TINY, nnx.Rngs(0), components=("compressor", "expander"))
    return models, TrainStep(models, STAGE)


def host(tree):
    return jax.tree.map(np.array, tree)


def test_round_trip_is_bitwise_and_survives_donation(setup, tmp_path):
    models, step = setup
    state = step.init_state(models)
    state, _ = step(state, {"images": IMAGES}, jax.random.key(0))
    saved = host(state)
    checkpoints = RunCheckpoints(tmp_path / "ckpt")
    checkpoints.save(1, state, {"stage": "warmup", "loader": {"epoch": 0, "position": 1}})
    state, _ = step(state, {"images": IMAGES}, jax.random.key(1))  # donates the saved arrays
    restored, record = checkpoints.restore(step.init_state(models))
    jax.tree.map(np.testing.assert_array_equal, host(restored), saved)
    assert record == {"stage": "warmup", "loader": {"epoch": 0, "position": 1}}
    # The resumed state continues exactly like the original.
    a, metrics_a = step(restored, {"images": IMAGES}, jax.random.key(1))
    b, metrics_b = step(jax.device_put(saved, jax.devices()[0]), {"images": IMAGES},
                        jax.random.key(1))
    assert host(metrics_a) == host(metrics_b)
    assert len(step.compilations) == 1  # a restored state reuses the compiled step
    checkpoints.close()


def test_keeps_the_last_ones_and_restores_any_kept(setup, tmp_path):
    models, step = setup
    state = step.init_state(models)
    with RunCheckpoints(tmp_path, keep_last=2) as checkpoints:
        for number in (1, 2, 3):
            checkpoints.save(number, state, {"number": number})
    with RunCheckpoints(tmp_path, keep_last=2) as reopened:
        assert reopened.latest() == 3
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
        assert reopened.restore(state, step=2)[1] == {"number": 2}


def test_a_checkpoint_restores_onto_another_device_count(setup, tmp_path):
    models, _ = setup
    state = TrainStep(models, STAGE, mesh=data_mesh()).init_state(models)  # on 8 devices
    assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == 8
    one = TrainStep(models, STAGE, mesh=data_mesh(jax.devices()[:1]))
    with RunCheckpoints(tmp_path) as checkpoints:
        checkpoints.save(1, state, {})
        restored, _ = checkpoints.restore(one.init_state(models))
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding == replicated(data_mesh(jax.devices()[:1]))
    jax.tree.map(np.testing.assert_array_equal, host(restored), host(state))


def test_a_sharded_state_restores_whole_and_back(setup, tmp_path):
    """Parameters split over 8 devices (shard_params) restore onto 1 device, and a
    single-device checkpoint restores into the split layout."""
    models, _ = setup
    sharded = TrainStep(models, STAGE, mesh=data_mesh(), shard_params=True)
    fresh = sharded.init_state(models)
    state = fresh.replace(params=jax.tree.map(lambda x: x * 2 + 1, fresh.params))
    split = [leaf for leaf in jax.tree.leaves(state) if not leaf.sharding.is_fully_replicated]
    assert split and all(leaf.addressable_shards[0].data.size * 8 == leaf.size
                         for leaf in split)
    one = TrainStep(models, STAGE)
    with RunCheckpoints(tmp_path / "sharded") as checkpoints:
        checkpoints.save(1, state, {})
        restored, _ = checkpoints.restore(one.init_state(models))
    assert all(len(leaf.devices()) == 1 for leaf in jax.tree.leaves(restored))
    jax.tree.map(np.testing.assert_array_equal, host(restored), host(state))
    with RunCheckpoints(tmp_path / "whole") as checkpoints:
        checkpoints.save(1, restored, {})
        back, _ = checkpoints.restore(sharded.init_state(models))
    assert [leaf.sharding for leaf in jax.tree.leaves(back)] == \
        [leaf.sharding for leaf in jax.tree.leaves(state)]
    jax.tree.map(np.testing.assert_array_equal, host(back), host(state))


def test_unfit_or_missing_checkpoints_are_named(setup, tmp_path):
    models, step = setup
    with RunCheckpoints(tmp_path / "empty") as empty, \
            pytest.raises(RunCheckpointError, match="no checkpoint in"):
        empty.restore(step.init_state(models))
    wider = FluxFlowModels.create(TINY.replace(vae_dim=32, vae_attn_heads=4), nnx.Rngs(0),
                                  components=("compressor", "expander"))
    with RunCheckpoints(tmp_path / "other") as checkpoints:
        checkpoints.save(1, step.init_state(models), {})
        with pytest.raises(RunCheckpointError,
                           match=r"does not fit this run .*bias.value is \[50\], expected \[90\]"):
            checkpoints.restore(TrainStep(wider, STAGE).init_state(wider))


def test_an_average_of_frozen_leaves_from_an_older_checkpoint_is_dropped(tmp_path):
    """Checkpoints written before averages left out the leaves their stage does not train
    (here the frozen DistilBERT beside the trained head) still resume, to the same state."""
    adam = {"type": "AdamW", "lr": 1e-3}
    stage = StageConfig(flow=FlowOptions(), frozen=frozenset({"language_model"}),
                        optimizers={"flow": adam, "text_encoder": adam}, total_steps=10)
    models = FluxFlowModels.create(TINY, nnx.Rngs(0))
    step = TrainStep(models, stage)
    state = step.init_state(models)
    expected = host(state)
    older = state.replace(ema={**state.ema, "text_encoder": state.params["text_encoder"]})
    with RunCheckpoints(tmp_path) as checkpoints:
        checkpoints.save(1, older, {"number": 1})
    with RunCheckpoints(tmp_path) as reopened:
        restored, record = reopened.restore(step.init_state(models))
    assert record == {"number": 1}
    jax.tree.map(np.testing.assert_array_equal, host(restored), expected)
