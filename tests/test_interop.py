"""Checkpoint interop without PyTorch: the key table's coverage, bitwise round trips, strict
errors that name the offending key, config inference, atomic writes, and the CLI."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from fluxflow_jax import cli
from fluxflow_jax.interop import (COMPONENT_TABLES, CheckpointError, FluxFlowModels,
                                  TorchIncompatibilityWarning, load_fluxflow, save_fluxflow)
from fluxflow_jax.interop.state import check_coverage
from fluxflow_jax.models import FluxFlowConfig
from fluxflow_jax.models.bundle import COMPONENT_CLASSES

# TINY's text encoder is far smaller than the one PyTorch fluxflow builds: saving it warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*PyTorch fluxflow cannot rebuild")

TINY = FluxFlowConfig(vae_dim=16, downscales=2, upscales=2, vae_attn_layers=1, flow_dim=16,
                      flow_attn_heads=2, flow_transformer_layers=2, text_embed_dim=16,
                      text_vocab_size=40, text_dim=24, text_heads=2, text_layers=2,
                      text_hidden_dim=32, text_max_positions=20, text_head_width=8,
                      disc_base_channels=4, disc_depth=2)


@pytest.fixture(scope="module")
def models() -> FluxFlowModels:
    return FluxFlowModels.create(TINY, nnx.Rngs(3))


@pytest.fixture(scope="module")
def checkpoint(models, tmp_path_factory):
    return save_fluxflow(tmp_path_factory.mktemp("ckpt"), models)


def _read(path):
    return safetensors.numpy.load_file(str(path))


@pytest.mark.parametrize("name", list(COMPONENT_TABLES))
@pytest.mark.parametrize("config", [TINY, TINY.replace(downscales=3, upscales=1,
                                                        vae_attn_layers=3, disc_ctx_dim=0),
                                    TINY.replace(model_version="0.8.0")])
def test_key_table_names_every_variable_once(name, config):
    module = nnx.eval_shape(lambda: COMPONENT_CLASSES[name](config, rngs=nnx.Rngs(0)))
    check_coverage(module, COMPONENT_TABLES[name][1](config))


def test_round_trip_is_bitwise(models, checkpoint):
    loaded = load_fluxflow(checkpoint)
    assert loaded.config == TINY
    for name, module in models.present().items():
        original = nnx.to_flat_state(nnx.state(module))
        restored = dict(nnx.to_flat_state(nnx.state(getattr(loaded, name))))
        assert len(original) == len(restored)
        for path, variable in original:
            assert type(restored[path]) is type(variable), path
            np.testing.assert_array_equal(restored[path][...], variable[...], err_msg=str(path))


def test_written_layout(checkpoint):
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "D_img.safetensors", "flxflow_final.safetensors", "model_metadata.json",
        "text_encoder.safetensors"]
    main = _read(checkpoint / "flxflow_final.safetensors")
    assert all(k.split(".")[:2] in (["diffuser", "compressor"], ["diffuser", "flow_processor"],
                                    ["diffuser", "expander"]) for k in main)
    assert main["diffuser.expander.upscale.layers.0.conv1.0.weight"].shape == (16, 80, 16, 16)
    assert main["diffuser.flow_processor.flow_predictor.1.p0"].shape == (16, 1, 1)
    assert "diffuser.compressor.final_norm.weight" in main  # v060, the default
    assert not any(k.startswith("diffuser.expander.context_mixer.") for k in main)
    inv_freq = main["diffuser.flow_processor.transformer_blocks.1.rotary_pe.inv_freq"]
    np.testing.assert_allclose(inv_freq, 1 / 10000 ** (np.arange(4) / 4.0), rtol=1e-6)
    assert all(v.dtype == np.float32 for v in main.values())
    text = _read(checkpoint / "text_encoder.safetensors")
    assert "text_encoder.language_model.embeddings.word_embeddings.weight" in text
    assert "text_encoder.ouput_layer.3.weight" in text
    assert "D_img.backbone.2.conv1.0.weight_orig" in _read(checkpoint / "D_img.safetensors")
    metadata = json.loads((checkpoint / "model_metadata.json").read_text())
    assert metadata["model_version"] == "0.6.0"
    assert {"vae_dim": 16, "downscales": 2, "flow_dim": 16, "vae_attn_layers": 1}.items() \
        <= metadata["architecture"].items()


def _rewrite(src, dst, edit) -> None:
    """Copy a checkpoint directory, applying ``edit`` to the main weights file's tensors,
    as a hand-edited checkpoint would be: without the file hashes fluxflow-jax records."""
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    tensors = dict(_read(src / "flxflow_final.safetensors"))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(dst / "flxflow_final.safetensors"))
    metadata = json.loads((src / "model_metadata.json").read_text())
    del metadata["checksum"]["files"]
    (dst / "model_metadata.json").write_text(json.dumps(metadata))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("diffuser.compressor.mu_activation.p2"),
     "missing key 'mu_activation.p2'"),
    (lambda t: t.update({"diffuser.expander.upscale.layers.0.spade.mlp_gamma.weight":
                         np.zeros((16, 128, 3, 3), np.float32)}),
     "fluxflow-core 0.2.x SPADE keys \\(e.g. 'expander.upscale.layers.0.spade.mlp_gamma"),
    (lambda t: t.update({"diffuser.expander.rgb_extra.weight": np.zeros(3, np.float32)}),
     "unexpected key 'rgb_extra.weight'"),
    (lambda t: t.update({"diffuser.flow_processor.ctx_mixer.cls": np.zeros((1, 1, 8),
                                                                            np.float32)}),
     "key 'ctx_mixer.cls' has shape [1, 1, 8], expected [1, 1, 16]"),
    (lambda t: t.update({"diffuser.somewhere_else.weight": np.zeros(3, np.float32)}),
     "unexpected keys 'diffuser.somewhere_else.weight'"),
])
def test_mismatched_checkpoint_names_the_key(checkpoint, tmp_path, edit, message):
    _rewrite(checkpoint, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_fluxflow(tmp_path / "bad")


def test_metadata_that_contradicts_the_weights_is_an_error(checkpoint, tmp_path):
    _rewrite(checkpoint, tmp_path / "bad", lambda t: None)
    metadata = json.loads((tmp_path / "bad" / "model_metadata.json").read_text())
    metadata["architecture"]["vae_attn_layers"] = 2  # the PyTorch loader's default
    (tmp_path / "bad" / "model_metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="says vae_attn_layers=2 but the weights have 1"):
        load_fluxflow(tmp_path / "bad")


def test_metadata_supplies_what_shapes_cannot(models, tmp_path):
    config = TINY.replace(max_hw=512, vae_attn_heads=4)
    vae_only = FluxFlowModels(config, models.compressor, models.flow_processor, models.expander)
    with pytest.warns(TorchIncompatibilityWarning,
                      match=r"rebuild this architecture: vae_attn_heads=4 \(PyTorch uses 8\), "
                            r"max_hw=512 \(PyTorch uses 1024\); its loaders hard-code "
                            r"these"):  # v060's from_pretrained: max_hw too
        save_fluxflow(tmp_path, vae_only)
    assert load_fluxflow(tmp_path).config.max_hw == 512
    assert load_fluxflow(tmp_path).config.vae_attn_heads == 4


def test_bare_component_keys(models, checkpoint, tmp_path):
    """Files without the diffuser. prefix (compressor.* ...) load as the reference's do."""
    tensors = {k.removeprefix("diffuser."): v
               for k, v in _read(checkpoint / "flxflow_final.safetensors").items()}
    safetensors.numpy.save_file(tensors, str(tmp_path / "bare.safetensors"))
    loaded = load_fluxflow(tmp_path / "bare.safetensors")
    assert set(loaded.present()) == {"compressor", "flow_processor", "expander"}
    assert _same_weights(loaded, FluxFlowModels(TINY, models.compressor,
                                                models.flow_processor, models.expander))


