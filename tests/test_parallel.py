"""Data parallelism: a step on 8 (CPU) devices equals the single-device step."""

import jax
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.parallel import data_mesh
from fluxflow_jax.training import FlowOptions, StageConfig, TrainStep, VAEOptions
from tiny import TINY

SGD = {"type": "SGD", "lr": 0.05}
CONSTANT = {"type": "ConstantLR", "factor": 1.0}
BATCH = 8
RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(-1, 1, (BATCH, 32, 32, 3)).astype(np.float32)
TEXT = {"images": IMAGES, "input_ids": RNG.integers(0, 64, (BATCH, 8)).astype(np.int32),
        "attention_mask": np.ones((BATCH, 8), bool)}
STAGES = {
    # R1 on the second batch, adaptive weights, EMA, GAN routing: everything the step has.
    "vae_gan": (StageConfig(vae=VAEOptions(use_lpips=False, r1_interval=2),
                            optimizers={"vae": SGD, "discriminator": SGD},
                            schedulers={"vae": CONSTANT, "discriminator": CONSTANT},
                            total_steps=2), {"images": IMAGES}),
    "flow": (StageConfig(flow=FlowOptions(cfg_dropout_prob=0.5),
                         optimizers={"flow": SGD, "text_encoder": SGD},
                         schedulers={"flow": CONSTANT, "text_encoder": CONSTANT},
                         total_steps=2), TEXT),
}


def two_steps(stage, batch, mesh):
    models = FluxFlowModels.create(TINY, nnx.Rngs(0))
    step = TrainStep(models, stage, mesh=mesh)
    state = step.init_state(models)
    metrics = []
    for k in range(2):
        state, m = step(state, batch, jax.random.key(k))
        metrics.append({name: float(v) for name, v in m.items()})
    return state, metrics


@pytest.mark.parametrize("name", list(STAGES))
def test_eight_devices_equal_one(name):
    assert len(jax.devices()) == 8
    stage, batch = STAGES[name]
    single_state, single = two_steps(stage, batch, None)
    mesh = data_mesh()
    multi_state, multi = two_steps(stage, batch, mesh)
    for a, b in zip(single, multi, strict=True):
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
    leaf = jax.tree.leaves(multi_state.params)[0]
    assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x),
                                                         rtol=1e-5, atol=1e-6),
                 single_state.params, multi_state.params)


def test_a_batch_that_does_not_split_is_named():
    stage, _ = STAGES["vae_gan"]
    models = FluxFlowModels.create(TINY, nnx.Rngs(0))
    step = TrainStep(models, stage, mesh=data_mesh())
    with pytest.raises(ValueError, match="batch of 6 cannot be split over 8 devices"):
        step(step.init_state(models), {"images": IMAGES[:6]}, jax.random.key(0))
