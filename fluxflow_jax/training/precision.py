"""Mixed precision: bfloat16 arithmetic on float32 weights.

With ``precision: bf16`` a train step keeps every stored array in float32 (parameters,
optimizer moments, EMA, spectral-norm vectors) and casts the parameters to bfloat16 where a
network is bound inside the step, so convolutions, matmuls and activations run in bfloat16
and the gradients flow back through the cast into float32. Losses, KL statistics and the
flow target are computed in float32 from outputs cast back up; normalisation statistics
are float32 in flax's norms; softmax runs in float32. The last layers of the decoder and of
the flow processor keep float32 weights, so the images and velocities the losses compare are
not rounded to bfloat16's 8 bits. bfloat16 has float32's exponent range, so no loss scaling
is needed (unlike float16).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PRECISIONS = {"fp32": None, "bf16": jnp.bfloat16}

# Output layers kept in float32 under bf16: component -> top-level attribute names.
FLOAT32_LAYERS = {"expander": ("rgb_conv3", "rgb_activation"),
                  "flow_processor": ("dmodel_to_vae",)}


def compute_dtype(precision: str) -> Any:
    """The arithmetic dtype of ``precision`` (None: the parameters' own dtype)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def cast_parameters(component: str, params: Any, dtype: Any) -> Any:
    """``params`` of ``component`` with float32 leaves in ``dtype``, except its float32
    output layers (and everything when ``dtype`` is None)."""
    if dtype is None:
        return params
    kept = FLOAT32_LAYERS.get(component, ())

    def cast(path: tuple, leaf: jax.Array) -> jax.Array:
        top = getattr(path[0], "key", None) if path else None
        if top in kept or leaf.dtype != jnp.float32:
            return leaf
        return leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)