def test_partial_checkpoints(models, tmp_path):
    save_fluxflow(tmp_path / "te", FluxFlowModels(TINY, text_encoder=models.text_encoder))
    loaded = load_fluxflow(tmp_path / "te")
    assert set(loaded.present()) == {"text_encoder"}
    with pytest.raises(ValueError, match="without \\['expander'\\]"):
        save_fluxflow(tmp_path / "x", FluxFlowModels(TINY, models.compressor,
                                                     models.flow_processor))


@pytest.mark.parametrize("make,message", [
    (lambda p: p, "does not exist"),
    (lambda p: (p.mkdir(), p)[1], "holds no checkpoint"),
    (lambda p: (p.write_bytes(b"not a safetensors file"), p)[1], "not a readable safetensors"),
    (lambda p: (p.with_suffix(".pt").write_bytes(b"x"), p.with_suffix(".pt"))[1],
     "only read from .safetensors"),
])
def test_unreadable_paths(tmp_path, make, message):
    with pytest.raises(CheckpointError, match=message):
        load_fluxflow(make(tmp_path / "ckpt.safetensors"))


def _relabel(checkpoint, dst, label, edit=lambda t: None):
    _rewrite(checkpoint, dst, edit)
    metadata = json.loads((dst / "model_metadata.json").read_text())
    (dst / "model_metadata.json").write_text(json.dumps({**metadata, "model_version": label}))
    return dst


