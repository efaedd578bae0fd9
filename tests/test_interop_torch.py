"""Checkpoint files cross between the frameworks, in every architecture version: what
fluxflow-jax writes loads in PyTorch ``fluxflow`` (the loader a user calls for that version,
and strict ``load_state_dict``) with the same outputs, and every layout PyTorch ``fluxflow``
and the ``fluxflow-training`` trainer write loads in fluxflow-jax with the same outputs.
Text encoder and discriminator included."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax.numpy as jnp
import pytest
import safetensors.torch
import torch
from flax import nnx
from fluxflow.models.pipeline import FluxPipeline
from fluxflow.exceptions import CheckpointError as TorchCheckpointError
from fluxflow.models.discriminators import PatchDiscriminator as TrainerDiscriminator
from fluxflow.models.versioning import load_versioned_checkpoint, save_versioned_checkpoint

import reference_source
import torch_reference as ref
from fluxflow_jax.interop import FluxFlowModels, load_fluxflow, save_fluxflow

# A one-layer DistilBERT with a 64-token vocabulary: the layout is what is under test here
# (test_parity_torch checks the full-size text encoder's numbers).
BASE = ref.CONFIGS["a"][0].replace(disc_base_channels=8, disc_depth=2, text_vocab_size=64,
                                   text_layers=1, text_hidden_dim=64, text_max_positions=32)
pytestmark = pytest.mark.filterwarnings("ignore:.*PyTorch fluxflow cannot rebuild")
IMAGE_SHAPE = ref.CONFIGS["a"][1]


@pytest.fixture(scope="module", params=ref.VERSIONS, ids=lambda v: "v" + v.replace(".", ""))
def cfg(request):
    return BASE.replace(model_version=request.param)


@pytest.fixture(scope="module")
def inputs():
    images, noise, text, t = ref.inputs(BASE, IMAGE_SHAPE, torch.float32, seed=11)
    ids = torch.randint(1, BASE.text_vocab_size, (2, 12),
                        generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return images, noise, text, t, ids * mask, mask


def jax_outputs(models: FluxFlowModels, inputs) -> dict:
    """Decoded images of compressor -> flow -> expander, text embeddings and, with a
    discriminator, its logits (NHWC)."""
    images, noise, text, t, ids, mask = inputs
    hw = models.compressor.latent_shape(*IMAGE_SHAPE[1:])

    @nnx.jit
    def run(compressor, flow, expander, text_encoder, discriminator, x, eps, e, t, ids, mask):
        packed = compressor(x, noise=eps)
        out = {"decoded": expander(flow(packed, e, t, hw=hw), hw=hw),
               "text embedding": text_encoder(ids, mask)}
        if discriminator is not None:
            out["logits"] = discriminator(x, packed[:, 0])
        return out

    return run(models.compressor, models.flow_processor, models.expander, models.text_encoder,
               models.discriminator, ref.to_jax(images, jnp.float32, True),
               ref.to_jax(noise, jnp.float32, True), ref.to_jax(text, jnp.float32),
               ref.to_jax(t, jnp.float32), jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))


def torch_outputs(pipe: FluxPipeline, text_encoder, discriminator, inputs) -> dict:
    images, noise, text, t, ids, mask = inputs
    ref.inject_noise(pipe.compressor, noise)
    with torch.no_grad():
        packed = pipe.compressor(images)
        out = {"decoded": ref.nchw(pipe.expander(pipe.flow_processor(packed, text, t))),
               "text embedding": text_encoder.eval()(ids, attention_mask=mask).numpy()}
        if discriminator is not None:
            out["logits"] = ref.nchw(discriminator.eval()(images, packed[:, 0])[1])
    return out


def assert_same(actual: dict, expected: dict):
    """Decoded images come through the whole chain; the others from single modules."""
    tolerances = {"decoded": ref.FLOAT32_CHAIN_TOL, "text embedding": ref.FLOAT32_TOL,
                  "logits": ref.FLOAT32_TOL}
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        assert ref.relative_error(value, expected[name]) <= tolerances[name], name


def _strip(tensors: dict, prefix: str) -> dict:
    assert all(k.startswith(prefix) for k in tensors), prefix
    return {k[len(prefix):]: v for k, v in tensors.items()}


def test_jax_checkpoint_runs_in_pytorch(tmp_path, inputs, cfg):
    models = FluxFlowModels.create(cfg, nnx.Rngs(7)).eval()
    expected = jax_outputs(models, inputs)
    save_fluxflow(tmp_path, models)

    torch_te = ref.text_encoder(cfg, seed=0)
    torch_te.load_state_dict(_strip(safetensors.torch.load_file(
        tmp_path / "text_encoder.safetensors"), "text_encoder."), strict=True)
    torch_d = ref.PatchDiscriminator02(3, cfg.disc_base_channels, cfg.disc_depth,
                                       cfg.discriminator_ctx_dim)
    torch_d.load_state_dict(_strip(safetensors.torch.load_file(tmp_path / "D_img.safetensors"),
                                   "D_img."), strict=True)

    users = ref.load_export(tmp_path, cfg.model_version)
    assert isinstance(users, FluxPipeline)
    assert type(users.compressor) is ref.torch_classes(cfg).FluxCompressor
    assert_same(torch_outputs(users, torch_te, torch_d, inputs), expected)

    strict = FluxPipeline(ref.compressor(cfg), ref.flow_processor(cfg), ref.expander(cfg)).eval()
    fresh_buffers = {k: v.clone() for k, v in strict.state_dict().items() if "inv_freq" in k}
    strict.load_state_dict(_strip(safetensors.torch.load_file(
        tmp_path / "flxflow_final.safetensors"), "diffuser."), strict=True)
    assert_same(torch_outputs(strict, torch_te, torch_d, inputs), expected)
    # Fixed buffers are exported bit for bit as PyTorch computes them.
    assert all(torch.equal(v, strict.state_dict()[k]) for k, v in fresh_buffers.items())


def test_pytorch_versioned_loader_refuses_a_v060_export(tmp_path):
    """Rather than building v030 classes and silently dropping final_norm."""
    save_fluxflow(tmp_path, FluxFlowModels.create(BASE, nnx.Rngs(7),
                                                  ("compressor", "flow_processor", "expander")))
    with pytest.raises(TorchCheckpointError, match="0.6.0 is newer than library version"):
        load_versioned_checkpoint(tmp_path, "cpu")


@pytest.fixture(scope="module")
def torch_models(cfg):
    return (ref.pipeline(cfg, seed=21), ref.text_encoder(cfg, seed=22),
            ref.discriminator(cfg, seed=23))


def _save_prefixed(module: torch.nn.Module, prefix: str, path) -> None:
    safetensors.torch.save_file({prefix + k: v.contiguous() for k, v in
                                 module.state_dict().items()}, str(path))


def test_pytorch_checkpoint_runs_in_jax(tmp_path, inputs, torch_models, cfg):
    """save_versioned_checkpoint's directory, labelled as a PyTorch user can (v060 as
    "0.3.0": the keys decide), with prefixed text encoder and discriminator files beside it."""
    pipe, text_encoder, discriminator = torch_models
    save_versioned_checkpoint(pipe, tmp_path, model_version=ref.save_label(cfg.model_version))
    _save_prefixed(text_encoder, "text_encoder.", tmp_path / "text_encoder.safetensors")
    _save_prefixed(discriminator, "D_img.", tmp_path / "D_img.safetensors")
    assert (tmp_path / "model.safetensors").is_file()

    models = load_fluxflow(tmp_path)
    assert models.config == cfg
    assert_same(jax_outputs(models, inputs), torch_outputs(pipe, text_encoder, discriminator,
                                                           inputs))


def test_single_file_without_metadata_runs_in_jax(tmp_path, inputs, torch_models, cfg):
    """A lone legacy-style file (pipeline + text encoder keys, no metadata): the architecture
    comes from the tensor shapes alone."""
    pipe, text_encoder, discriminator = torch_models
    tensors = {f"diffuser.{k}": v for k, v in pipe.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    tensors.update({f"D_img.{k}": v for k, v in discriminator.state_dict().items()})
    safetensors.torch.save_file(tensors, str(tmp_path / "weights.safetensors"))

    models = load_fluxflow(tmp_path / "weights.safetensors")
    assert models.config == cfg
    assert_same(jax_outputs(models, inputs), torch_outputs(pipe, text_encoder, discriminator,
                                                           inputs))


@pytest.fixture(scope="module")
def fluxflow_utils():
    """fluxflow.utils installed while the tests that save through it run."""
    with reference_source.fluxflow_utils() as utils:
        yield utils


@pytest.mark.parametrize("model_config", [
    None, {"model_type": "bezier", "model_version": "0.6.0", "vae_dim": 16},
    {"model_type": "bezier", "model_version": "0.7.0", "vae_dim": 16},
    {"model_type": "bezier", "model_version": "0.8.0", "vae_dim": 16}],
    ids=["legacy_trainer", "factory_trainer", "factory_trainer_v070", "factory_trainer_v080"])
def test_trainer_output_runs_in_jax(tmp_path, inputs, model_config, fluxflow_utils):
    """The fluxflow-training 0.8.1 trainer's output directory (v060, its default, or the
    version its model factory was asked for). Its discriminator is another network than
    ours: left out, with a warning."""
    version = (model_config or {}).get("model_version", "0.6.0")
    cfg = BASE.replace(model_version=version)
    pipe, text_encoder = ref.pipeline(cfg, seed=31), ref.text_encoder(cfg, seed=32)
    trainer_d = TrainerDiscriminator(ctx_dim=cfg.latent_width)
    checkpoints = reference_source.source_file("fluxflow_training",
                                               "training/checkpoint_manager.py",
                                               "fluxflow_training_checkpoints")
    checkpoints.CheckpointManager(tmp_path).save_models(
        pipe, text_encoder, discriminators={"D_img": trainer_d}, model_config=model_config)
    with pytest.warns(UserWarning, match="D_img.* is fluxflow-training 0.8.1's discriminator"):
        models = load_fluxflow(tmp_path)
    assert models.config.model_version == version and models.discriminator is None
    assert_same(jax_outputs(models, inputs), torch_outputs(pipe, text_encoder, None, inputs))


@pytest.mark.parametrize("save_pretrained", [True, False])
def test_save_model_output_runs_in_jax(tmp_path, inputs, save_pretrained, fluxflow_utils):
    """fluxflow's legacy save_model: text_encoder.* inside the weights file as well, and
    by default without its DistilBERT (that text encoder is left out, with a warning)."""
    pipe, text_encoder = ref.pipeline(BASE, seed=41), ref.text_encoder(BASE, seed=42)
    fluxflow_utils.save_model(pipe, text_encoder, str(tmp_path),
                              save_pretrained=save_pretrained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = load_fluxflow(tmp_path)
    assert models.config.model_version == "0.6.0"
    if save_pretrained:
        assert not caught
        assert_same(jax_outputs(models, inputs),
                    torch_outputs(pipe, text_encoder, None, inputs))
    else:
        assert models.text_encoder is None
        assert "text_encoder.* holds no language_model.*" in str(caught[0].message)
