"""Controlled train-step probes: one stage, several settings, the same batches for each.

    python tools/learning_probe.py vae  '{"name": {"opt": {...}, "clip": 1.0}}' STEPS
    python tools/learning_probe.py flow '{"name": {"opt": {...}, "flow": {...}}}' STEPS VAE_RUN

Unlike ``learning_runs.py`` (whole pipelines, configurable settings only), a probe drives
``TrainStep`` directly on the quickstart's tiny widths at 32 px (training samples 0-255,
held-out 512-543 of the demo data, seed 42), so it can also start from other initial values
of the Bezier control points ("rgb": the expander's output activation, "lv": the
compressor's log-variance activation; four numbers each). It prints each setting's
held-out metrics (``fluxflow_jax.evaluation.evaluate``) and a few logged training values.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from fluxflow_jax.data.demo import DemoSource
from fluxflow_jax.data.images import to_array
from fluxflow_jax.evaluation import evaluate, held_out
from fluxflow_jax.interop import load_fluxflow
from fluxflow_jax.models import FluxFlowConfig
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import DataConfig
from fluxflow_jax.pipeline.setup import load_tokenizer
from fluxflow_jax.training import FlowOptions, StageConfig, VAEOptions
from fluxflow_jax.training.state import write_to_models
from fluxflow_jax.training.train_step import TrainStep

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from learning_runs import QUICKSTART_MODEL  # noqa: E402

DATA = DataConfig(use_demo=True, demo_samples=512, img_size=32, max_length=32, seed=42)
TRAIN = 256
CONSTANT = {"type": "ConstantLR", "factor": 1.0}


def training_batches() -> dict[str, np.ndarray]:
    source = DemoSource(length=TRAIN, image_size=DATA.img_size, seed=DATA.seed)
    samples = [source[i] for i in range(TRAIN)]
    ids, mask = load_tokenizer(DATA).encode([s.caption for s in samples], DATA.max_length)
    return {"images": np.stack([to_array(Image.fromarray(s.image)) for s in samples]),
            "input_ids": ids, "attention_mask": mask}


def set_control_points(models: FluxFlowModels, setting: dict[str, Any]) -> None:
    for key, activation in (("rgb", models.expander.rgb_activation),
                            ("lv", models.compressor.logvar_activation)):
        for name, value in zip(("p0", "p1", "p2", "p3"), setting.get(key, ())):
            point = getattr(activation, name)
            point[...] = jnp.full_like(point[...], value)


def stage(kind: str, setting: dict[str, Any], steps: int) -> StageConfig:
    clip = setting.get("clip", 1.0)
    if kind == "vae":
        return StageConfig(vae=VAEOptions(use_gan=False, use_lpips=False,
                                          **setting.get("vae", {})),
                           optimizers={"vae": setting["opt"]}, schedulers={"vae": CONSTANT},
                           total_steps=steps, gradient_clip_norm=clip)
    text = setting.get("text", {"type": "AdamW", "lr": setting["opt"]["lr"] / 10,
                                "betas": [0.9, 0.99], "weight_decay": 0.01})
    return StageConfig(flow=FlowOptions(cfg_dropout_prob=0.1, **setting.get("flow", {})),
                       frozen=frozenset({"compressor", "expander"}),
                       optimizers={"flow": setting["opt"], "text_encoder": text},
                       schedulers={"flow": CONSTANT, "text_encoder": CONSTANT},
                       total_steps=steps, gradient_clip_norm=clip)


def initial(kind: str, vae_run: str | None) -> FluxFlowModels:
    if kind == "vae":
        return FluxFlowModels.create(FluxFlowConfig(**QUICKSTART_MODEL), nnx.Rngs(0))
    models = load_fluxflow(vae_run)
    fresh = FluxFlowModels.create(models.config, nnx.Rngs(0))
    models.flow_processor, models.text_encoder = fresh.flow_processor, fresh.text_encoder
    return models


def probe(kind: str, settings: dict[str, dict[str, Any]], steps: int,
          vae_run: str | None = None) -> None:
    data, held = training_batches(), held_out(DATA, load_tokenizer(DATA), 32)
    parts = ["autoencoder"] if kind == "vae" else ["flow", "text_to_image"]
    logged = ("loss_mse", "grad_norm_vae") if kind == "vae" else (
        "diff_loss", "pred_std", "grad_norm_flow")
    for index, (name, setting) in enumerate(settings.items()):
        models = initial(kind, vae_run)
        set_control_points(models, setting)
        if index == 0:
            print("init", json.dumps(evaluate(models.eval(), held, parts=parts[:1])))
        models.train()
        step = TrainStep(models, stage(kind, setting, steps))
        state, order, log = step.init_state(models), np.random.default_rng(0), []
        start = time.time()
        for k in range(steps):
            take = order.choice(TRAIN, setting.get("batch", 4), replace=False)
            batch = {key: jnp.asarray(value[take]) for key, value in data.items()}
            state, metrics = step(state, batch, jax.random.key(k))
            if k % 100 == 0 or k == steps - 1:
                log.append([k, *(round(float(metrics[m]), 4) for m in logged)])
        wall = time.time() - start
        write_to_models(state, models)
        scores = evaluate(models.eval(), held, parts=parts)
        print(name, json.dumps({"wall_s": round(wall), **{k: round(v, 4) for k, v in
                                                         scores.items()},
                                "log": [["step", *logged], *log]}), flush=True)


if __name__ == "__main__":
    probe(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
