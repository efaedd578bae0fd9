"""Damaged run checkpoints (truncated, emptied or partly deleted files): resuming and
exporting use the newest intact one and say so in one line; with none intact, one message
naming the directory and the fix, exit status 2. A checkpoint the disk has no room for stops
the run the same way, the earlier ones intact."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from fluxflow_jax import cli
from fluxflow_jax.pipeline.config import load_config
from fluxflow_jax.pipeline.run import Run
from pipeline_helpers import VAE_THEN_FLOW, assert_same_losses, write_config

OUTPUT = {"checkpoint_save_interval": 1}  # checkpoints 4, 5 and 6 kept


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated arrays": lambda checkpoint: [
        _truncate(p) for p in (checkpoint / "state" / "ocdbt.process_0" / "d").iterdir()],
    "emptied record": lambda checkpoint: (checkpoint / "record" / "metadata").write_bytes(b""),
    "deleted state metadata": lambda checkpoint: (checkpoint / "state" / "_METADATA").unlink(),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished VAE_THEN_FLOW run with a checkpoint after every batch."""
    tmp = tmp_path_factory.mktemp("finished")
    Run(load_config(write_config(tmp, VAE_THEN_FLOW, output=OUTPUT)),
        echo=lambda line: None).run()
    return tmp / "run"


def _copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config, output) of a copy of the finished run."""
    shutil.copytree(finished, tmp_path / "run")
    return write_config(tmp_path, VAE_THEN_FLOW, output=OUTPUT), tmp_path / "run"


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_to_the_newest_intact_checkpoint(finished, tmp_path, capsys,
                                                           damage):
    """Checkpoint 6 damaged: the run resumes from 5, retrains batch 6 as it was trained,
    and sets the damaged one aside; orbax's temporary directories are removed, nothing
    else."""
    config, output = _copy(finished, tmp_path)
    checkpoints = output / "checkpoints"
    DAMAGE[damage](checkpoints / "6")
    (checkpoints / "7.orbax-checkpoint-tmp-1700000000").mkdir()  # a save killed midway
    (checkpoints / "notes.txt").write_text("the user's")

    assert cli.main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint 6 is damaged (" in out
    assert f"using checkpoint 5 of {checkpoints}" in out
    assert "Resuming from checkpoint 5" in out
    assert_same_losses(output, finished)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4", "5", "6", "6.damaged",
                                                             "notes.txt"]


def test_export_falls_back_and_says_which_checkpoint(finished, tmp_path, capsys):
    _, output = _copy(finished, tmp_path)
    DAMAGE["truncated arrays"](output / "checkpoints" / "6")
    assert cli.main(["export", str(output), str(tmp_path / "out")]) == 0
    assert f"using checkpoint 5 of {output / 'checkpoints'}" in capsys.readouterr().out
    assert (tmp_path / "out" / "flxflow_final.safetensors").is_file()


@pytest.mark.parametrize("command, fix", [("train", "pass --no_resume"),
                                          ("export", "with --step NAME")])
def test_no_intact_checkpoint_names_the_directory_and_the_fix(finished, tmp_path, capsys,
                                                              command, fix):
    config, output = _copy(finished, tmp_path)
    for step in ("4", "5", "6"):
        DAMAGE["emptied record" if command == "train" else "truncated arrays"](
            output / "checkpoints" / step)
    argv = (["train", "--config", str(config)] if command == "train"
            else ["export", str(output), str(tmp_path / "out")])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: no intact checkpoint in {output / 'checkpoints'} (checkpoint 6 is " \
           "damaged (" in err
    assert fix in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_stops_training_with_the_earlier_checkpoints_intact(finished, tmp_path,
                                                                       capsys, monkeypatch):
    """Orbax fails checkpoint 2 the way TensorStore reports a full disk: one message, exit 2,
    checkpoint 1 intact; with space again, the run resumes and trains as the finished one."""
    config = write_config(tmp_path, VAE_THEN_FLOW, output=OUTPUT)
    save = ocp.CheckpointManager.save

    def disk_full_from_2(manager, step, *args, **kwargs):
        if step >= 2:
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database: '
                             'No space left on device')
        return save(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_from_2)
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert f"error: could not write a checkpoint in {checkpoints} (RESOURCE_EXHAUSTED: " \
           "Error writing" in err
    assert "the checkpoints before it are intact: free space" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1"]

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert cli.main(["train", "--config", str(config)]) == 0
    assert "Resuming from checkpoint 1" in capsys.readouterr().out
    assert_same_losses(tmp_path / "run", finished)
