"""The README's quickstart: configs/quickstart.yaml trains all three stages, and PyTorch
``fluxflow`` loads what it writes, as the README's "In PyTorch" tells users to, and makes the
same images from it.

The run trains one batch per stage of the quickstart as it is (its model section
included, whatever widths it has at the time), so these tests hold any quickstart to both
promises."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from fluxflow.models import BertTextEncoder

import torch_reference as ref
from fluxflow_jax import cli
from fluxflow_jax.data.tokenizer import Tokenizer
from fluxflow_jax.interop import load_fluxflow
from fluxflow_jax.models import FluxFlowConfig, flow_noise
from fluxflow_jax.sampling import generate, starting_noise
from pipeline_helpers import records

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy use
QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
PROMPT = "a large red circle in the middle on a blue background"
STEPS = 4


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, lpips_files) -> Iterator[tuple[Path, str]]:
    """configs/quickstart.yaml as the README runs it, validated, then trained one batch per
    stage (--max_steps): its output folder and what the two commands printed."""
    out = tmp_path_factory.mktemp("quickstart") / "out"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv("FLUXFLOW_JAX_CACHE", str(lpips_files["weights"].parent))
        assert cli.main(["validate", str(QUICKSTART)]) == 0
        assert cli.main(["train", "--config", str(QUICKSTART), "--max_steps", "1",
                         "--output_path", str(out)]) == 0
    yield out, printed.getvalue()
    shutil.rmtree(out)  # about 2 GB: DistilBERT in the text encoder files and checkpoints


def test_quickstart_runs_every_stage(quickstart):
    out, printed = quickstart
    assert "PyTorch: fluxflow 0.8.1 loads the exports" in printed  # validate's plan
    assert "cannot rebuild" not in printed  # nor does train warn
    assert "Step vae_gan (2/3)" in printed and "LPIPS:" in printed
    for stage in ("vae_warmup", "vae_gan", "flow"):
        assert (out / f"flxflow_step_{stage}_final.safetensors").is_file()
        assert len(records(out, stage)) == 1
        assert (out / "graph" / f"training_losses_{stage}.png").is_file()
    assert (out / "graph" / "training_overview.png").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "sample_flow_epoch_1_batch_1_32x32.png", "sample_vae_gan_epoch_1_batch_1_vae.png",
        "sample_vae_warmup_epoch_1_batch_1_vae.png"]
    loaded = load_fluxflow(out)
    assert set(loaded.present()) == {"compressor", "flow_processor", "expander",
                                     "text_encoder", "discriminator"}
    # v060's bounded latent tokens keep the flow's target small (v030's reach 10^3-10^11).
    assert loaded.config.model_version == "0.6.0"
    assert 0 < records(out, "flow")[0]["metrics"]["flow_loss"] < 10


def test_step_files_store_each_text_encoder_once(quickstart):
    """DistilBERT is written once per step: the step's file and the unchanged average
    (the VAE steps keep none of the text encoder) are links to the latest file, and the
    flow step's average holds its trained head beside the same frozen DistilBERT."""
    out, _ = quickstart
    for stage in ("vae_warmup", "vae_gan"):
        assert (out / f"text_encoder_step_{stage}.safetensors").samefile(
            out / f"text_encoder_step_{stage}_ema.safetensors")
    trained = out / "text_encoder_step_flow.safetensors"
    assert trained.samefile(out / "text_encoder.safetensors")
    final = safetensors.torch.load_file(trained)
    averaged = safetensors.torch.load_file(out / "text_encoder_step_flow_ema.safetensors")
    assert final.keys() == averaged.keys()
    changed = {k for k in final if not torch.equal(final[k], averaged[k])}
    assert changed == {k for k in final if k.startswith("text_encoder.ouput_layer.")}


def _model_section() -> FluxFlowConfig:
    """The architecture configs/quickstart.yaml trains, read from the file now."""
    return FluxFlowConfig(**yaml.safe_load(QUICKSTART.read_text()).get("model") or {})


def test_quickstart_widths_are_ones_pytorch_rebuilds():
    assert _model_section().torch_incompatibilities() == []


def _pytorch_models(out: Path, config: FluxFlowConfig):
    """The README's "In PyTorch" calls: the version's loader for the pipeline, and
    BertTextEncoder with the text encoder file loaded strictly."""
    pipeline = ref.load_export(out, config.model_version).eval()
    architecture = json.loads((out / "model_metadata.json").read_text())["architecture"]
    encoder = BertTextEncoder(embed_dim=architecture["text_embed_dim"])
    weights = safetensors.torch.load_file(out / "text_encoder.safetensors")
    encoder.load_state_dict({k.removeprefix("text_encoder."): v for k, v in weights.items()})
    return pipeline, encoder.eval()


def test_pytorch_loads_the_quickstart_and_makes_the_same_images(quickstart):
    out, _ = quickstart
    config = _model_section()
    models = load_fluxflow(out)
    assert models.config == config
    pipeline, encoder = _pytorch_models(out, config)
    # The loaders load non-strictly: every weight of the file must have arrived, and the
    # pipeline must hold nothing else.
    saved = {k.removeprefix("diffuser."): v for k, v in
             safetensors.torch.load_file(out / "flxflow_final.safetensors").items()}
    assert saved.keys() == pipeline.state_dict().keys()
    assert all(torch.equal(v, pipeline.state_dict()[k]) for k, v in saved.items())

    size = (32, 48)  # (height, width), off the training size
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, *size, 3)).astype(np.float32)
    h, w = (side // 2**config.downscales for side in size)
    eps = rng.normal(size=(2, h, w, config.vae_dim)).astype(np.float32)
    ref.inject_noise(pipeline.compressor, torch.from_numpy(eps).permute(0, 3, 1, 2))
    with torch.no_grad():
        expected = ref.nchw(pipeline.expander(pipeline.compressor(
            torch.from_numpy(images).permute(0, 3, 1, 2))))
    actual = models.expander(models.compressor(jnp.asarray(images), noise=jnp.asarray(eps)),
                             use_context=True)
    assert ref.relative_error(actual, expected) <= ref.FLOAT32_CHAIN_TOL

    ids, mask = Tokenizer.load().encode([PROMPT, "a small green square"], max_length=16)
    # Where the quickstart's flow starts: its compressor's tokens of noise images, as
    # PyTorch's FluxFlowPipeline starts (tests/test_generate_torch.py).
    assert config.flow_noise == "encoded_noise_image"
    draws = flow_noise.draw(config, jax.random.key(0), 2, (h, w))
    noise = np.array(starting_noise(models, draws))
    expected = ref.sample(pipeline, encoder, torch.from_numpy(ids).long(),
                          torch.from_numpy(mask).long(), torch.from_numpy(noise), 3.0, STEPS,
                          size, config)
    actual = np.asarray(generate(models, jnp.asarray(ids), jnp.asarray(mask), height=size[0],
                                 width=size[1], noise=jnp.asarray(noise), num_steps=STEPS,
                                 guidance=3.0))
    assert ref.relative_error(actual, expected) <= ref.FLOAT32_CHAIN_TOL
    assert np.std(actual) > 0.01  # an image, not a constant
