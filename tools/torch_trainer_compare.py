"""The PyTorch trainer (``fluxflow-training`` 0.8.1) and fluxflow-jax on the same demo data,
steps and widths, scored by the same held-out evaluation.

    python tools/torch_trainer_compare.py [--config configs/quickstart.yaml] [--out DIR]
        [--deps DIR] [--epochs STEP=N ...] [--time-limit SECONDS] [--reuse]
        [--model-from CHECKPOINT]

1. Writes the config's demo training samples as the trainer's local-folder dataset: PNG
   files and a tab-separated ``captions.txt`` (file name, caption), plus a tokenizer
   directory holding our bert-base-uncased vocab, which ``AutoTokenizer`` reads offline.
2. Writes the trainer's pipeline YAML for the same pipeline (``trainer_config``) and runs
   ``fluxflow_training.scripts.train`` on CPU in a subprocess under a time limit; its loss
   curves are its ``graph/training_metrics_<step>.jsonl``.
3. Runs ``fluxflow-jax train`` on the same pipeline at the same time (at the architecture
   of ``--model-from``'s checkpoint when given, e.g. the one the trainer built), imports
   the trainer's output with ``load_fluxflow`` and scores both with ``evaluate`` on the
   same held-out demo samples; appends one JSON line to ``--record`` and prints a
   markdown table.

Both sides run without LPIPS (the trainer's LPIPS needs torchvision's VGG16 weights from
the network), and steps end after their epochs (``transition_on`` dropped); ``--epochs``
shortens steps on both sides to fit a time budget. The trainer's dependencies missing
beside the CPU torch (``accelerate``, ``torchvision``, ``lpips``) can be installed with
``pip install --no-deps --target DIR`` and passed as ``--deps DIR``. PyPI's torchvision is
a CUDA build whose compiled operators cannot load against the CPU torch; the trainer uses
only its Python transforms and ``save_image``, so the launcher skips the registration of
those operators (``LAUNCHER``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from flax import nnx
from PIL import Image

from fluxflow_jax.data import DemoSource
from fluxflow_jax.data.tokenizer import fetch_vocab
from fluxflow_jax.evaluation import evaluate, held_out
from fluxflow_jax.interop import load_fluxflow
from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import DataConfig, read_config
from fluxflow_jax.pipeline.export import run_models
from fluxflow_jax.pipeline.setup import load_tokenizer
from fluxflow_jax.training.schedules import default_scheduler_config

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 32  # samples past the training range
CAPTIONS_FILE = "captions.txt"

# Step keys the trainer's pipeline schema shares with ours, with the same meaning.
SHARED_STEP_KEYS = ("name", "description", "n_epochs", "max_steps", "train_vae",
                    "train_spade", "gan_training", "use_lpips", "lambda_adv", "lambda_lpips",
                    "r1_interval", "r1_gamma", "train_diff", "cfg_dropout_prob", "kl_beta",
                    "kl_warmup_steps", "kl_free_bits", "lr", "initial_clipping_norm",
                    "adaptive_weights", "use_ema")
VAE_COMPONENTS = ["compressor", "expander"]

# Runs the installed trainer's entry point, with two changes to its environment and none
# to its training:
# - torchvision's operator registrations are replaced by empty modules: PyPI's torchvision
#   is a CUDA build whose compiled operators cannot load against the CPU torch, and
#   registering them then fails at import (the trainer uses none of those operators);
# - the trainer turns every UserWarning into an error, and its data loader asks for pinned
#   memory, which torch warns about where there is no accelerator: that one warning is
#   ignored, or the first batch on a CPU raises.
LAUNCHER = """
import sys, types, warnings
for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules[name] = types.ModuleType(name)
import fluxflow_training.scripts.train as train
warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no "
                        "accelerator is found", category=UserWarning)
sys.argv = ["train"] + sys.argv[1:]
train.main()
"""


# ------------------------------------------------------------------------------ data

def write_image_folder(data: DataConfig, out: Path) -> tuple[Path, Path]:
    """The demo training samples ``data`` names as PNG files in ``out/images`` and the
    trainer's captions file (``name<TAB>caption`` per line); returns both paths."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    source = DemoSource(length=data.demo_samples, image_size=data.img_size, seed=data.seed)
    lines = []
    for index in range(len(source)):
        sample = source[index]
        name = f"{index:06d}.png"
        Image.fromarray(sample.image).save(images / name)
        lines.append(f"{name}\t{sample.caption}\n")
    captions = out / CAPTIONS_FILE
    captions.write_text("".join(lines))
    return images, captions


