"""A real multi-process run on one machine, checked against a single process, and resumed.

    python tools/multihost_check.py [--processes 2] [--devices-per-process 2] [--steps 6]
                                    [--shard-params]

Starts ``--processes`` CPU processes joined by ``jax.distributed`` (``fluxflow-jax train
--coordinator_address localhost:PORT --num_processes N --process_id I``, collectives over
gloo), each with ``--devices-per-process`` virtual devices, training a tiny flow stage on
the demo data; then one process with all the devices on the same config. The logged
per-batch losses must agree (the global batch and its split do not depend on the number
of processes) and only process 0 may have written files.

Then a multi-process run is SIGKILLed after its second batch and finished twice from copies
of its output: by the same processes, and by one process with all the devices (another
host count). Both must log the uninterrupted run's per-batch losses. Exit status 0 when
everything holds. ``--shard-params`` splits the multi-process runs' parameters over all
devices of all processes (checkpoints and the final export then gather across hosts).
Too slow for the unit tests (five runs compile the step), quick enough by hand (~2 min).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
        "data": {"use_demo": True, "demo_samples": steps * batch_size, "img_size": 32,
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


class Trainer:
    """One ``fluxflow-jax train`` process. Its output goes to a file: an unread pipe that
    fills up would stall the process, and with it every other process of its run."""

    def __init__(self, config: Path, devices: int, extra: list[str]):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fluxflow_jax.cli", "train", "--config", str(config),
             *extra], env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        """Everything it printed, once it has ended."""
        self.process.wait()
        self.log.seek(0)
        return self.log.read()


def train_together(config: Path, args: argparse.Namespace) -> list[Trainer]:
    """The processes of one multi-host run, started."""
    port = free_port()
    return [Trainer(config, args.devices_per_process,
                  ["--coordinator_address", f"localhost:{port}", "--num_processes",
                   str(args.processes), "--process_id", str(i)]
                  + (["--shard_params"] if args.shard_params else []))
            for i in range(args.processes)]


def finished(runs: list[Trainer]) -> list[str] | None:
    """The runs' outputs once all have ended, or None (with the output shown) if one
    failed."""
    outputs = [run.output() for run in runs]
    if any(run.process.returncode for run in runs):
        print("\n".join(out[-2000:] for out in outputs))
        return None
    return outputs


def metrics_file(output: Path) -> Path:
    return output / "graph" / "training_metrics_flow.jsonl"


def losses(output: Path) -> list[tuple[int, float]]:
    lines = metrics_file(output).read_text().splitlines()
    return [(r["global_step"], r["metrics"]["flow_loss"]) for r in map(json.loads, lines)]


def agree(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    return len(got) == len(want) and all(
        a[0] == b[0] and abs(a[1] - b[1]) <= 1e-5 * max(1.0, abs(b[1]))
        for a, b in zip(got, want))


def killed_after_two_batches(runs: list[Trainer], output: Path) -> bool:
    """SIGKILL every process once two batches are logged; False if the run ended first."""
    while (not metrics_file(output).exists()
           or len(metrics_file(output).read_text().splitlines()) < 2):
        if any(run.process.poll() is not None for run in runs):
            return False
        time.sleep(0.05)
    for run in runs:
        run.process.send_signal(signal.SIGKILL)
        run.process.wait()
    return True


def one_process(config: Path, args: argparse.Namespace) -> list[str] | None:
    """``finished`` for one process holding all the devices of the multi-process runs."""
    return finished([Trainer(config, args.processes * args.devices_per_process, [])])


def check_against_one_process(directory: Path, args: argparse.Namespace
                              ) -> list[tuple[int, float]] | None:
    """The multi-process run's losses if they equal one process's and only process 0
    reported; else None."""
    total = args.processes * args.devices_per_process
    outputs = finished(train_together(write_config(directory, "multi", total, args.steps),
                                      args))
    if outputs is None or one_process(write_config(directory, "single", total, args.steps),
                                      args) is None:
        return None
    got, want = losses(directory / "multi"), losses(directory / "single")
    print(f"{args.processes} processes x {args.devices_per_process} devices: {got}")
    print(f"1 process x {total} devices:   {want}")
    silent = all("Step flow" not in out for out in outputs[1:])
    same = agree(got, want)
    print(f"losses agree: {same}; only process 0 printed progress: {silent}")
    return got if same and silent else None


def check_resume(directory: Path, args: argparse.Namespace,
                 want: list[tuple[int, float]]) -> bool:
    """A multi-process run killed after its second batch, finished by the same processes
    and by one process, logs ``want`` both times."""
    total = args.processes * args.devices_per_process
    killed = write_config(directory, "killed", total, args.steps)
    if not killed_after_two_batches(train_together(killed, args), directory / "killed"):
        print("the run ended before it could be killed; raise --steps")
        return False
    shutil.copytree(directory / "killed", directory / "killed_single")
    finishes = {"killed": (f"{args.processes} processes", lambda: finished(
                    train_together(killed, args))),
                "killed_single": ("1 process", lambda: one_process(
                    write_config(directory, "killed_single", total, args.steps), args))}
    good = True
    for name, (how, finish) in finishes.items():
        outputs = finish()
        if outputs is None:
            return False
        resumed = "Resuming from checkpoint" in outputs[0]
        match = agree(losses(directory / name), want)
        print(f"killed after batch 2, finished by {how}: resumed {resumed}, "
              f"losses agree: {match}")
        good = good and resumed and match
    return good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--shard-params", action="store_true",
                        help="shard the multi-process runs' parameters (FSDP style)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        want = check_against_one_process(Path(tmp), args)
        return 0 if want is not None and check_resume(Path(tmp), args, want) else 1


if __name__ == "__main__":
    sys.exit(main())
