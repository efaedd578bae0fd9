"""Short, named training experiments on the demo data, each scored on held-out samples.

    python tools/learning_runs.py vae_base            # train, then evaluate, then record
    python tools/learning_runs.py --list

An experiment is a pipeline config (the quickstart's tiny widths unless it says otherwise)
run with ``fluxflow-jax train``; afterwards every step's final weights are scored by
``fluxflow_jax.evaluation.evaluate`` on demo samples past the training range: PSNR/SSIM
after VAE steps; after flow steps the fixed-timestep v-loss (next to the untrained flow's)
and the caption-attribute accuracies. One JSON line per experiment goes to ``--record``
(docs/learning_runs.jsonl), the source of the tables in docs/learning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from fluxflow_jax.evaluation import evaluate, held_out
from fluxflow_jax.pipeline.config import read_config
from fluxflow_jax.pipeline.export import run_models
from fluxflow_jax.pipeline.setup import initial_models, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_MODEL = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["model"]
HELD_OUT = 32  # samples past the training range


# ------------------------------------------------------------------------------ experiments

def vae_step(batches: int, **keys: Any) -> dict[str, Any]:
    return {"name": "vae", "n_epochs": 1000, "max_steps": batches, "train_vae": True,
            "train_spade": True, **keys}


def flow_step(batches: int, **keys: Any) -> dict[str, Any]:
    return {"name": "flow", "n_epochs": 1000, "max_steps": batches, "train_diff": True,
            "freeze_vae": True, "cfg_dropout_prob": 0.1, **keys}


def config(steps: list[dict], *, lr: float | None = None,
           checkpoint: Path | None = None) -> dict[str, Any]:
    """256 demo samples at 32 px, batches of 4; the quickstart's widths, or ``checkpoint``'s
    model."""
    document = {
        "data": {"use_demo": True, "demo_samples": 256, "img_size": 32, "max_length": 32},
        "training": {"batch_size": 4, "devices": 1, "seed": 0,
                     "pipeline": {"defaults": {} if lr is None else {"lr": lr},
                                  "steps": steps}},
        "output": {"log_interval": 25, "checkpoint_save_interval": 100000,
                   "generate_diagrams": False, "no_samples": True}}
    if checkpoint:
        document["model_checkpoint"] = str(checkpoint)
    else:
        document["model"] = QUICKSTART_MODEL
    return document


# name -> config, given the directory that holds every experiment's run
EXPERIMENTS: dict[str, Callable[[Path], dict[str, Any]]] = {
    # the autoencoder: 400 batches at lr 5e-4
    "vae_base": lambda out: config([vae_step(400)], lr=5e-4),
    # a flow of the default settings on vae_base's autoencoder (run vae_base first)
    "flow_default": lambda out: config([flow_step(300)], checkpoint=out / "vae_base"),
    # the same with the reference's flow optimizer at the reference's learning rate
    "flow_reference": lambda out: config(
        [flow_step(300, optimizers={"flow": {
            "type": "Lion", "betas": [0.9, 0.95], "weight_decay": 0.01,
            "decoupled_weight_decay": True}})], lr=5e-7, checkpoint=out / "vae_base"),
}


# ------------------------------------------------------------------------------ metrics

def score(run_dir: Path, document: dict[str, Any]) -> dict[str, Any]:
    """``evaluate``'s held-out metrics of each step's final weights, prefixed by the step's
    name; with a flow step, also the untrained flow's fixed-timestep v-loss ("init/")."""
    run = read_config({**document, "output": {"output_path": str(run_dir)}})
    held = held_out(run.data, load_tokenizer(run.data), HELD_OUT)
    metrics: dict[str, Any] = {}
    for step in document["training"]["pipeline"]["steps"]:
        parts = (["autoencoder"] if step.get("train_vae") else []) + (
            ["flow", "text_to_image"] if step.get("train_diff") else [])
        values = evaluate(run_models(run_dir, step=step["name"]), held, parts=parts)
        metrics.update({f"{step['name']}/{k}": round(v, 4) for k, v in values.items()})
        if step.get("train_diff") and step is document["training"]["pipeline"]["steps"][0]:
            values = evaluate(initial_models(run), held, parts=["flow"])
            metrics.update({f"init/{k}": round(v, 4) for k, v in values.items()})
    return metrics


# ------------------------------------------------------------------------------ running

def last_records(run_dir: Path, document: dict[str, Any]) -> dict[str, Any]:
    """The last logged training metrics of each step (losses, gradient norms, weights)."""
    out = {}
    for step in document["training"]["pipeline"]["steps"]:
        path = run_dir / "graph" / f"training_metrics_{step['name']}.jsonl"
        if path.exists():
            last = json.loads(path.read_text().splitlines()[-1])
            out[step["name"]] = {"global_step": last["global_step"], **last["metrics"]}
    return out


def run(name: str, out_root: Path, record: Path) -> dict[str, Any]:
    document = EXPERIMENTS[name](out_root)
    run_dir = out_root / name
    document["output"]["output_path"] = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    command = ["fluxflow-jax", "train", "--config", str(path)]
    start = time.time()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.time() - start
    result = {"experiment": name, "command": f"python tools/learning_runs.py {name}",
              "wall_s": round(wall, 1), **score(run_dir, document),
              "last_logged": last_records(run_dir, document), "config": document}
    with record.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", help="names from --list")
    parser.add_argument("--list", action="store_true", help="print the experiment names")
    parser.add_argument("--out", type=Path, default=Path("/tmp/learning_runs"))
    parser.add_argument("--record", type=Path, default=ROOT / "docs" / "learning_runs.jsonl")
    args = parser.parse_args(argv)
    if args.list or not args.experiments:
        print("\n".join(EXPERIMENTS))
        return 0
    unknown = [n for n in args.experiments if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiments {unknown}; see --list")
    for name in args.experiments:
        run(name, args.out, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