@pytest.fixture(scope="module")
def v030_checkpoint(models, tmp_path_factory):
    v030 = FluxFlowModels.create(TINY.replace(model_version="0.3.0"), nnx.Rngs(4),
                                 ("compressor", "flow_processor", "expander"))
    return save_fluxflow(tmp_path_factory.mktemp("v030"), v030)


@pytest.fixture(scope="module")
def v070_checkpoint(tmp_path_factory):
    v070 = FluxFlowModels.create(TINY.replace(model_version="0.7.0"), nnx.Rngs(5))
    return save_fluxflow(tmp_path_factory.mktemp("v070"), v070)


@pytest.fixture(scope="module")
def v080_checkpoint(tmp_path_factory):
    v080 = FluxFlowModels.create(TINY.replace(model_version="0.8.0"), nnx.Rngs(6),
                                 ("compressor", "flow_processor", "expander"))
    return save_fluxflow(tmp_path_factory.mktemp("v080"), v080)


@pytest.mark.parametrize("label", ["0.3.0", "0.6.0", "0.7.0", "legacy"])
def test_the_keys_decide_the_version_over_the_label(checkpoint, v030_checkpoint,
                                                    v070_checkpoint, v080_checkpoint, tmp_path,
                                                    label):
    """PyTorch's save_versioned_checkpoint labels v060 pipelines "0.3.0"."""
    v060 = load_fluxflow(_relabel(checkpoint, tmp_path / "v060", label))
    assert v060.config.model_version == "0.6.0"
    v030 = load_fluxflow(_relabel(v030_checkpoint, tmp_path / "v030", label))
    assert v030.config.model_version == "0.3.0"
    assert "context_mixer" in vars(v030.expander) and "final_norm" not in vars(v030.compressor)
    v070 = load_fluxflow(_relabel(v070_checkpoint, tmp_path / "v070", label))
    assert v070.config == TINY.replace(model_version="0.7.0")
    v080 = load_fluxflow(_relabel(v080_checkpoint, tmp_path / "v080", label))
    assert v080.config == TINY.replace(model_version="0.8.0")
    assert "pillar_cross_attn" in vars(v080.flow_processor.transformer_blocks[0])


def test_the_label_decides_what_the_keys_leave_open(models, tmp_path):
    """A text encoder alone is the same in every version."""
    save_fluxflow(tmp_path / "te", FluxFlowModels(TINY, text_encoder=models.text_encoder))
    assert load_fluxflow(tmp_path / "te").config.model_version == "0.6.0"
    for label, version in (("0.3.1", "0.3.0"), ("0.6.0", "0.6.0")):
        relabelled = tmp_path / f"te_{label}"
        relabelled.mkdir()
        (relabelled / "text_encoder.safetensors").write_bytes(
            (tmp_path / "te" / "text_encoder.safetensors").read_bytes())
        (relabelled / "model_metadata.json").write_text(json.dumps({"model_version": label}))
        assert load_fluxflow(relabelled).config.model_version == version
    (relabelled / "model_metadata.json").write_text(json.dumps({"model_version": "banana"}))
    with pytest.raises(CheckpointError, match="declares model_version 'banana', which names "
                                              "no PyTorch fluxflow architecture"):
        load_fluxflow(relabelled)


def _add_pillar_attention(tensors):
    key = "diffuser.flow_processor.transformer_blocks.0.pillar_cross_attn.q_proj.weight"
    tensors[key] = np.zeros((32, 32), np.float32)


