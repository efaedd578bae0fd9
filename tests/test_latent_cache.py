"""Cached latents: tokens sampled from a stored posterior are the images' tokens, a flow step
on the cache equals one on the images, the cache follows the compressor and the data, and
a run with it (and gradient accumulation) resumes exactly."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import ConfigError, load_config
from fluxflow_jax.pipeline.latent_cache import LatentCache
from fluxflow_jax.pipeline.run import Run
from fluxflow_jax.pipeline.stages import build_stages
from fluxflow_jax.training import StageConfig, TrainStep
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.state import Networks, split_models
from pipeline_helpers import TINY_MODEL, records, write_config
from tiny import TINY
from tiny_steps import CONSTANT

SGD = {"type": "SGD", "lr": 0.05}
RNG = np.random.default_rng(1)
BATCH = {"images": RNG.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
         "input_ids": RNG.integers(0, TINY.text_vocab_size, (4, 8)).astype(np.int32),
         "attention_mask": np.ones((4, 8), bool)}
FLOW = StageConfig(flow=FlowOptions(), frozen=frozenset({"compressor", "expander"}),
                   optimizers={"flow": SGD, "text_encoder": SGD},
                   schedulers={"flow": CONSTANT, "text_encoder": CONSTANT})


@pytest.fixture(scope="module")
def models():
    return FluxFlowModels.create(TINY, nnx.Rngs(0))


def _cache(models, root):
    nets = Networks.from_models(models)
    params, buffers = split_models(models)
    return LatentCache(root, nets, params["compressor"], buffers["compressor"],
                       models.config.model_version)


def test_tokens_sampled_from_the_posterior_are_the_encoders(models):
    assert TINY.architecture.bounded_tokens  # v060: LayerNorm + tanh after sampling
    compressor, images = models.compressor, BATCH["images"]
    posterior = compressor.posterior(images)
    noise = jax.random.normal(jax.random.key(3), posterior.mu.shape)
    np.testing.assert_array_equal(compressor.sample(posterior, noise=noise).packed,
                                  compressor.encode(images, noise=noise).packed)


def test_a_flow_step_on_cached_posteriors_equals_one_on_the_images(models, tmp_path):
    """Same keys, so the same noise: the same losses and updates from the cache."""
    cached = _cache(models, tmp_path).inputs(BATCH)
    assert "images" not in cached and cached["latent_mu"].shape[0] == 4
    runs = []
    for batch in (BATCH, cached):
        step = TrainStep(models, FLOW)
        state, metrics = step.init_state(models), []
        for k in range(2):
            state, m = step(state, batch, jax.random.key(k))
            metrics.append({name: float(v) for name, v in m.items()})
        runs.append((jax.device_get(state.params), metrics))
    (want_params, want), (got_params, got) = runs
    for a, b in zip(want, got, strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6),
                 want_params, got_params)


def test_the_cache_follows_the_compressor_and_the_images(models, tmp_path):
    cache = _cache(models, tmp_path)
    first = cache.inputs(BATCH)
    assert cache.encoded == 4 and len(list(cache.folder.iterdir())) == 4
    again = _cache(models, tmp_path)  # a resumed run: everything found
    second = again.inputs(BATCH)
    assert again.encoded == 0 and again.folder == cache.folder
    jax.tree.map(np.testing.assert_array_equal, first, second)
    changed = {**BATCH, "images": BATCH["images"].copy()}
    changed["images"][1] *= 0.5  # another image: encoded anew
    again.inputs(changed)
    assert again.encoded == 1 and len(list(cache.folder.iterdir())) == 5
    other = FluxFlowModels.create(TINY, nnx.Rngs(1))  # other weights: another cache
    assert _cache(other, tmp_path).folder != cache.folder


def test_cache_latents_needs_a_frozen_compressor(tmp_path):
    steps = [{"name": "both", "n_epochs": 1, "train_vae": True, "train_diff": True,
              "cache_latents": True}]
    with pytest.raises(ConfigError, match="cache_latents needs a flow step whose compressor "
                                          "is frozen.*add freeze_vae: true"):
        build_stages(load_config(write_config(tmp_path, steps)), 4)


def test_a_run_with_cached_latents_and_accumulation_resumes_exactly(tmp_path):
    """A VAE step, then a flow step on cached latents with 2 micro-batches per update:
    stopped at the flow step's start or after its first update and resumed, it logs what
    the uninterrupted run does, from the cache the first run filled."""
    steps = [{"name": "vae", "n_epochs": 1, "max_steps": 1, "train_vae": True},
             {"name": "flow", "n_epochs": 2, "max_steps": 3, "train_diff": True,
              "freeze_vae": True, "cache_latents": True, "gradient_accumulation_steps": 2,
              "optimizers": {"flow": SGD, "text_encoder": SGD},
              "schedulers": {"flow": CONSTANT, "text_encoder": CONSTANT}}]
    config = write_config(tmp_path, steps, name="whole", model=TINY_MODEL,
                          output={"checkpoint_save_interval": 1, "keep_last": 8})
    Run(load_config(config), echo=lambda line: None).run()
    [folder] = (tmp_path / "whole" / "latent_cache").iterdir()
    entries = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(entries) == 8  # the demo's 8 images, stored once over 2 epochs

    for stop in (1, 2):  # at the flow step's start (the loader changes), within it
        stopped = tmp_path / f"stopped_{stop}"
        shutil.copytree(tmp_path / "whole", stopped)
        for later in (stopped / "checkpoints").iterdir():
            if later.name.isdigit() and int(later.name) > stop:
                shutil.rmtree(later)
        resumed: list[str] = []
        Run(load_config(config, {"output": {"output_path": str(stopped)}}),
            echo=resumed.append).run()
        assert any(line.startswith(f"Resuming from checkpoint {stop}") for line in resumed)
        expected = [(r["global_step"], r["metrics"]) for r in records(tmp_path / "whole",
                                                                      "flow")]
        actual = [(r["global_step"], r["metrics"]) for r in records(stopped, "flow")]
        assert actual == expected and len(actual) == 3
        kept = stopped / "latent_cache" / folder.name
        assert {p.name: p.stat().st_mtime_ns for p in kept.iterdir()} == entries
