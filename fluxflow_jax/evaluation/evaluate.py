"""Every held-out metric of a model, as one flat ``{name: value}`` mapping.

Three parts, each run when the model has the networks it needs:

- ``autoencoder``: PSNR, SSIM and LPIPS of reconstructions (``autoencoder``);
- ``flow``: the v-prediction loss at fixed timesteps with fixed noise (``flow_loss``);
- ``text_to_image``: images generated from the held-out captions, scored against what the
  captions say, each attribute's accuracy with its chance level (``demo_scorer``).

Batches are dispatched without waiting; the results come back in one transfer at the end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax.evaluation import autoencoder, demo_scorer, flow_loss, text_to_image
from fluxflow_jax.evaluation.held_out import HeldOut
from fluxflow_jax.evaluation.networks import eval_networks
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.sampling import needed_networks, to_uint8
from fluxflow_jax.training.lpips import LPIPS

PARTS = ("autoencoder", "flow", "text_to_image")
BATCH_SIZE = 8


def part_networks(part: str, config: FluxFlowConfig) -> tuple[str, ...]:
    """The networks a part runs (generation's depend on where its flow starts)."""
    if part == "text_to_image":
        return needed_networks(config)
    return {"autoencoder": ("compressor", "expander"),
            "flow": ("compressor", "text_encoder", "flow_processor")}[part]


def available_parts(models: FluxFlowModels) -> tuple[str, ...]:
    """The parts whose networks ``models`` holds."""
    present = models.present()
    return tuple(part for part in PARTS
                 if all(n in present for n in part_networks(part, models.config)))


def metric_names(parts: Sequence[str], with_lpips: bool) -> tuple[str, ...]:
    """The names ``evaluate`` reports for ``parts``."""
    names: list[str] = []
    if "autoencoder" in parts:
        names += autoencoder.metric_names(with_lpips)
    if "flow" in parts:
        names += flow_loss.metric_names()
    if "text_to_image" in parts:
        names += [f"{a}_{kind}" for a in demo_scorer.ATTRIBUTES for kind in ("accuracy",
                                                                            "chance")]
    return tuple(names)


def _batches(held: HeldOut, batch_size: int) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    """(real samples in it, arrays) per batch; the last is padded with its last sample so
    every batch has one shape (one compiled program)."""
    for start in range(0, len(held), batch_size):
        take = np.minimum(np.arange(start, start + batch_size), len(held) - 1)
        yield min(batch_size, len(held) - start), {
            "images": jnp.asarray(held.images[take]),
            "input_ids": jnp.asarray(held.input_ids[take]),
            "attention_mask": jnp.asarray(held.attention_mask[take]),
            "indices": jnp.asarray(take, jnp.int32)}


def _concatenate(results: list[tuple[int, dict[str, jax.Array]]]) -> dict[str, np.ndarray]:
    """Per-batch device results -> per-sample host arrays, without the padding."""
    fetched = jax.device_get([values for _, values in results])
    return {name: np.concatenate([values[name][:count] for (count, _), values
                                  in zip(results, fetched, strict=True)])
            for name in fetched[0]}


def evaluate(models: FluxFlowModels, held: HeldOut, *, parts: Sequence[str] | None = None,
             lpips: LPIPS | None = None, batch_size: int = BATCH_SIZE,
             steps: int = text_to_image.SOLVER_STEPS) -> dict[str, float]:
    """``parts`` (default: every part ``models`` can run) on the held-out samples: the
    mean over them of each per-sample metric; LPIPS only when ``lpips`` is given."""
    parts = available_parts(models) if parts is None else tuple(parts)
    height, width = held.images.shape[1:3]
    hw = models.compressor.latent_shape(height, width) if models.compressor is not None \
        else None
    batch_size = min(batch_size, len(held))
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    graphs = {part: eval_networks(models, part_networks(part, models.config), *(
        [lpips] if part == "autoencoder" and lpips is not None else []))
        for part in parts if part != "text_to_image"}
    for count, batch in _batches(held, batch_size):
        values: dict[str, jax.Array] = {}
        if "autoencoder" in parts:
            values |= autoencoder.reconstruction_metrics(
                *graphs["autoencoder"], batch["images"], batch["indices"], hw=hw)
        if "flow" in parts:
            values["flow_v_loss"] = flow_loss.v_losses(
                *graphs["flow"], batch["images"], batch["input_ids"],
                batch["attention_mask"], batch["indices"], hw=hw)
        if "text_to_image" in parts:
            values["generated"] = text_to_image.generated(
                models, batch["input_ids"], batch["attention_mask"], batch["indices"],
                height=height, width=width, steps=steps)
        pending.append((count, values))
    per_sample = _concatenate(pending)
    out = {name: float(np.mean(values)) for name, values in per_sample.items()
           if name not in ("flow_v_loss", "generated")}
    if "flow" in parts:
        losses = per_sample["flow_v_loss"]
        out["flow_v_loss"] = float(losses.mean())
        out |= {name: float(value) for name, value in zip(flow_loss.metric_names()[1:],
                                                          losses.mean(axis=0), strict=True)}
    if "text_to_image" in parts:
        images = to_uint8(per_sample["generated"])
        accuracy = demo_scorer.accuracy(list(images), held.scenes)
        chance = demo_scorer.chance(held.scenes)
        for name in demo_scorer.ATTRIBUTES:
            out[f"{name}_accuracy"], out[f"{name}_chance"] = accuracy[name], chance[name]
    return {name: out[name] for name in metric_names(parts, lpips is not None)}