@pytest.mark.parametrize("edit,message", [
    (_add_pillar_attention, r"mixes architecture versions: compressor.final_norm "
                                 r"\(0.6.0\); .*; flow_processor pillar attention \(0.8.0\)"),
    (lambda t: t.update({"diffuser.expander.context_mixer.cls": np.zeros((1, 1, 16),
                                                                          np.float32)}),
     r"mixes architecture versions: compressor.final_norm \(0.6.0\); "
     r"expander.context_mixer \(0.3.0\)"),
])
def test_other_or_mixed_versions_are_refused(checkpoint, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_fluxflow(_relabel(checkpoint, tmp_path / "bad", "0.6.0", edit))


def _same_weights(a: FluxFlowModels, b: FluxFlowModels) -> bool:
    return all(np.array_equal(x, y) for name, module in a.present().items()
               for x, y in zip(jax.tree.leaves(nnx.state(module)),
                               jax.tree.leaves(nnx.state(getattr(b, name)))))


@pytest.mark.parametrize("failing_rename", range(4))  # 3 data files, then the metadata
def test_interrupted_save_never_loads_a_mix(models, tmp_path, monkeypatch, failing_rename):
    """A crash at any rename leaves either the old checkpoint or one that refuses to load;
    no partial files are left behind."""
    target = tmp_path / "run"
    save_fluxflow(target, models)
    newer = FluxFlowModels.create(TINY, nnx.Rngs(99))
    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) - 1 == failing_rename:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr("os.replace", crashing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_fluxflow(target, newer)
    monkeypatch.setattr("os.replace", real_replace)
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]
    if failing_rename == 0:
        assert _same_weights(load_fluxflow(target), models)
    else:
        with pytest.raises(CheckpointError, match="interrupted save"):
            load_fluxflow(target)


def test_tampered_file_is_detected(checkpoint, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in checkpoint.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    data = bytearray((copy / "D_img.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "D_img.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="D_img.safetensors does not match the hash"):
        load_fluxflow(copy)


def test_save_replaces_a_pytorch_checkpoint_in_place(models, checkpoint, tmp_path):
    """A stale model.safetensors (PyTorch's name) would shadow flxflow_final.safetensors."""
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "model.safetensors").write_bytes((checkpoint / "flxflow_final.safetensors")
                                               .read_bytes())
    newer = FluxFlowModels.create(TINY, nnx.Rngs(5), ("compressor", "flow_processor",
                                                     "expander"))
    save_fluxflow(target, newer)
    assert not (target / "model.safetensors").exists()
    assert _same_weights(load_fluxflow(target), newer)


def test_legacy_text_encoder_keys_in_both_files(checkpoint, tmp_path):
    """fluxflow's legacy save_model writes text_encoder.* into the main file as well."""
    _rewrite(checkpoint, tmp_path / "legacy",
             lambda t: t.update(_read(checkpoint / "text_encoder.safetensors")))
    assert load_fluxflow(tmp_path / "legacy").text_encoder is not None

    def conflicting(t):
        t.update(_read(checkpoint / "text_encoder.safetensors"))
        t["text_encoder.ouput_layer.1.bias"] = t["text_encoder.ouput_layer.1.bias"] + 1
    _rewrite(checkpoint, tmp_path / "conflict", conflicting)
    with pytest.raises(CheckpointError, match="different values in more than one file"):
        load_fluxflow(tmp_path / "conflict")


@pytest.mark.parametrize("metadata,message", [
    ("[1, 2]", "must be a JSON object"),
    ('{"architecture": {"vae_dim": "sixteen"}}', "says vae_dim=sixteen"),
    ('{"architecture": {"max_hw": "big"}}', "architecture: .*max_hw must be an integer, "
                                            "got 'big'"),
])
def test_malformed_metadata(checkpoint, tmp_path, metadata, message):
    _rewrite(checkpoint, tmp_path / "bad", lambda t: None)
    (tmp_path / "bad" / "model_metadata.json").write_text(metadata)
    with pytest.raises(CheckpointError, match=message):
        load_fluxflow(tmp_path / "bad")


def test_cli_info(checkpoint, capsys):
    assert cli.main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    expected = sum(x.size for x in jax.tree.leaves(nnx.state(
        load_fluxflow(checkpoint).compressor, nnx.Param)))
    assert re.search(rf"compressor\s+{expected:,} parameters", out)
    assert "vae_dim = 16" in out and "model_version = 0.6.0" in out


def test_cli_reports_bad_checkpoint_without_traceback(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxflow-jax info: error:") and "does not exist" in err
    assert "Traceback" not in err
