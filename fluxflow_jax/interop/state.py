"""Moving tensors between an NNX module and a PyTorch-layout state dict, strictly."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fluxflow_jax.interop.keymap import Path, Table


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: every offending key is named."""


def _variable_at(module: nnx.Module, path: Path) -> nnx.Variable:
    node = module
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    if not isinstance(node, nnx.Variable):
        raise TypeError(f"{'.'.join(map(str, path))} is not a variable")
    return node


def variable_paths(module: nnx.Module) -> set[Path]:
    """Paths of every variable (parameters, buffers, spectral-norm state) in a module."""
    return {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(module))}


def check_coverage(module: nnx.Module, table: Table) -> None:
    """The table must name each variable of the module exactly once."""
    named = [entry.path for entry in table]
    duplicates = {p for p in named if named.count(p) > 1}
    actual = variable_paths(module)
    missing, extra = actual - set(named), set(named) - actual
    if duplicates or missing or extra:
        fmt = lambda paths: sorted(".".join(map(str, p)) for p in paths)
        raise AssertionError(f"key table of {type(module).__name__} is out of date: "
                             f"unmapped {fmt(missing)}, unknown {fmt(extra)}, "
                             f"repeated {fmt(duplicates)}")


def export_tensors(module: nnx.Module, table: Table, prefix: str = "") -> dict[str, np.ndarray]:
    """PyTorch-layout float32 contiguous tensors of a module, keyed ``prefix + torch key``."""
    tensors = {}
    for entry in table:
        value = np.asarray(_variable_at(module, entry.path)[...], dtype=np.float32)
        tensors[prefix + entry.torch_key] = np.ascontiguousarray(
            entry.layout.to_torch(value, entry.torch_shape))
    return tensors


def import_tensors(module: nnx.Module, table: Table, tensors: Mapping[str, np.ndarray], *,
                   source: str, dtype=None) -> None:
    """Fill every variable of ``module`` from PyTorch-layout ``tensors`` (keys without prefix).

    Strict: a missing, unexpected or mis-shaped key raises ``CheckpointError`` naming each
    one. Nothing is modified unless everything matches.
    """
    expected = {entry.torch_key for entry in table}
    problems = [f"missing key '{k}'" for k in sorted(expected - set(tensors))]
    problems += [f"unexpected key '{k}'" for k in sorted(set(tensors) - expected)]
    converted = {}
    for entry in table:
        if entry.torch_key not in tensors:
            continue
        variable = _variable_at(module, entry.path)
        array = np.asarray(tensors[entry.torch_key])
        want = tuple(variable.shape)
        torch_shape = entry.layout.to_torch(np.empty(want, np.uint8), entry.torch_shape).shape
        if array.shape != torch_shape:
            problems.append(f"key '{entry.torch_key}' has shape {list(array.shape)}, "
                            f"expected {list(torch_shape)}")
            continue
        converted[entry.path] = entry.layout.to_jax(array, entry.torch_shape)
    if problems:
        raise CheckpointError(f"{source} does not match the {type(module).__name__} "
                              f"architecture:\n  " + "\n  ".join(problems))
    for path, array in converted.items():
        variable = _variable_at(module, path)
        # jnp.array copies: on CPU jnp.asarray may alias the caller's (mutable) buffer.
        variable.set_value(jnp.array(array, dtype=dtype or variable.dtype, copy=True))
