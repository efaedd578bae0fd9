"""Text-to-image sampling: noise tokens -> flow ODE solve -> expander.

One jitted program does the whole job (text encoding, the solver loop with classifier-free
guidance, decoding). The networks enter it functionally, as graph definitions (static) and
states (arguments), so weights are never baked into the compiled program and a retrained
model of the same architecture reuses it; it compiles once per batch size, image size, step
count, sampler and guidance mode, ahead of time, so that a caller can check the program's
memory before it first runs (a size too large for the device would otherwise fail deep in
XLA's allocator).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fluxflow_jax.models import flow_noise
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.models.geometry import hw_token
from fluxflow_jax.sampling import dpm_solver
from fluxflow_jax.training.diffusion import model_time
from fluxflow_jax.training.performance import MemoryUse, memory_use
from fluxflow_jax.training.state import Networks

SAMPLERS = {"dpm++": 2, "euler": 1}  # name -> solver order
NULLS = ("zero", "empty")
_NETWORKS = ("text_encoder", "flow_processor", "expander")
_EXECUTABLES: dict[tuple, jax.stages.Compiled] = {}  # see _executable


def needed_networks(config: FluxFlowConfig) -> tuple[str, ...]:
    """The components generation runs: the compressor too where the flow starts from its
    tokens of noise images."""
    encodes = config.flow_noise == flow_noise.ENCODED_NOISE_IMAGE
    return ("compressor", *_NETWORKS) if encodes else _NETWORKS


def latent_grid(config: FluxFlowConfig, height: int, width: int) -> tuple[int, int]:
    """The latent grid (h, w) of an image size; each side must be a multiple of
    2^downscales (what the compressor's ``latent_shape`` maps exactly)."""
    factor = 2**config.downscales
    if height < factor or width < factor or height % factor or width % factor:
        raise ValueError(f"height and width must be positive multiples of {factor} "
                         f"(2^downscales), got {height}x{width}")
    return height // factor, width // factor


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """[-1, 1] images -> uint8: round(clip((x + 1) / 2, 0, 1) * 255), ties to even.

    So -1 -> 0, 1 -> 255 and 0 (127.5) -> 128.
    """
    unit = np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1)
    return np.rint(unit * 255).astype(np.uint8)


@partial(jax.jit, static_argnames=("graphdefs", "grid", "num_steps", "spacing", "order",
                                   "guided", "use_context"))
def _generate(graphdefs, states, input_ids, attention_mask, null_ids, null_mask, guidance,
              noise, *, grid, num_steps, spacing, order, guided, use_context):
    text_encoder, flow, expander = (nnx.merge(g, s) for g, s in zip(graphdefs, states, strict=True))
    cond = text_encoder(input_ids, attention_mask)
    batch, (h, w) = cond.shape[0], grid
    dim = expander.config.latent_width
    hw = hw_token(batch, h, w, dim, expander.config.max_hw, jnp.float32)

    if guided:
        null = (jnp.zeros_like(cond) if null_ids is None
                else jnp.broadcast_to(text_encoder(null_ids, null_mask), cond.shape))
        text = jnp.concatenate([null, cond])
    else:
        text = cond
    copies = text.shape[0] // batch

    def velocity(x, t):
        packed = jnp.tile(jnp.concatenate([x, hw], axis=1), (copies, 1, 1))
        times = jnp.broadcast_to(model_time(t), (copies * batch,))
        v = flow(packed, text, times, hw=grid)[:, :-1]
        if not guided:
            return v
        v_null, v_cond = jnp.split(v, 2)
        return v_null + guidance * (v_cond - v_null)

    x0 = dpm_solver.sample(velocity, noise.astype(cond.dtype), num_steps, spacing, order)
    images = expander(jnp.concatenate([x0, hw], axis=1), use_context, hw=grid)
    return jnp.clip(images, -1, 1)


@partial(jax.jit, static_argnames=("graphdef",))
def _encoded_noise(graphdef, state, draws):
    return flow_noise.tokens(draws, nnx.merge(graphdef, state))


