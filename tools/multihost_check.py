"""A real multi-process run on one machine, checked against a single process.

    python tools/multihost_check.py [--processes 2] [--devices-per-process 2] [--steps 3]
                                    [--shard-params]

Starts ``--processes`` CPU processes joined by ``jax.distributed`` (``fluxflow-jax train
--coordinator_address localhost:PORT --num_processes N --process_id I``, collectives over
gloo), each with ``--devices-per-process`` virtual devices, training a tiny flow stage on
the demo data; then one process with all the devices on the same config. The logged
per-batch losses must agree (the global batch and its split do not depend on the number
of processes) and only process 0 may have written files. Exit status 0 when they do.
``--shard-params`` splits the multi-process run's parameters over all devices of all
processes (checkpoints and the final export then gather across hosts).
Too slow for the unit tests (three runs compile the step), quick enough by hand (~2 min).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

TINY_MODEL = {"vae_dim": 16, "downscales": 2, "upscales": 2, "vae_attn_layers": 1,
              "flow_dim": 16, "flow_attn_heads": 2, "flow_transformer_layers": 1,
              "text_embed_dim": 16, "text_dim": 24, "text_heads": 2, "text_layers": 1,
              "text_hidden_dim": 32, "text_max_positions": 32, "text_head_width": 8,
              "disc_base_channels": 4, "disc_depth": 2}


def write_config(directory: Path, name: str, batch_size: int, steps: int) -> Path:
    document = {
        "model": TINY_MODEL,
        "data": {"use_demo": True, "demo_samples": 4 * batch_size, "img_size": 32,
                 "max_length": 16},
        "training": {"batch_size": batch_size, "pipeline": {"defaults": {"lr": 1e-3}, "steps": [
            {"name": "flow", "n_epochs": 1, "max_steps": steps, "train_diff": True}]}},
        "output": {"output_path": str(directory / name), "log_interval": 1,
                   "checkpoint_save_interval": 1, "no_samples": True,
                   "generate_diagrams": False}}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train(config: Path, devices: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "fluxflow_jax.cli", "train", "--config",
                             str(config), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def losses(output: Path) -> list[tuple[int, float]]:
    lines = (output / "graph" / "training_metrics_flow.jsonl").read_text().splitlines()
    return [(r["global_step"], r["metrics"]["flow_loss"]) for r in map(json.loads, lines)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shard-params", action="store_true",
                        help="shard the multi-process run's parameters (FSDP style)")
    args = parser.parse_args()
    total = args.processes * args.devices_per_process
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        port = free_port()
        multi = write_config(directory, "multi", total, args.steps)
        runs = [train(multi, args.devices_per_process,
                      ["--coordinator_address", f"localhost:{port}", "--num_processes",
                       str(args.processes), "--process_id", str(i)]
                      + (["--shard_params"] if args.shard_params else []))
                for i in range(args.processes)]
        outputs = [run.communicate()[0] for run in runs]
        if any(run.returncode for run in runs):
            print("\n".join(out[-2000:] for out in outputs))
            return 1
        single = write_config(directory, "single", total, args.steps)
        run = train(single, total, [])
        output = run.communicate()[0]
        if run.returncode:
            print(output[-2000:])
            return 1
        got, want = losses(directory / "multi"), losses(directory / "single")
        print(f"{args.processes} processes x {args.devices_per_process} devices: {got}")
        print(f"1 process x {total} devices:   {want}")
        silent = all("Step flow" not in out for out in outputs[1:])
        agree = len(got) == len(want) and all(
            a[0] == b[0] and abs(a[1] - b[1]) <= 1e-5 * max(1.0, abs(b[1]))
            for a, b in zip(got, want))
        print(f"losses agree: {agree}; only process 0 printed progress: {silent}")
        return 0 if agree and silent else 1


if __name__ == "__main__":
    sys.exit(main())
