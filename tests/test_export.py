"""`fluxflow-jax export` / `import` / `generate --ema`: a run's weights (latest, a step's,
averaged) as standalone checkpoints, and checkpoints from PyTorch made into run inputs."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax import atomic, cli
from fluxflow_jax.interop import load_fluxflow
from fluxflow_jax.pipeline.config import load_config
from fluxflow_jax.pipeline.run import Run
from pipeline_helpers import tensors, write_config

STEPS = [{"name": "vae", "n_epochs": 1, "max_steps": 1, "train_vae": True,
          "ema_decay": 0.5},
         {"name": "flow", "n_epochs": 1, "max_steps": 1, "train_diff": True,
          "freeze_vae": True}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished two-step run (averages kept: the VAE's with decay 0.5, the flow's 0.9999),
    one batch per step."""
    tmp = tmp_path_factory.mktemp("export")
    Run(load_config(write_config(tmp, STEPS)), echo=lambda line: None).run()
    return tmp / "run"


def params(path: Path, component: str) -> list[np.ndarray]:
    module = getattr(load_fluxflow(path), component)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in directory.glob("*.safetensors")}


def test_export_latest_is_the_runs_final_weights(run_dir, tmp_path):
    assert cli.main(["export", str(run_dir), str(tmp_path / "out")]) == 0
    assert digests(tmp_path / "out") == {name: digest for name, digest in
                                         digests(run_dir).items() if "_step_" not in name}


def test_export_ema_takes_the_averages(run_dir, tmp_path):
    assert cli.main(["export", str(run_dir), str(tmp_path / "ema"), "--ema"]) == 0
    out = tmp_path / "ema"
    # The flow step averages the flow processor and the text encoder; its (frozen) VAE keeps
    # the average the vae step left, which differs from the weights the VAE ended with.
    averaged_vae = tensors(run_dir / "flxflow_step_vae_ema.safetensors")
    exported = tensors(out / "flxflow_final.safetensors")
    vae_keys = [k for k in exported if k.startswith("diffuser.compressor.")]
    assert all(np.array_equal(exported[k], averaged_vae[k]) for k in vae_keys)
    assert not equal(params(out, "compressor"), params(run_dir, "compressor"))
    assert not equal(params(out, "flow_processor"), params(run_dir, "flow_processor"))
    assert equal(params(out, "discriminator"), params(run_dir, "discriminator"))


def test_export_a_steps_weights(run_dir, tmp_path):
    assert cli.main(["export", str(run_dir), str(tmp_path / "vae"), "--step", "vae"]) == 0
    step = tensors(run_dir / "flxflow_step_vae_final.safetensors")
    exported = tensors(tmp_path / "vae" / "flxflow_final.safetensors")
    assert exported.keys() == step.keys()
    assert all(np.array_equal(exported[k], step[k]) for k in step)
    assert equal(params(tmp_path / "vae", "text_encoder"),
                 params(run_dir / "text_encoder_step_vae.safetensors", "text_encoder"))


def test_export_names_what_is_missing(run_dir, tmp_path, capsys):
    assert cli.main(["export", str(run_dir), str(tmp_path / "x"), "--step", "gan"]) == 2
    err = capsys.readouterr().err
    assert "no weights of step 'gan' (finished steps: ['flow', 'vae'])" in err
    assert "Traceback" not in err
    plain = tmp_path / "plain"
    assert cli.main(["export", str(run_dir), str(plain)]) == 0
    assert cli.main(["export", str(plain), str(tmp_path / "y"), "--ema"]) == 2
    assert "has no run checkpoints, so no averages to export" in capsys.readouterr().err


