"""Cached text features: a flow step on a frozen language model's stored features equals one
on the captions, the cache follows the language model (not the head) and the captions, and
a run with it trains past the batches the loader reads ahead."""

import jax
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import ConfigError, load_config
from fluxflow_jax.pipeline.run import Run
from fluxflow_jax.pipeline.stages import build_stages
from fluxflow_jax.pipeline.text_cache import TextCache
from fluxflow_jax.training import StageConfig, TrainStep
from fluxflow_jax.training.flow_step import TEXT_FEATURES, FlowOptions
from fluxflow_jax.training.state import Networks, split_models
from pipeline_helpers import DATA, TINY_MODEL, write_config
from tiny import TINY
from tiny_steps import CONSTANT

SGD = {"type": "SGD", "lr": 0.05}
RNG = np.random.default_rng(2)
BATCH = {"images": RNG.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
         "input_ids": RNG.integers(0, TINY.text_vocab_size, (4, 8)).astype(np.int32),
         "attention_mask": np.array([[1] * 8, [1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6],
                                    bool)}


def _stage(frozen: set[str]) -> StageConfig:
    return StageConfig(flow=FlowOptions(cfg_dropout_prob=0.25),
                       frozen=frozenset({"compressor", "expander", *frozen}),
                       optimizers={"flow": SGD, "text_encoder": SGD},
                       schedulers={"flow": CONSTANT, "text_encoder": CONSTANT})


@pytest.fixture(scope="module")
def models():
    return FluxFlowModels.create(TINY, nnx.Rngs(0))


def _cache(models, root, params=None):
    own_params, buffers = split_models(models)
    return TextCache(root, Networks.from_models(models), params or own_params["text_encoder"],
                     buffers["text_encoder"], models.config.model_version)


def _steps(step, state, batch, count):
    metrics = []
    for k in range(count):
        state, m = step(state, batch, jax.random.key(k))
        metrics.append({name: float(v) for name, v in m.items()})
    return jax.device_get(state), metrics


def test_a_flow_step_on_cached_features_equals_one_on_the_captions(models, tmp_path):
    """Same keys, so the same noise and text dropout: the same losses and updates (the
    head's included) from the cache."""
    cached = _cache(models, tmp_path).inputs(BATCH)
    assert "input_ids" not in cached and "attention_mask" not in cached
    assert cached[TEXT_FEATURES].shape == (4, TINY.text_dim)
    runs = []
    for batch in (BATCH, cached):
        step = TrainStep(models, _stage({"language_model"}))
        runs.append(_steps(step, step.init_state(models), batch, 2))
    (want_state, want), (got_state, got) = runs
    assert want[1]["grad_norm_text"] > 0  # the head trains on either
    for a, b in zip(want, got, strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6),
                 want_state.params, got_state.params)


def test_the_cache_follows_the_language_model_and_the_captions(models, tmp_path):
    cache = _cache(models, tmp_path)
    first = cache.inputs(BATCH)
    assert cache.encoded == 4 and len(list(cache.folder.iterdir())) == 4
    again = _cache(models, tmp_path)  # a resumed run: everything found
    np.testing.assert_array_equal(again.inputs(BATCH)[TEXT_FEATURES], first[TEXT_FEATURES])
    assert again.encoded == 0 and again.folder == cache.folder
    changed = {**BATCH, "attention_mask": BATCH["attention_mask"].copy()}
    changed["attention_mask"][3, 2] = True  # another caption length: encoded anew
    again.inputs(changed)
    assert again.encoded == 1 and len(list(cache.folder.iterdir())) == 5

    params = split_models(models)[0]["text_encoder"]
    for part, same in (("head_proj1", True), ("layers", False)):
        changed = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 1 if jax.tree_util.keystr(path).startswith(f"['{part}']")
            else x, params)
        assert (_cache(models, tmp_path, changed).folder == cache.folder) == same, part


def test_features_for_a_training_language_model_are_refused(models, tmp_path):
    """With DistilBERT training, cached features would silently freeze it."""
    cached = _cache(models, tmp_path).inputs(BATCH)
    step = TrainStep(models, _stage(set()))
    with pytest.raises(ValueError, match="needs a flow stage whose language model is frozen"):
        step(step.init_state(models), cached, jax.random.key(0))


def test_cache_text_needs_a_frozen_language_model(tmp_path):
    steps = [{"name": "flow", "n_epochs": 1, "train_diff": True, "freeze_vae": True,
              "cache_text": True}]
    with pytest.raises(ConfigError, match=r"step 'flow' \(1/1\): cache_text needs a flow step "
                                          r"whose language model is frozen: add freeze: "
                                          r"\[language_model\]"):
        build_stages(load_config(write_config(tmp_path, steps)), 4)


def test_a_run_on_both_caches_trains_past_the_batches_read_ahead(tmp_path, monkeypatch):
    """16 batches, each with new images and captions: the caches encode with their own
    copies of the weights, which the train step's donated state does not delete."""
    monkeypatch.setitem(DATA, "demo_samples", 32)
    steps = [{"name": "flow", "n_epochs": 2, "train_diff": True, "freeze_vae": True,
              "freeze": ["language_model"], "cache_latents": True, "cache_text": True}]
    Run(load_config(write_config(tmp_path, steps, model=TINY_MODEL)),
        echo=lambda line: None).run()
    for folder in ("latent_cache", "text_cache"):
        [entries] = (tmp_path / "run" / folder).iterdir()
        assert len(list(entries.iterdir())) == 32, folder
