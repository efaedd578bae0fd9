"""tools/flow_position_probe.py: its shift residual is zero exactly for a position-blind
function, large for one that reads positions, and it runs PyTorch fluxflow's own flow."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import flow_position_probe as probe  # noqa: E402


def test_a_function_of_neighbours_only_has_no_shift_residual():
    def blind(x, t):  # each token from itself and its two neighbours, the same everywhere
        return np.tanh(x) + t * (np.roll(x, 1, axis=1) - np.roll(x, -1, axis=1))

    residuals = probe.shift_residuals(blind, width=4)
    assert set(residuals) == {(t, k) for t in probe.TIMESTEPS for k in probe.SHIFTS}
    assert max(residuals.values()) < 1e-6


def test_a_function_that_reads_positions_has_a_large_residual():
    table = np.sin(np.arange(probe.GRID ** 2))[None, :, None].astype(np.float32)

    def placed(x, t):
        return x * table

    assert min(probe.shift_residuals(placed, width=4).values()) > 0.3


def test_pytorch_flow_at_initialisation_is_not_shift_equivariant():
    """Its global paths (context from the first tokens, the side branch) change every
    token's prediction when the input shifts: the probe sees them (docs/learning.md)."""
    residuals = probe.shift_residuals(probe.reference_flow(), width=16)
    assert min(residuals.values()) > 0.3
