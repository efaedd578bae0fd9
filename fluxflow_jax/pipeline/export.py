"""A training run's weights as a standalone checkpoint, in PyTorch fluxflow's file layout.

A run directory holds the latest exported weights (``flxflow_final.safetensors`` and its
text encoder and discriminator files), each finished step's weights
(``flxflow_step_<name>_final.safetensors`` ...) and the run checkpoints. ``run_models``
reads the newest run checkpoint, so a run killed mid-step still exports where it was, and
``ema`` takes the exponential moving averages of the components that have one (at a step
end too: steps export their averages as ``..._step_<name>_ema.safetensors``).

Writing a checkpoint replaces the layout files in its directory, so ``check_output_dir``
first makes sure the directory holds nothing an export did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from fluxflow_jax.interop import CheckpointError, load_fluxflow, save_fluxflow
from fluxflow_jax.interop.checkpoint import METADATA_FILE, step_file_names
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.checkpoints import RunCheckpoints, leaf_names


def _set_from(module: nnx.Module, values: dict[str, np.ndarray], what: str) -> None:
    """Every variable of ``module`` from ``values`` ({dotted path: array})."""
    state = nnx.state(module)
    paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = leaf_names(state)
    missing = [n for n in names if n not in values]
    if missing:
        raise CheckpointError(f"{what} lacks {missing[:3]} (another architecture?)")
    leaves = [np.asarray(values[n]).astype(leaf.dtype) for n, (_, leaf) in zip(names, paths,
                                                                              strict=True)]
    nnx.update(module, jax.tree_util.tree_unflatten(treedef, leaves))


def _latest_weights(run_dir: Path, models: FluxFlowModels, ema: bool,
                    echo: Callable[[str], None]) -> FluxFlowModels:
    """``models`` (the run's architecture) set to the newest intact run checkpoint's
    weights (``echo`` says which, when newer ones are damaged)."""
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir():
        if ema:
            raise CheckpointError(f"{run_dir} has no run checkpoints, so no averages to "
                                  "export; drop --ema")
        return models
    with RunCheckpoints(checkpoints, read_only=True) as manager:
        if manager.latest() is None:
            raise CheckpointError(f"{checkpoints} holds no complete checkpoint")
        step, arrays, damaged = manager.newest_intact(
            manager.restore_arrays, fix="export a finished step's weights with --step NAME")
        if damaged:
            echo(manager.fallback_line(step, damaged))
    averaged = arrays.get("ema", {})
    if ema and not averaged:
        raise CheckpointError(f"the latest checkpoint of {run_dir} keeps no averages (its "
                              "step sets ema_decay: null); drop --ema")
    for name, module in models.present().items():
        values = {**_named(arrays["buffers"][name]), **_named(arrays["params"][name])}
        if ema and name in averaged:  # the leaves the step trained; frozen ones as they are
            values.update(_named(averaged[name]))
        _set_from(module, values, f"the checkpoint's {name}")
    return models


def _named(tree: Any) -> dict[str, np.ndarray]:
    return dict(zip(leaf_names(tree), jax.tree.leaves(tree), strict=True))


def _step_weights(run_dir: Path, step: str, ema: bool) -> FluxFlowModels:
    """The weights ``step`` exported at its end (its averages where it kept them)."""
    files = step_file_names(step, ema=ema)
    found = [run_dir / f for f in files if (run_dir / f).is_file()]
    if not found:
        steps = sorted(p.name[len("flxflow_step_"):-len("_final.safetensors")]
                       for p in run_dir.glob("flxflow_step_*_final.safetensors"))
        kind = "averages" if ema else "weights"
        raise CheckpointError(f"{run_dir} has no {kind} of step '{step}' (finished steps: "
                              f"{steps or 'none'})")
    models = load_fluxflow(found[0])
    for path in found[1:]:
        for name, module in load_fluxflow(path).present().items():
            setattr(models, name, module)
    return models


def run_models(run_dir: str | os.PathLike, *, ema: bool = False, step: str | None = None,
               echo: Callable[[str], None] = print) -> FluxFlowModels:
    """The weights of a training run: its newest intact checkpoint's, or step ``step``'s
    final ones; with ``ema``, the averaged weights where there are some."""
    run_dir = Path(run_dir)
    if step is not None:
        return _step_weights(run_dir, step, ema)
    return _latest_weights(run_dir, load_fluxflow(run_dir), ema, echo)


def _written_by_us(directory: Path) -> set[str]:
    """The files of ``directory`` a fluxflow-jax export or import wrote: its metadata, when
    written by fluxflow-jax, and the files that lists with their current hashes."""
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
        ours = str(metadata["library_version"]).startswith("fluxflow-jax")
        recorded = dict(metadata["checksum"]["files"]) if ours else {}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {METADATA_FILE} | {
        name for name, digest in recorded.items() if (directory / name).is_file() and
        hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest}


def check_output_dir(out_dir: Path, *, force: bool = False) -> None:
    """Refuse an ``out_dir`` that is a file or, unless ``force``, holds files that an earlier
    export did not write (writing replaces or removes the checkpoint files there)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file; OUT_DIR must be a directory (new, empty "
                              "or holding an earlier export)")
    if force or not out_dir.is_dir():
        return
    ours = _written_by_us(out_dir)
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise CheckpointError(
            f"{out_dir} holds {', '.join(foreign[:3])}{more}, which fluxflow-jax did not "
            "write; choose a new or empty directory, or pass --force to write there anyway "
            "(replacing or removing its checkpoint files, keeping the others)")


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, ema: bool = False,
               step: str | None = None, force: bool = False,
               echo: Callable[[str], None] = print) -> Path:
    """Write a run's weights (``run_models``) to ``out_dir`` as a fluxflow checkpoint
    (``check_output_dir`` first); ``echo`` says so when PyTorch cannot rebuild them."""
    check_output_dir(Path(out_dir), force=force)
    models = run_models(run_dir, ema=ema, step=step, echo=echo)
    note = models.config.torch_note(tuple(models.present()))
    if note:
        echo(f"warning: {note}")
    info = {"exported_from": str(Path(run_dir).absolute()), "ema": ema,
            **({"step": step} if step else {})}
    return save_fluxflow(out_dir, models, training_info=info, warn_torch=False)
