"""Fixed tensors the networks derive from shapes: coordinates, position tables, the hw token.

All of them are built in numpy on the host so they are constants under ``jit`` and match the
PyTorch reference bit for bit (``jnp.linspace`` rounds differently from ``torch.linspace``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace`` on CPU, reproduced exactly.

    Torch rounds both ends to float32, fills the first half forwards from ``start`` and the
    second half backwards from ``end`` with a float32 step, each value rounded once from an
    exact multiply-add.
    """
    start, end = float(np.float32(start)), float(np.float32(end))
    if steps == 1:
        return np.array([start], dtype=np.float32)
    step = np.float32((end - start) / (steps - 1))
    k = np.arange(steps, dtype=np.float64)
    forward = np.float64(start) + np.float64(step) * k
    backward = np.float64(end) - np.float64(step) * (steps - 1 - k)
    return np.where(k < steps // 2, forward, backward).astype(np.float32)


def coordinate_channels(batch: int, height: int, width: int, dtype) -> jnp.ndarray:
    """[B, H, W, 2] channels (x across width, y across height), both in [-1, 1].

    Built in float32 like the reference, then cast to ``dtype``.
    """
    ys, xs = torch_linspace(-1, 1, height), torch_linspace(-1, 1, width)
    grid = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
    return jnp.broadcast_to(jnp.asarray(grid, dtype=dtype), (batch, height, width, 2))


def sincos_table_2d(height: int, width: int, dim: int, dtype) -> jnp.ndarray:
    """[H*W, D] fixed position table: rows in channels [0, D - D//2), columns in the rest."""
    np_dtype = np.dtype(dtype)

    def table_1d(length: int, channels: int) -> np.ndarray:
        pos = np.arange(length, dtype=np_dtype)[:, None]
        div = np.exp(np.arange(0, channels, 2, dtype=np_dtype)
                     * np_dtype.type(-math.log(10000.0) / channels))
        table = np.zeros((length, channels), dtype=np_dtype)
        table[:, 0::2] = np.sin(pos * div)
        table[:, 1::2] = np.cos(pos * div)
        return table

    cols = dim // 2
    rows = dim - cols
    row_table = np.broadcast_to(table_1d(height, rows)[:, None, :], (height, width, rows))
    col_table = np.broadcast_to(table_1d(width, cols)[None, :, :], (height, width, cols))
    return jnp.asarray(np.concatenate([row_table, col_table], -1).reshape(height * width, dim))


def hw_token(batch: int, height: int, width: int, dim: int, max_hw: int, dtype) -> jnp.ndarray:
    """[B, 1, D] token recording the latent grid: [0] = h/max_hw, [1] = w/max_hw, rest 0."""
    token = np.zeros((1, 1, dim), dtype=np.float64)
    token[0, 0, 0] = height / float(max_hw)
    token[0, 0, 1] = width / float(max_hw)
    return jnp.broadcast_to(jnp.asarray(token, dtype=dtype), (batch, 1, dim))


def resolve_grid(packed, hw, max_hw: int) -> tuple[int, int]:
    """The latent grid: ``hw`` when given (it must be two Python ints, since it decides
    array shapes), else read from the packed hw token on the host."""
    if hw is None:
        return latent_grid(packed, max_hw)
    if not (isinstance(hw, (tuple, list)) and len(hw) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in hw)):
        raise ValueError(f"hw must be two positive Python ints (h, w), got {hw!r}; under "
                         "jax.jit pass it as a static argument (static_argnames)")
    return int(hw[0]), int(hw[1])


def latent_grid(packed, max_hw: int) -> tuple[int, int]:
    """(h, w) of the latent grid, read on the host from the hw token of a packed batch.

    The grid decides array shapes, so it has to be a Python int: inside ``jit`` pass it
    explicitly (``hw=(h, w)``) instead.
    """
    try:
        token = np.asarray(packed[:, -1, :2], dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as err:
        raise ValueError(
            "the latent grid (h, w) is read from the hw token and must be concrete; inside "
            "jax.jit pass hw=(h, w) explicitly") from err
    grid = np.maximum(np.round(token * max_hw), 1).astype(np.int64)
    if not (grid == grid[0]).all():
        raise ValueError(
            f"batch mixes latent grids {sorted({tuple(g) for g in grid.tolist()})}; "
            "batch samples of one size together (size bucketing)")
    return int(grid[0, 0]), int(grid[0, 1])
