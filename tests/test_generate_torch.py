"""End to end across frameworks: train briefly in JAX, export, load the files in PyTorch
``fluxflow``, sample with the same starting noise in both (diffusers' DPM-Solver++ on the
PyTorch side), decode, and compare the images; in float64 and in float32. And the other
way: a checkpoint PyTorch ``fluxflow`` saved, brought in with ``fluxflow-jax import``.
And where generation starts: encoded noise images are the tokens PyTorch's
``FluxFlowPipeline`` starts from. Architecture v060, the default of both."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx
from fluxflow.models.versioning import save_versioned_checkpoint

import torch_reference as ref
from fluxflow_jax import cli
from fluxflow_jax.interop import FluxFlowModels, load_fluxflow, save_fluxflow
from fluxflow_jax.models import flow_noise
from fluxflow_jax.sampling import generate, latent_grid, starting_noise
from fluxflow_jax.training import FlowOptions, StageConfig, TrainStep
from fluxflow_jax.training.state import write_to_models

CFG = ref.CONFIGS["a"][0].replace(text_vocab_size=64, text_layers=1, text_hidden_dim=64,
                                  text_max_positions=32)
pytestmark = pytest.mark.filterwarnings("ignore:.*PyTorch fluxflow cannot rebuild",
                                        "ignore::DeprecationWarning")
HEIGHT, WIDTH, STEPS, BATCH = 32, 48, 8, 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model after two flow training steps, saved in the PyTorch layout."""
    models = FluxFlowModels.create(CFG, nnx.Rngs(5),
                                   components=("compressor", "flow_processor", "expander",
                                               "text_encoder"))
    sgd = {"type": "SGD", "lr": 0.05}
    stage = StageConfig(flow=FlowOptions(), optimizers={"flow": sgd, "text_encoder": sgd},
                        total_steps=2)
    step = TrainStep(models, stage)
    state = step.init_state(models)
    rng = np.random.default_rng(0)
    batch = {"images": rng.uniform(-1, 1, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32),
             "input_ids": rng.integers(1, 64, (BATCH, 10)).astype(np.int32),
             "attention_mask": np.ones((BATCH, 10), bool)}
    for k in range(2):
        state, _ = step(state, batch, jax.random.key(k))
    trained = write_to_models(state, models)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(trained.flow_processor, nnx.Param),
                 state.params["flow_processor"])
    path = tmp_path_factory.mktemp("export")
    save_fluxflow(path, trained)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A model created and saved by PyTorch fluxflow, then ``fluxflow-jax import``ed.
    PyTorch's saver labels the v060 pipeline "0.3.0"; the keys say v060."""
    source, out = tmp_path_factory.mktemp("torch"), tmp_path_factory.mktemp("imported")
    save_versioned_checkpoint(ref.pipeline(CFG, seed=3), source)
    encoder = ref.text_encoder(CFG, seed=4)
    safetensors.torch.save_file({f"text_encoder.{k}": v.contiguous() for k, v in
                                 encoder.state_dict().items()},
                                source / "text_encoder.safetensors")
    assert cli.main(["import", str(source), str(out)]) == 0
    assert load_fluxflow(out).config.model_version == "0.6.0"
    return out


def torch_sample(path, ids, mask, noise, guidance, dtype):
    """The PyTorch side: fluxflow's loader, its text encoder file, diffusers' scheduler."""
    pipe = ref.load_export(path, CFG.model_version).to(dtype).eval()
    encoder = ref.text_encoder(CFG, seed=0)
    encoder.load_state_dict({k.removeprefix("text_encoder."): v for k, v in
                             safetensors.torch.load_file(path / "text_encoder.safetensors")
                             .items()}, strict=True)
    return ref.sample(pipe, encoder.to(dtype).eval(), ids, mask, noise, guidance, STEPS,
                      (HEIGHT, WIDTH), CFG)


@pytest.mark.parametrize("origin", ["exported", "imported"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_same_images_in_both_frameworks(origin, guidance, precision, request):
    exported = request.getfixturevalue(origin)
    torch_dtype, jax_dtype, _ = ref.PRECISIONS[precision]
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 64, (BATCH, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    noise = rng.normal(size=(BATCH, (HEIGHT // 4) * (WIDTH // 4), CFG.vae_dim))
    expected = torch_sample(exported, torch.from_numpy(ids * mask), torch.from_numpy(mask),
                            torch.from_numpy(noise).to(torch_dtype), guidance, torch_dtype)
    with jax.enable_x64(precision == "float64"):
        models = load_fluxflow(exported, dtype=jax_dtype)
        actual = np.asarray(generate(models, jnp.asarray(ids * mask), jnp.asarray(mask),
                                     height=HEIGHT, width=WIDTH,
                                     noise=jnp.asarray(noise, jax_dtype), num_steps=STEPS,
                                     guidance=guidance))
    # diffusers rounds its solver state to float32 in every step, whatever the dtype.
    tolerance = 1e-5 if precision == "float64" else ref.FLOAT32_CHAIN_TOL
    assert ref.relative_error(actual, expected) <= tolerance
    assert np.std(actual) > 0.01  # an image, not a constant


def test_encoded_noise_starts_where_pytorchs_pipeline_starts(exported):
    """``FluxFlowPipeline`` starts from its compressor's tokens of randn(B, 3, H, W) * 2 - 1;
    a model trained against ``encoded_noise_image`` starts from the same tokens here."""
    with jax.enable_x64():
        models = load_fluxflow(exported, dtype=jnp.float64).with_settings(
            flow_noise="encoded_noise_image")
        draws = flow_noise.draw(models.config, jax.random.key(2), BATCH,
                                latent_grid(models.config, HEIGHT, WIDTH), jnp.float64)
        ours = np.asarray(starting_noise(models, draws))
    pipe = ref.load_export(exported, CFG.model_version).to(torch.float64).eval()
    ref.inject_noise(pipe.compressor, torch.from_numpy(
        np.array(draws["noise_latent"]).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        theirs = pipe.compressor(torch.from_numpy(
            np.array(draws["noise_image"]).transpose(0, 3, 1, 2)))[:, :-1]
    assert ref.relative_error(ours, theirs.numpy()) <= 1e-9
    assert np.std(ours) > 0.1
