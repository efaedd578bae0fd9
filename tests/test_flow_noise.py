"""The flow's noise (``model.flow_noise``): Gaussian tokens as before, or the compressor's
tokens of a noise image, which carry the latent grid's positions; what generation starts
from, what checkpoints record, and what a run may set on a checkpoint's models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.evaluation.evaluate import available_parts
from fluxflow_jax.interop import FluxFlowModels, load_fluxflow, save_fluxflow
from fluxflow_jax.models import flow_noise
from fluxflow_jax.models import FluxFlowConfig
from fluxflow_jax.pipeline.config import ConfigError, load_config
from fluxflow_jax.pipeline.setup import initial_models
from fluxflow_jax.sampling import generate, starting_noise
from pipeline_helpers import TINY_MODEL, write_config
from tiny import TINY

ENCODED = dataclasses.replace(TINY, flow_noise="encoded_noise_image")
GRID = (8, 8)  # 32 px at two downscales
IDS = jnp.ones((2, 6), jnp.int32)
MASK = jnp.ones((2, 6), bool)
pytestmark = pytest.mark.filterwarnings("ignore:.*PyTorch fluxflow cannot rebuild")


def _position_share(tokens: np.ndarray) -> float:
    """The share of the tokens' variance that their place on the grid explains."""
    per_place = tokens.mean(axis=0)
    return float(per_place.var() / tokens.var())


def test_gaussian_noise_is_standard_normal_tokens_as_before():
    models = FluxFlowModels.create(TINY, nnx.Rngs(0))
    key = jax.random.key(3)
    draws = flow_noise.draw(TINY, key, 2, GRID)
    np.testing.assert_array_equal(
        starting_noise(models, draws),
        jax.random.normal(key, (2, 64, TINY.latent_width), jnp.float32))
    from_key = generate(models, IDS, MASK, height=32, width=32, key=key, num_steps=2)
    from_noise = generate(models, IDS, MASK, height=32, width=32, num_steps=2,
                          noise=jax.random.normal(key, (2, 64, TINY.latent_width)))
    np.testing.assert_array_equal(from_key, from_noise)


def test_encoded_noise_is_the_compressors_tokens_of_a_noise_image():
    models = FluxFlowModels.create(ENCODED, nnx.Rngs(0)).eval()
    draws = flow_noise.draw(ENCODED, jax.random.key(1), 256, GRID)
    image = np.asarray(draws["noise_image"])
    assert image.shape == (256, 32, 32, 3)
    # FluxFlowPipeline's random image: standard normal pixels times 2, minus 1.
    assert image.mean() == pytest.approx(-1, abs=0.01)
    assert image.std() == pytest.approx(2, rel=0.01)
    tokens = np.asarray(starting_noise(models, draws))
    with jax.enable_x64():  # LayerNorm of the untrained tokens magnifies float32 rounding
        wide = {name: np.asarray(value, np.float64) for name, value in draws.items()}
        expected = models.compressor.encode(wide["noise_image"],
                                            noise=wide["noise_latent"]).packed[:, :-1]
        np.testing.assert_allclose(starting_noise(models, wide), expected, rtol=1e-9,
                                   atol=1e-9)
    # They tell the flow where each token lies; Gaussian tokens do not: of 256 draws, the
    # per-place means of noise without positions hold about 1/256 of its variance.
    assert _position_share(tokens) > 5 / 256
    gaussian = np.asarray(flow_noise.draw(TINY, jax.random.key(1), 256, GRID)["noise"])
    assert _position_share(gaussian) < 2 / 256


def test_generation_starts_from_the_noise_the_flow_trained_against():
    models = FluxFlowModels.create(ENCODED, nnx.Rngs(0)).eval()
    key = jax.random.key(5)
    start = starting_noise(models, flow_noise.draw(ENCODED, key, 2, GRID))
    np.testing.assert_array_equal(
        generate(models, IDS, MASK, height=32, width=32, key=key, num_steps=2),
        generate(models, IDS, MASK, height=32, width=32, noise=start, num_steps=2))
    models.compressor = None
    with pytest.raises(ValueError, match="generation needs the compressor"):
        generate(models, IDS, MASK, height=32, width=32, key=key, num_steps=2)


def test_evaluation_generates_only_with_the_networks_the_start_needs():
    parts = ("text_encoder", "flow_processor", "expander")
    assert "text_to_image" in available_parts(FluxFlowModels.create(TINY, nnx.Rngs(0), parts))
    assert "text_to_image" not in available_parts(
        FluxFlowModels.create(ENCODED, nnx.Rngs(0), parts))


def test_checkpoints_record_it_and_older_ones_read_as_gaussian(tmp_path):
    models = FluxFlowModels.create(ENCODED, nnx.Rngs(0),
                                   ("compressor", "flow_processor", "expander"))
    save_fluxflow(tmp_path / "encoded", models)
    assert load_fluxflow(tmp_path / "encoded").config.flow_noise == "encoded_noise_image"
    metadata = tmp_path / "encoded" / "model_metadata.json"
    metadata.write_text(metadata.read_text().replace('"flow_noise": "encoded_noise_image",',
                                                     ""))
    assert "flow_noise" not in metadata.read_text()
    assert load_fluxflow(tmp_path / "encoded").config.flow_noise == "gaussian"


def test_a_run_may_set_it_on_a_checkpoints_models_but_not_a_width(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    save_fluxflow(checkpoint, FluxFlowModels.create(
        FluxFlowConfig(**TINY_MODEL), nnx.Rngs(0), ("compressor", "flow_processor",
                                                    "expander")))
    run = write_config(tmp_path, [{"name": "flow", "n_epochs": 1, "train_diff": True}],
                       model={"flow_noise": "encoded_noise_image"},
                       model_checkpoint=str(checkpoint))
    models = initial_models(load_config(run))
    assert models.config.flow_noise == "encoded_noise_image"
    assert {m.config.flow_noise for m in models.present().values()
            if hasattr(m, "config")} == {"encoded_noise_image"}
    wider = write_config(tmp_path, [{"name": "flow", "n_epochs": 1, "train_diff": True}],
                         model={"flow_dim": 2 * TINY_MODEL["flow_dim"]},
                         model_checkpoint=str(checkpoint))
    with pytest.raises(ConfigError, match="model.flow_dim is"):
        initial_models(load_config(wider))


def test_an_unknown_noise_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"flow_noise must be one of \['gaussian', "
                                         r"'encoded_noise_image'\], got 'uniform'"):
        dataclasses.replace(TINY, flow_noise="uniform")