def starting_noise(models: FluxFlowModels, draws: flow_noise.Draws) -> jax.Array:
    """The flow's starting tokens from ``flow_noise.draw``'s arrays (for
    ``encoded_noise_image``, through the models' compressor)."""
    if "noise" in draws:
        return draws["noise"]
    if models.compressor is None:
        raise ValueError("encoded noise images need the compressor; the models lack it")
    return _encoded_noise(*nnx.split(models.compressor), dict(draws))


def _executable(graphdefs: tuple, dynamic: tuple, statics: dict[str, Any],
                check: Callable[[MemoryUse | None], None] | None) -> jax.stages.Compiled:
    """The sampler compiled for these networks, options and argument shapes, once; ``check``
    sees its memory use before it is kept (and may raise to refuse it)."""
    key = (graphdefs, tuple(sorted(statics.items())), jax.tree.structure(dynamic),
           tuple((x.shape, x.dtype) for x in jax.tree.leaves(dynamic)))
    if key not in _EXECUTABLES:
        executable = _generate.lower(graphdefs, *dynamic, **statics).compile()
        if check is not None:
            check(memory_use(executable))
        _EXECUTABLES[key] = executable
    return _EXECUTABLES[key]


def generate(models: FluxFlowModels, input_ids: jax.Array, attention_mask: jax.Array, *,
             height: int, width: int, key: jax.Array | None = None,
             noise: jax.Array | None = None, num_steps: int = 50,
             guidance: float = 1.0, null: str = "zero", empty_ids: jax.Array | None = None,
             empty_mask: jax.Array | None = None, spacing: str = "trailing",
             sampler: str = "dpm++", use_context: bool = True,
             memory_check: Callable[[MemoryUse | None], None] | None = None) -> jax.Array:
    """Images [B, h * 2^upscales, w * 2^upscales, 3] in [-1, 1] for token batches [B, L].

    The image tokens start as the noise the flow trained against (``flow_noise``: Gaussian
    tokens, or the compressor's tokens of a noise image), with the hw token of the requested
    size kept fixed. Each step feeds the flow t / 999 and, when ``guidance`` != 1, mixes
    v = v_null + guidance * (v_cond - v_null); the null embedding is the zero vector (what
    training's CFG dropout substitutes) or, for ``null="empty"``, the text encoder applied to
    ``empty_ids`` / ``empty_mask`` (an empty prompt, [1, L'] or [B, L']). The starting noise
    [B, h * w, latent_width] is drawn from ``key`` or given as ``noise`` (to reproduce a run
    elsewhere). Networks run in eval mode; ``models`` is not changed. ``memory_check`` sees
    the compiled program's memory use before its first run (and may raise to refuse it).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if null not in NULLS:
        raise ValueError(f"null must be one of {NULLS}, got {null!r}")
    if (null == "empty") != (empty_ids is not None):
        raise ValueError('pass empty_ids (the tokenised empty prompt) exactly when null="empty"')
    missing = [name for name in needed_networks(models.config)
               if getattr(models, name) is None]
    if missing:
        raise ValueError(f"generation needs the {', '.join(missing)}; the models lack it")
    if empty_ids is not None and empty_mask is None:
        empty_mask = jnp.ones(jnp.shape(empty_ids), bool)
    grid = latent_grid(models.config, height, width)
    shape = (len(input_ids), grid[0] * grid[1], models.config.latent_width)
    if (key is None) == (noise is None):
        raise ValueError("pass exactly one of key= (a PRNG key) or noise= (an array "
                         f"shaped {shape})")
    if noise is None:
        noise = starting_noise(models, flow_noise.draw(models.config, key, len(input_ids), grid))
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape}")
    networks = Networks.from_models(models)
    graphdefs = tuple(networks.graphdefs[name] for name in _NETWORKS)
    states = tuple(nnx.state(getattr(models, name)) for name in _NETWORKS)
    dynamic = (states, input_ids, attention_mask, empty_ids, empty_mask,
               jnp.float32(guidance), jnp.asarray(noise))
    statics = {"grid": grid, "num_steps": num_steps, "spacing": spacing,
               "order": SAMPLERS[sampler], "guided": float(guidance) != 1,
               "use_context": use_context}
    return _executable(graphdefs, dynamic, statics, memory_check)(*dynamic)
