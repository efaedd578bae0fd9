"""training.compressor_start: pass_through makes a fresh compressor's latent grid the
average-pooled image, touches only the compressor, and leaves a loaded one alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.data.demo import DemoSource
from fluxflow_jax.interop import save_fluxflow
from fluxflow_jax.models import FluxFlowConfig
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.models.compressor import FluxCompressor
from fluxflow_jax.models.compressor_start import start_as_pass_through
from fluxflow_jax.pipeline.config import ConfigError, load_config
from fluxflow_jax.pipeline.setup import initial_models
from pipeline_helpers import TINY_MODEL, VAE_THEN_FLOW, write_config

CONFIG = FluxFlowConfig(vae_dim=16, downscales=3, upscales=3, vae_attn_layers=1)


def demo_images(count: int = 32) -> jnp.ndarray:
    source = DemoSource(length=count, image_size=32, seed=42)
    return jnp.asarray(np.stack([source[i].image for i in range(count)]), jnp.float32) / 127.5 - 1


def pooled_correlations(compressor: FluxCompressor, images: jnp.ndarray) -> np.ndarray:
    """Per colour channel: the correlation between latent channel c and the image's channel
    c averaged over each latent cell (8x8 pixels at three downscales)."""
    latent = np.asarray(compressor.posterior(images).latent)
    b, h, w, _ = latent.shape
    pooled = np.asarray(images).reshape(b, h, 8, w, 8, 3).mean(axis=(2, 4))
    return np.array([np.corrcoef(latent[..., c].ravel(), pooled[..., c].ravel())[0, 1]
                     for c in range(3)])


def test_the_latent_grid_starts_as_the_pooled_image():
    images = demo_images()
    compressor = FluxCompressor(CONFIG, rngs=nnx.Rngs(0))
    assert np.abs(pooled_correlations(compressor, images)).max() < 0.3  # PyTorch's init
    start_as_pass_through(compressor)
    assert pooled_correlations(compressor, images).min() > 0.8


def test_only_the_control_point_weights_change():
    reference = FluxCompressor(CONFIG, rngs=nnx.Rngs(0))
    started = FluxCompressor(CONFIG, rngs=nnx.Rngs(0))
    start_as_pass_through(started)
    before, after = (jax.tree_util.tree_leaves_with_path(nnx.state(module, nnx.Param))
                     for module in (reference, started))
    changed = {path[0].key for (path, old), (_, new) in zip(before, after)
               if not np.array_equal(old, new)}
    assert changed == {"encoder_first_step", "encoder_z", "latent_proj", "mu_proj"}
    kernel = np.asarray(started.encoder_z[0].kernel[...])  # [8, 8, in, 5 * out]
    np.testing.assert_array_equal(kernel[..., 0::5],  # t keeps PyTorch's draw
                                  np.asarray(reference.encoder_z[0].kernel[...])[..., 0::5])
    for role in (2, 3, 4):  # the control points share p0's weights
        np.testing.assert_array_equal(kernel[..., role::5], kernel[..., 1::5])


def test_the_run_starts_a_fresh_compressor_and_keeps_a_loaded_one(tmp_path):
    fresh = load_config(write_config(tmp_path, VAE_THEN_FLOW, name="fresh",
                                     training={"compressor_start": "pass_through"}))
    reference = load_config(write_config(tmp_path, VAE_THEN_FLOW, name="plain"))
    started, plain = initial_models(fresh), initial_models(reference)
    kernel = lambda models: np.asarray(models.compressor.latent_proj[1].kernel[...])
    assert not np.array_equal(kernel(started), kernel(plain))
    np.testing.assert_array_equal(np.asarray(started.expander.rgb_activation.p0[...]),
                                  np.asarray(plain.expander.rgb_activation.p0[...]))

    save_fluxflow(tmp_path / "checkpoint", plain)
    loaded = load_config(write_config(tmp_path, VAE_THEN_FLOW, name="loaded",
                                      training={"compressor_start": "pass_through"},
                                      model_checkpoint=str(tmp_path / "checkpoint")))
    np.testing.assert_array_equal(kernel(initial_models(loaded)), kernel(plain))


def test_an_unknown_start_is_reported(tmp_path):
    path = write_config(tmp_path, VAE_THEN_FLOW, training={"compressor_start": "pooling"})
    with pytest.raises(ConfigError, match="compressor_start' must be one of "
                                          r"\['reference', 'pass_through'\]"):
        load_config(path)