def write_tokenizer_dir(out: Path) -> Path:
    """A directory ``AutoTokenizer.from_pretrained`` reads without network: our
    bert-base-uncased vocab (the ids distilbert-base-uncased gives) and a config naming
    the DistilBERT tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text(fetch_vocab().read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "DistilBertTokenizer", "do_lower_case": True}))
    return out


# ------------------------------------------------------------------------------ config

def trainer_step(step: dict[str, Any]) -> dict[str, Any]:
    """One of our pipeline steps in the trainer's schema: the shared keys as they are,
    ``optimizers`` under ``optimization``, ``freeze_vae`` as its component list; a step
    ends after its epochs (the trainer's ``transition_on`` has no ``min_epochs``). Every
    model the step trains gets a scheduler, ours by default (the trainer's VAE step calls
    its scheduler unconditionally, so it cannot run without one)."""
    out = {key: step[key] for key in SHARED_STEP_KEYS if key in step}
    inline = step.get("optimization", {})
    optimizers = step.get("optimizers") or inline.get("optimizers")
    trained = ((["vae"] if step.get("train_vae") else [])
               + (["discriminator"] if step.get("gan_training") else [])
               + (["flow"] if step.get("train_diff") else []))
    schedulers = {model: default_scheduler_config(model) for model in trained}
    schedulers.update(step.get("schedulers") or inline.get("schedulers") or {})
    out["optimization"] = {**({"optimizers": optimizers} if optimizers else {}),
                           "schedulers": schedulers}
    if step.get("freeze_vae"):
        out["freeze"] = list(VAE_COMPONENTS)
    return out


def trainer_config(document: dict[str, Any], *, images: Path, captions: Path,
                   tokenizer: Path, output: Path) -> dict[str, Any]:
    """The trainer's pipeline YAML for our config ``document`` (a quickstart-like one):
    its model factory at our ``model_version`` with the widths it can set (``vae_dim``,
    the flow's ``feature_maps_dim``, ``text_embedding_dim``; the rest are the factory's
    fixed sizes), the same image size, batch size, steps, epochs and learning rates, no
    data-loading workers, no samples."""
    model, data, training = document["model"], document["data"], document["training"]
    pipeline = training["pipeline"]
    defaults = {key: value for key, value in pipeline.get("defaults", {}).items()
                if key in SHARED_STEP_KEYS}
    defaults.update(batch_size=training["batch_size"], workers=0)
    return {
        "model": {"model_type": "bezier",
                  "model_version": model.get("model_version", "0.6.0"),
                  "vae_dim": model["vae_dim"], "feature_maps_dim": model["flow_dim"],
                  "text_embedding_dim": model["text_embed_dim"]},
        "data": {"data_path": str(images), "captions_file": str(captions),
                 "tokenizer_name": str(tokenizer), "img_size": data["img_size"],
                 "channels": 3},
        "training": {"batch_size": training["batch_size"], "workers": 0,
                     "pipeline": {"defaults": defaults,
                                  "steps": [trainer_step(s) for s in pipeline["steps"]]}},
        "output": {"output_path": str(output),
                   "log_interval": document.get("output", {}).get("log_interval", 10),
                   "checkpoint_save_interval": 100000, "no_samples": True},
    }


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` as both sides can run it: no LPIPS (the trainer's needs downloaded
    VGG16 weights), steps that end after their epochs and read the data section's batches
    (``trainer_config`` translates no named dataset), the flow against Gaussian noise (the
    trainer's only kind), no samples or diagrams."""
    steps = [{k: v for k, v in step.items()
              if k not in ("use_lpips", "transition_on", "dataset")}
             for step in document["training"]["pipeline"]["steps"]]
    pipeline = {k: v for k, v in document["training"]["pipeline"].items() if k != "datasets"}
    return {**document,
            "model": {**document.get("model", {}), "flow_noise": "gaussian"},
            "training": {**document["training"], "pipeline": {**pipeline, "steps": steps}},
            "output": {**document.get("output", {}), "no_samples": True,
                       "generate_diagrams": False, "checkpoint_save_interval": 100000}}


# ------------------------------------------------------------------------------ running

def loss_curves(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each step's logged training metrics (``graph/training_metrics_<step>.jsonl``, the
    layout both trainers write): global step and the metrics, per logged line."""
    curves = {}
    for path in sorted((run_dir / "graph").glob("training_metrics_*.jsonl")):
        step = path.stem.removeprefix("training_metrics_")
        curves[step] = [{"global_step": r.get("global_step"), **r.get("metrics", {})}
                        for r in map(json.loads, path.read_text().splitlines())]
    return curves


def run_side(side: str, command: list[str], out: Path, time_limit: float,
             env: dict[str, str], reuse: bool) -> dict[str, Any]:
    """Trains one side with its output in ``out/<side>.log``; its wall seconds and exit
    code (None when the time limit stopped it), also kept in ``out/<side>.json``, which
    ``reuse`` reads instead of training again when it records a finished run."""
    record = out / f"{side}.json"
    if reuse and record.exists() and json.loads(record.read_text())["exit_code"] == 0:
        return json.loads(record.read_text())
    start = time.time()
    with (out / f"{side}.log").open("w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=time_limit).returncode
        except subprocess.TimeoutExpired:
            code = None
    result = {"wall_s": round(time.time() - start, 1), "exit_code": code}
    record.write_text(json.dumps(result))
    return result


def untrained_flow(models: FluxFlowModels) -> FluxFlowModels:
    """``models`` with a freshly initialised flow and text encoder: the flow v-loss's
    starting point on this autoencoder's latents (v-losses of different autoencoders'
    latents differ in scale, so each side's fall is measured from its own start)."""
    fresh = FluxFlowModels.create(models.config, nnx.Rngs(0),
                                  ("flow_processor", "text_encoder"))
    return dataclasses.replace(models, flow_processor=fresh.flow_processor,
                               text_encoder=fresh.text_encoder)


def score(models: FluxFlowModels, data: DataConfig) -> dict[str, float]:
    """``evaluate``'s held-out metrics (no LPIPS network) of ``models``, and the flow
    v-loss with an untrained flow on the same autoencoder ("init/")."""
    held = held_out(data, load_tokenizer(data), HELD_OUT)
    metrics = evaluate(models, held)
    metrics |= {f"init/{k}": v for k, v in
                evaluate(untrained_flow(models), held, parts=["flow"]).items()}
    return {k: round(v, 4) for k, v in metrics.items()}


def with_epochs(document: dict[str, Any], epochs: dict[str, int]) -> dict[str, Any]:
    """``document`` with the named steps' ``n_epochs`` replaced (to fit a time budget);
    ValueError for a name that is no step of it."""
    unknown = set(epochs) - {s["name"] for s in document["training"]["pipeline"]["steps"]}
    if unknown:
        raise ValueError(f"--epochs names no step of the config: {sorted(unknown)}")
    steps = [{**s, "n_epochs": epochs.get(s["name"], s["n_epochs"])}
             for s in document["training"]["pipeline"]["steps"]]
    return {**document, "training": {**document["training"], "pipeline": {
        **document["training"]["pipeline"], "steps": steps}}}


# The trainer's discriminator widths (train.py builds PatchDiscriminator(base_ch=32,
# depth=3)); its network differs from ours, so an imported checkpoint holds none.
TRAINER_DISCRIMINATOR = {"disc_base_channels": 32, "disc_depth": 3}


def architecture_of(checkpoint: Path) -> dict[str, Any]:
    """Our model section for the architecture of the checkpoint (e.g. the trainer's output
    directory) at ``checkpoint``, with the trainer's discriminator widths."""
    config = dataclasses.asdict(load_fluxflow(checkpoint).config)
    return {**{k: v for k, v in config.items() if v is not None}, **TRAINER_DISCRIMINATOR}


def prepare(config: Path, out: Path, epochs: dict[str, int], model_from: Path | None = None
            ) -> tuple[dict[str, Any], Path, Path]:
    """The comparable config (our side at ``model_from``'s architecture when given), and
    both sides' YAML files written under ``out`` with the trainer's image folder and
    tokenizer; the trainer's model is always the one ``config`` describes."""
    document = with_epochs(comparable(yaml.safe_load(config.read_text())), epochs)
    data = read_config(document).data
    out.mkdir(parents=True, exist_ok=True)
    images, captions = write_image_folder(data, out / "data")
    torch_yaml = out / "torch_trainer.yaml"
    torch_yaml.write_text(yaml.safe_dump(trainer_config(
        document, images=images, captions=captions,
        tokenizer=write_tokenizer_dir(out / "tokenizer"), output=out / "torch_run"),
        sort_keys=False))
    jax_yaml = out / "fluxflow_jax.yaml"
    jax_yaml.write_text(yaml.safe_dump(
        {**document, **({"model": architecture_of(model_from)} if model_from else {}),
         "output": {**document["output"], "output_path": str(out / "jax_run")}},
        sort_keys=False))
    return document, torch_yaml, jax_yaml


def compare(config: Path, out: Path, deps: Path | None, time_limit: float, record: Path,
            epochs: dict[str, int], reuse: bool = False, model_from: Path | None = None
            ) -> dict[str, Any]:
    document, torch_yaml, jax_yaml = prepare(config, out, epochs, model_from)
    data = read_config(document).data
    path = os.pathsep.join(([str(deps)] if deps else []) + [os.environ.get("PYTHONPATH", "")])
    commands = {
        "torch": ([sys.executable, "-c", LAUNCHER, "--config", str(torch_yaml)],
                  {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}),
        "jax": (["fluxflow-jax", "train", "--config", str(jax_yaml)],
                {**os.environ, "PYTHONPATH": str(ROOT)})}
    with ThreadPoolExecutor(len(commands)) as pool:  # both sides train at the same time
        futures = {side: pool.submit(run_side, side, command, out, time_limit, env, reuse)
                   for side, (command, env) in commands.items()}
        runs = {side: future.result() for side, future in futures.items()}
    shown = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    command = f"python tools/torch_trainer_compare.py --config {shown}" + "".join(
        f" --epochs {name}={count}" for name, count in epochs.items()) + (
        f" --model-from {model_from}" if model_from else "")
    result: dict[str, Any] = {"command": command, "held_out_samples": HELD_OUT}
    for side, load in (("torch", load_fluxflow), ("jax", run_models)):
        run_dir = out / f"{side}_run"
        entry = {**runs[side], "loss_curves": loss_curves(run_dir)}
        if runs[side]["exit_code"] == 0:
            entry["evaluation"] = score(load(run_dir), data)
        result[side] = entry
    result["config"] = document
    result["jax_config"] = yaml.safe_load(jax_yaml.read_text())
    result["torch_config"] = yaml.safe_load(torch_yaml.read_text())
    with record.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(markdown_table(result))
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The evaluation of both sides, metric by metric, and each step's first and last
    logged losses."""
    torch_eval = result["torch"].get("evaluation", {})
    jax_eval = result["jax"].get("evaluation", {})
    rows = ["| metric | fluxflow-training 0.8.1 | fluxflow-jax |", "|---|---|---|",
            f"| wall (s) | {result['torch']['wall_s']} | {result['jax']['wall_s']} |"]
    for name in sorted(set(torch_eval) | set(jax_eval)):
        rows.append(f"| {name} | {torch_eval.get(name, '-')} | {jax_eval.get(name, '-')} |")
    for side in ("torch", "jax"):
        for step, curve in result[side]["loss_curves"].items():
            losses = {k: v for k, v in curve[-1].items() if k.startswith("loss") or
                      k.endswith("loss")} if curve else {}
            first = curve[0] if curve else {}
            rows.append(f"| {side} {step} losses, first -> last logged | " + ", ".join(
                f"{k} {first.get(k, float('nan')):.4g} -> {v:.4g}"
                for k, v in sorted(losses.items()) if isinstance(v, (int, float))) + " | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--out", type=Path, default=Path("/tmp/torch_trainer_compare"))
    parser.add_argument("--deps", type=Path, default=None,
                        help="a directory with the trainer's missing dependencies "
                             "(pip install --no-deps --target DIR accelerate lpips "
                             "torchvision==<the CPU torch's pair>)")
    parser.add_argument("--time-limit", type=float, default=1800,
                        help="seconds each side may train")
    parser.add_argument("--record", type=Path,
                        default=ROOT / "docs" / "torch_trainer_compare.jsonl")
    parser.add_argument("--epochs", action="append", default=[], metavar="STEP=N",
                        help="train step STEP for N epochs on both sides (repeatable)")
    parser.add_argument("--model-from", type=Path, default=None, metavar="CHECKPOINT",
                        help="train our side at this checkpoint's architecture, e.g. a "
                             "finished trainer run's output directory")
    parser.add_argument("--reuse", action="store_true",
                        help="score a side's finished run in --out instead of training again")
    args = parser.parse_args(argv)
    try:
        epochs = {name: int(count) for name, count in
                  (item.split("=", 1) for item in args.epochs)}
    except ValueError:
        parser.error(f"--epochs takes STEP=N with N a whole number, got {args.epochs}")
    document = comparable(yaml.safe_load(args.config.read_text()))
    try:
        with_epochs(document, epochs)
    except ValueError as err:
        parser.error(str(err))
    if args.model_from is not None and not args.model_from.exists():
        parser.error(f"--model-from {args.model_from} does not exist; give a finished "
                     "trainer run's output directory or a checkpoint")
    compare(args.config.resolve(), args.out, args.deps, args.time_limit, args.record,
            epochs, args.reuse, args.model_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
