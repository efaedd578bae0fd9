"""The networks an evaluation runs, in eval mode, as (graph definitions, states).

Jitted metric functions take them as static graph definitions and state arguments, so the
weights are never baked into a compiled program: validation during training recompiles
nothing when the weights change.
"""

from __future__ import annotations

from flax import nnx

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.training.state import Networks


def eval_networks(models: FluxFlowModels, names: tuple[str, ...],
                  *extra: nnx.Module) -> tuple[tuple, tuple]:
    """(graph definitions, states) of ``models``' components ``names`` (in eval mode, the
    models unchanged), then of the ``extra`` modules (e.g. LPIPS)."""
    graphdefs = Networks.from_models(models).graphdefs
    missing = [name for name in names if getattr(models, name) is None]
    if missing:
        raise ValueError(f"the evaluation needs the {' and '.join(missing)}")
    pairs = [(graphdefs[name], nnx.state(getattr(models, name))) for name in names]
    pairs += [nnx.split(module) for module in extra]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