def test_round_trip_export_import_is_bitwise(run_dir, tmp_path):
    """JAX -> files -> JAX -> files: the same bytes."""
    assert cli.main(["export", str(run_dir), str(tmp_path / "a")]) == 0
    assert cli.main(["import", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert digests(tmp_path / "b") == digests(tmp_path / "a")


def test_generate_from_a_run_with_its_averages(run_dir, tmp_path):
    out = tmp_path / "images"
    assert cli.main(["generate", "--checkpoint", str(run_dir), "--ema", "--prompt",
                     "a red circle", "--size", "32x32", "--steps", "2", "--max_length", "16",
                     "--output_path", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["000_a-red-circle.png"]


def test_model_checkpoint_starts_from_a_previous_runs_output(run_dir, tmp_path):
    """Fine-tuning: a run directory as model_checkpoint gives the new run its weights."""
    second = write_config(tmp_path, [{"name": "b", "n_epochs": 1, "train_diff": True}],
                          name="second", model_checkpoint=str(run_dir))
    models = Run(load_config(second), echo=lambda line: None).models
    for name in ("compressor", "flow_processor", "expander", "text_encoder",
                 "discriminator"):
        loaded = [np.asarray(x) for x in jax.tree.leaves(nnx.state(getattr(models, name),
                                                                   nnx.Param))]
        assert equal(loaded, params(run_dir, name)), name


def test_a_pytorch_checkpoint_imports_and_fine_tunes(tmp_path):
    """A checkpoint PyTorch fluxflow wrote (its own save function) becomes a run's
    model_checkpoint with its weights unchanged."""
    pytest.importorskip("torch")
    from fluxflow.models.pipeline import FluxPipeline
    from fluxflow.models.versioning import save_versioned_checkpoint

    import torch_reference as ref
    from pipeline_helpers import TINY_MODEL
    from tiny import TINY

    config = TINY.replace(text_vocab_size=30522)
    pipe = FluxPipeline(ref.compressor(config), ref.flow_processor(config),
                        ref.expander(config))
    save_versioned_checkpoint(pipe, tmp_path / "torch", model_version="0.3.0")
    assert cli.main(["import", str(tmp_path / "torch"), str(tmp_path / "imported")]) == 0
    expected = {f"diffuser.{k}": v.numpy() for k, v in pipe.state_dict().items()}
    imported = tensors(tmp_path / "imported" / "flxflow_final.safetensors")
    assert imported.keys() == expected.keys()
    assert all(np.array_equal(imported[k], expected[k]) for k in expected)

    # The model section may only name what the checkpoint has: the VAE and flow widths.
    model = {k: v for k, v in TINY_MODEL.items() if not k.startswith(("text_", "disc_"))}
    config_path = write_config(tmp_path, [STEPS[0]], model=model,
                               model_checkpoint=str(tmp_path / "imported"))
    run = Run(load_config(config_path), echo=lambda line: None)
    assert equal([np.asarray(x) for x in jax.tree.leaves(nnx.state(run.models.compressor,
                                                                   nnx.Param))],
                 params(tmp_path / "imported", "compressor"))


def _write_command(command: str, run_dir: Path, out: Path) -> list[str]:
    """``export`` or ``import`` of the run's weights into ``out``."""
    return [command, str(run_dir), str(out)]


@pytest.mark.parametrize("command", ["export", "import"])
def test_a_folder_with_files_not_ours_is_refused_unless_forced(run_dir, tmp_path, capsys,
                                                               command):
    """An unrelated model.safetensors would be removed (it shadows flxflow_final): refused,
    the file named; an earlier export may be replaced; --force writes, keeping other files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's")
    (out / "notes.txt").write_text("the user's")
    assert cli.main(_write_command(command, run_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"error: {out} holds model.safetensors, notes.txt, which fluxflow-jax did not " \
           "write; choose a new or empty directory, or pass --force" in err
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "notes.txt"]
    assert (out / "model.safetensors").read_bytes() == b"the user's"

    assert cli.main(_write_command(command, run_dir, out) + ["--force"]) == 0
    assert (out / "notes.txt").read_text() == "the user's"
    (out / "notes.txt").unlink()
    assert cli.main(_write_command(command, run_dir, out)) == 0  # over its own files


@pytest.mark.parametrize("command", ["export", "import"])
def test_an_output_path_that_is_a_file_is_refused(run_dir, tmp_path, capsys, command):
    out = tmp_path / "weights.safetensors"
    out.write_bytes(b"the user's")
    assert cli.main(_write_command(command, run_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"error: {out} is a file; OUT_DIR must be a directory" in err
    assert out.read_bytes() == b"the user's"


def test_a_full_disk_leaves_the_earlier_export_intact(run_dir, tmp_path, capsys,
                                                      monkeypatch):
    out = tmp_path / "out"
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    before = digests(out)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    assert cli.main(["export", str(run_dir), str(out), "--ema"]) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'flxflow_final.safetensors'}: No space left on device; free " \
           "space or choose another output path" in err
    assert "Traceback" not in err
    assert digests(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "model_metadata.json"])
