"""Checkpoint files cross between the frameworks: what fluxflow-jax writes loads in PyTorch
``fluxflow`` (its versioned loader and strict ``load_state_dict``) with the same outputs, and
what PyTorch writes loads in fluxflow-jax with the same outputs. Text encoder and
discriminator included."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
import safetensors.torch
import torch
from flax import nnx
from fluxflow.models.pipeline import FluxPipeline
from fluxflow.models.versioning import load_versioned_checkpoint, save_versioned_checkpoint

import torch_reference as ref
from fluxflow_jax.interop import FluxFlowModels, load_fluxflow, save_fluxflow

# A one-layer DistilBERT with a 64-token vocabulary: the layout is what is under test here
# (test_parity_torch checks the full-size text encoder's numbers).
CFG = ref.CONFIGS["a"][0].replace(disc_base_channels=8, disc_depth=2, text_vocab_size=64,
                                  text_layers=1, text_hidden_dim=64, text_max_positions=32)
pytestmark = pytest.mark.filterwarnings("ignore:.*PyTorch fluxflow cannot rebuild")
IMAGE_SHAPE = ref.CONFIGS["a"][1]


@pytest.fixture(scope="module")
def inputs():
    images, noise, text, t = ref.inputs(CFG, IMAGE_SHAPE, torch.float32, seed=11)
    ids = torch.randint(1, CFG.text_vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return images, noise, text, t, ids * mask, mask


def jax_outputs(models: FluxFlowModels, inputs):
    """Decoded images of compressor -> flow -> expander, text embeddings, D logits (NHWC)."""
    images, noise, text, t, ids, mask = inputs
    hw = models.compressor.latent_shape(*IMAGE_SHAPE[1:])

    @nnx.jit
    def run(compressor, flow, expander, text_encoder, discriminator, x, eps, e, t, ids, mask):
        packed = compressor(x, noise=eps)
        decoded = expander(flow(packed, e, t, hw=hw), hw=hw)
        return decoded, text_encoder(ids, mask), discriminator(x, packed[:, 0])

    return run(models.compressor, models.flow_processor, models.expander, models.text_encoder,
               models.discriminator, ref.to_jax(images, jnp.float32, True),
               ref.to_jax(noise, jnp.float32, True), ref.to_jax(text, jnp.float32),
               ref.to_jax(t, jnp.float32), jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))


def torch_outputs(pipe: FluxPipeline, text_encoder, discriminator, inputs):
    images, noise, text, t, ids, mask = inputs
    ref.inject_noise(pipe.compressor, noise)
    with torch.no_grad():
        packed = pipe.compressor(images)
        decoded = pipe.expander(pipe.flow_processor(packed, text, t))
        _, logits = discriminator.eval()(images, packed[:, 0])
        embeddings = text_encoder.eval()(ids, attention_mask=mask)
    return ref.nchw(decoded), embeddings.numpy(), ref.nchw(logits)


def assert_same(actual, expected):
    """Decoded images come through the whole chain; the others from single modules."""
    tolerances = {"decoded": ref.FLOAT32_CHAIN_TOL, "text embedding": ref.FLOAT32_TOL,
                  "logits": ref.FLOAT32_TOL}
    for (name, tol), a, e in zip(tolerances.items(), actual, expected):
        assert ref.relative_error(a, e) <= tol, name


def _strip(tensors: dict, prefix: str) -> dict:
    assert all(k.startswith(prefix) for k in tensors), prefix
    return {k[len(prefix):]: v for k, v in tensors.items()}


def test_jax_checkpoint_runs_in_pytorch(tmp_path, inputs):
    models = FluxFlowModels.create(CFG, nnx.Rngs(7)).eval()
    expected = jax_outputs(models, inputs)
    save_fluxflow(tmp_path, models)

    torch_te = ref.text_encoder(CFG, seed=0)
    torch_te.load_state_dict(_strip(safetensors.torch.load_file(
        tmp_path / "text_encoder.safetensors"), "text_encoder."), strict=True)
    torch_d = ref.PatchDiscriminator02(3, CFG.disc_base_channels, CFG.disc_depth,
                                       CFG.discriminator_ctx_dim)
    torch_d.load_state_dict(_strip(safetensors.torch.load_file(tmp_path / "D_img.safetensors"),
                                   "D_img."), strict=True)

    versioned = load_versioned_checkpoint(tmp_path, "cpu")
    assert isinstance(versioned, FluxPipeline)
    assert_same(torch_outputs(versioned, torch_te, torch_d, inputs), expected)

    strict = FluxPipeline(ref.compressor(CFG), ref.flow_processor(CFG), ref.expander(CFG)).eval()
    fresh_buffers = {k: v.clone() for k, v in strict.state_dict().items() if "inv_freq" in k}
    strict.load_state_dict(_strip(safetensors.torch.load_file(
        tmp_path / "flxflow_final.safetensors"), "diffuser."), strict=True)
    assert_same(torch_outputs(strict, torch_te, torch_d, inputs), expected)
    # Fixed buffers are exported bit for bit as PyTorch computes them.
    assert all(torch.equal(v, strict.state_dict()[k]) for k, v in fresh_buffers.items())


@pytest.fixture(scope="module")
def torch_models():
    return (ref.pipeline(CFG, seed=21), ref.text_encoder(CFG, seed=22),
            ref.discriminator(CFG, seed=23))


def _save_prefixed(module: torch.nn.Module, prefix: str, path) -> None:
    safetensors.torch.save_file({prefix + k: v.contiguous() for k, v in
                                 module.state_dict().items()}, str(path))


def test_pytorch_checkpoint_runs_in_jax(tmp_path, inputs, torch_models):
    """The layout the PyTorch side writes: versioned pipeline + training CheckpointManager's
    prefixed text encoder and discriminator files."""
    pipe, text_encoder, discriminator = torch_models
    save_versioned_checkpoint(pipe, tmp_path, model_version="0.3.0")
    _save_prefixed(text_encoder, "text_encoder.", tmp_path / "text_encoder.safetensors")
    _save_prefixed(discriminator, "D_img.", tmp_path / "D_img.safetensors")
    assert (tmp_path / "model.safetensors").is_file()

    models = load_fluxflow(tmp_path)
    assert models.config == CFG
    assert_same(jax_outputs(models, inputs), torch_outputs(pipe, text_encoder, discriminator,
                                                           inputs))


def test_single_file_without_metadata_runs_in_jax(tmp_path, inputs, torch_models):
    """A lone legacy-style file (pipeline + text encoder keys, no metadata): the architecture
    comes from the tensor shapes alone."""
    pipe, text_encoder, discriminator = torch_models
    tensors = {f"diffuser.{k}": v for k, v in pipe.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    tensors.update({f"D_img.{k}": v for k, v in discriminator.state_dict().items()})
    safetensors.torch.save_file(tensors, str(tmp_path / "weights.safetensors"))

    models = load_fluxflow(tmp_path / "weights.safetensors")
    assert models.config == CFG
    assert_same(jax_outputs(models, inputs), torch_outputs(pipe, text_encoder, discriminator,
                                                           inputs))
