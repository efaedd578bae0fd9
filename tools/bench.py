"""Training-step speed of fluxflow-jax against the same batch of work in PyTorch.

    python tools/bench.py [--configs tiny,reference] [--stages vae_gan,flow,flow_cached]
                          [--variants jax,torch,torch.compile] [--steps 20] [--warmup 3]
                          [--rounds 1] [--compile-timeout 300] [--wait-idle 0]
                          [--batch-size N] [--huge-pages on|off] [--json out.json]

For each (config, stage, variant) a fresh worker process builds the networks, runs
``--warmup`` steps (compilation included), freezes the Python heap as the training loop does
(``gc.freeze``, both frameworks) and then times ``--steps`` steps one by one on the same
batch, in float32 or with ``--precision bf16`` in both frameworks' mixed precision (JAX's
``precision: bf16``, PyTorch's bfloat16 autocast; float32 weights and optimizer states).
With ``--rounds N`` the variants of a stage take turns N times, each time in a new process,
and a row pools the steps of all its rounds: on a shared machine the
speed of a whole process drifts (by ±20% on the 2-core development machine), and taking
turns spreads that drift over every variant instead of charging it to one. Every worker, of
either framework, runs with glibc's large blocks in transparent huge pages, as
``fluxflow-jax train`` runs (``fluxflow_jax.huge_pages``); ``--huge-pages off`` gives every
worker glibc's defaults instead.

The JAX side is ``fluxflow_jax.training.TrainStep``; the PyTorch side is the reference
trainers' order of operations on the real ``fluxflow`` 0.8.1 v030 networks
(``tools/torch_steps.py``), eager and under ``torch.compile`` (default mode), on the GPU
when PyTorch sees one (a CUDA build of torch), else on the CPU.

Reported per row: median and mean step time, images/s (batch / median), peak memory, the
parameter count each side trains (a check that both run the same networks), and for JAX the
XLA cost-analysis FLOPs per step and the MFU when the device's peak FLOP/s is known (not for
CPUs). Memory: each worker is its own process, so its peak resident set size (``getrusage``
max RSS) is that variant's alone; the table shows its growth over the worker's RSS after
imports (weights, optimizer state, activations, compiled code). On a GPU each side adds
its allocator's peak: JAX's ``memory_stats()``, PyTorch's ``max_memory_allocated()``.

Configs: "tiny" (64 px, batch 4, small widths, a 1-layer 64-wide DistilBERT),
"reference" (256 px, batch 1, the reference's default widths and full text encoder; slow on
a CPU: PyTorch's VAE-GAN step took about an hour on the 2-core development machine) and
"flow512" (the reference with a 512-wide flow processor, the width the MFU target names).
``--batch-size`` replaces every config's batch (batch 1 leaves a GPU mostly idle).

Stage "flow_cached" is JAX's flow step on cached latents (``cache_latents: true``): the
images' posteriors are computed once, before the timed steps, and the step samples its
tokens from them instead of running the compressor's convolutions. It has no PyTorch row
(the reference has no cache); its note gives the speed-up over the "flow" row.

The table goes to stdout; ``--json`` is rewritten after each stage, so a run stopped by a
time limit keeps the rows it finished (SIGTERM also stops the worker in progress).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fluxflow_jax.huge_pages import TUNABLE, environment_with_huge_pages
from fluxflow_jax.models import FluxFlowConfig

STAGES = ("vae_gan", "flow", "flow_cached")
VARIANTS = ("jax", "torch", "torch.compile")
LEARNING_RATE = 1e-4
FLOW_LR = 1e-5
TOTAL_STEPS = 1000  # the schedules' length; only the LR values depend on it


@dataclass(frozen=True)
class BenchConfig:
    model: FluxFlowConfig
    image_size: int
    batch_size: int
    text_length: int = 128  # the reference tokenises training captions to 128


CONFIGS = {
    "tiny": BenchConfig(FluxFlowConfig(
        vae_dim=16, downscales=2, upscales=2, vae_attn_layers=1, flow_dim=16, flow_attn_heads=2,
        flow_transformer_layers=1, text_embed_dim=16, disc_base_channels=8, disc_depth=2,
        text_vocab_size=30522, text_dim=64, text_heads=2, text_layers=1, text_hidden_dim=128,
        text_max_positions=128), image_size=64, batch_size=4),
    "reference": BenchConfig(FluxFlowConfig(), image_size=256, batch_size=1),
    "flow512": BenchConfig(FluxFlowConfig(flow_dim=512), image_size=256, batch_size=1),
}


# ---------------------------------------------------------------------------- the batch


def host_batch(bench: BenchConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """One NHWC float32 image batch in [-1, 1] and token ids, shared by both sides."""
    rng = np.random.default_rng(seed)
    b, size = bench.batch_size, bench.image_size
    ids = rng.integers(0, bench.model.text_vocab_size, (b, bench.text_length), dtype=np.int32)
    mask = np.ones((b, bench.text_length), np.int32)
    mask[:, bench.text_length // 2:] = 0  # half padding, like short captions
    images = rng.uniform(-1, 1, (b, size, size, bench.model.in_channels)).astype(np.float32)
    return {"images": images, "input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------ JAX variant


def jax_runner(bench: BenchConfig, stage_name: str, precision: str, remat: bool
               ) -> tuple[Callable[[int], None], dict]:
    """(run step n, info): the jitted fluxflow-jax step; info gets FLOPs and memory later."""
    import jax
    from flax import nnx

    from fluxflow_jax.models import FluxFlowModels
    from fluxflow_jax.training import LPIPS, FlowOptions, StageConfig, TrainStep, VAEOptions
    from fluxflow_jax.training.performance import peak_flops
    from fluxflow_jax.training.state import PackedState

    adamw = {"type": "AdamW", "lr": LEARNING_RATE, "weight_decay": 0.01}
    models = FluxFlowModels.create(bench.model, nnx.Rngs(0))
    if stage_name == "vae_gan":
        lpips = LPIPS(rngs=nnx.Rngs(0))  # random weights: the cost is the same
        stage = StageConfig(vae=VAEOptions(use_lpips=True, r1_interval=16),
                            optimizers={"vae": adamw, "discriminator": adamw},
                            total_steps=TOTAL_STEPS)
    else:
        lpips = None
        stage = StageConfig(flow=FlowOptions(), total_steps=TOTAL_STEPS, optimizers={
            "flow": {"type": "Lion", "lr": FLOW_LR}, "text_encoder": adamw})
    step = TrainStep(models, stage, lpips=lpips, precision=precision, remat=remat)
    trained = {c for cs in stage.group_components().values() for c in cs}
    params = sum(x.size for name, module in models.present().items() if name in trained
                 for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    state = step.init_state(models)
    host = host_batch(bench)
    if stage_name == "flow_cached":
        host = cached_batch(step, state, bench, host)
        wanted = ("latent_mu", "latent_logvar", "latent_grid", "input_ids", "attention_mask")
    else:
        wanted = ("images",) + (("input_ids", "attention_mask") if stage_name == "flow"
                                else ())
    batch = {k: jax.device_put(v) for k, v in host.items() if k in wanted}
    keys = [jax.random.key(n) for n in range(1, 10_000)]
    holder = {"state": PackedState.pack(state)}  # as the training loop keeps it

    def run(n: int) -> None:
        holder["state"], metrics = step(holder["state"], batch, keys[n - 1])
        jax.block_until_ready(metrics)

    def finish(info: dict) -> None:
        """FLOPs from XLA's cost analysis of the compiled step, its compile time, and the
        accelerator's allocator peak where it reports one."""
        compilation = step.compilations[0]
        info["flops_per_step"] = compilation.flops
        info["compile_seconds"] = compilation.seconds
        device = jax.devices()[0]
        stats = device.memory_stats() or {}
        info["device"] = f"{device.platform}: {device.device_kind}"
        info["device_peak_bytes"] = stats.get("peak_bytes_in_use")
        info["peak_flops"] = peak_flops(device, precision)

    return run, {"params": int(params), "finish": finish}


def cached_batch(step: Any, state: Any, bench: BenchConfig, host: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """``host`` with its images replaced by their cached posteriors, as a run with
    ``cache_latents: true`` reads them (the cache itself in a temporary folder)."""
    from fluxflow_jax.pipeline.latent_cache import LatentCache

    with tempfile.TemporaryDirectory() as folder:
        cache = LatentCache(Path(folder), step.networks, state.params["compressor"],
                            state.buffers["compressor"], bench.model.model_version)
        return cache.inputs(host)


# ---------------------------------------------------------------------- PyTorch variants


def torch_runner(bench: BenchConfig, stage_name: str, compiled: bool, precision: str
                 ) -> tuple[Callable[[int], None], dict]:
    """(run step n, info): the reference step on the fluxflow networks, eager or compiled,
    on the GPU when PyTorch sees one (else the CPU), with bf16 as autocast."""
    import torch
    import torch_steps  # on the path since import_framework

    from fluxflow_jax.training import FlowOptions, VAEOptions

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    placement = {"device": device, "bf16": precision == "bf16"}
    data = host_batch(bench)
    images = torch.from_numpy(data["images"].transpose(0, 3, 1, 2).copy()).to(device)
    if stage_name == "vae_gan":
        step = torch_steps.VAEGANStep(bench.model, VAEOptions(use_lpips=True, r1_interval=16),
                                      LEARNING_RATE, TOTAL_STEPS, compiled, **placement)

        def call(n: int) -> None:
            step(images, n)
    else:
        step = torch_steps.FlowStep(bench.model, FlowOptions(), FLOW_LR, LEARNING_RATE,
                                    TOTAL_STEPS, compiled, **placement)
        ids = torch.from_numpy(data["input_ids"]).long().to(device)
        mask = torch.from_numpy(data["attention_mask"]).long().to(device)

        def call(n: int) -> None:
            step(images, ids, mask)

    def run(n: int) -> None:
        call(n)
        if cuda:
            torch.cuda.synchronize()  # the step's queued kernels count as its time

    def finish(info: dict) -> None:
        if cuda:
            info["device"] = f"cuda: {torch.cuda.get_device_name()}, torch {torch.__version__}"
            info["device_peak_bytes"] = torch.cuda.max_memory_allocated()
        else:
            info["device"] = (f"cpu: torch {torch.__version__}, {torch.get_num_threads()} "
                              "threads")

    note = getattr(step, "COMPILE_NOTE", None) if compiled else None
    return run, {"params": step.parameter_count(), "finish": finish,
                 **({"note": note} if note else {})}


# ------------------------------------------------------------------------ one worker


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def emit(kind: str, payload: Any) -> None:
    """One line to the parent: "<kind> <json>"."""
    print(kind, json.dumps(payload), flush=True)


def import_framework(variant: str) -> None:
    """Load the variant's libraries before the RSS baseline, so the growth is the step's."""
    if variant == "jax":
        import fluxflow_jax.training  # noqa: F401  (jax, flax, optax)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ holds torch_steps
        import torch_steps  # noqa: F401  (torch, fluxflow, transformers, lion_pytorch)


def worker(spec: dict) -> None:
    """Build one variant, warm it up, time it, and report (in this process, so the peak
    RSS is this variant's alone)."""
    bench = dataclasses.replace(CONFIGS[spec["config"]], batch_size=spec["batch_size"])
    import_framework(spec["variant"])
    baseline = current_rss_bytes()
    if spec["variant"] == "jax":
        run, info = jax_runner(bench, spec["stage"], spec["precision"], spec["remat"])
    else:
        run, info = torch_runner(bench, spec["stage"], spec["variant"] == "torch.compile",
                                 spec["precision"])
    start = time.perf_counter()
    for n in range(1, spec["warmup"] + 1):
        run(n)
    emit("WARM", {"seconds": time.perf_counter() - start})
    # As the training loop does after compiling (pipeline.loop.freeze_heap): the objects
    # built so far out of the cyclic collector's reach, for both frameworks.
    gc.collect()
    gc.freeze()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for n in range(spec["warmup"] + 1, spec["warmup"] + spec["steps"] + 1):
        start = time.perf_counter()
        run(n)
        times.append(time.perf_counter() - start)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    info.pop("finish")(info)
    emit("RESULT", {**info, "times": times, "peak_rss_bytes": peak,
                    "rss_growth_bytes": peak - baseline,
                    "page_faults_per_step": (usage.ru_minflt - faults) / len(times)})


# ------------------------------------------------------------------------ the parent


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_wait: float, threshold: float = 0.25, window: float = 2.0) -> float:
    """Wait up to ``max_wait`` s for other processes to use under ``threshold`` cores (over
    ``window`` s); returns the last load seen. Call it with no worker running."""
    deadline = time.monotonic() + max_wait
    while True:
        before = busy_cpu_seconds()
        time.sleep(window)
        load = (busy_cpu_seconds() - before) / window
        if load < threshold or time.monotonic() >= deadline:
            return load


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def worker_environment(huge_pages: bool) -> dict[str, str]:
    """The environment every worker, of either framework, runs in, so both sides get the
    same allocator: with huge pages, glibc's large blocks in transparent huge pages as
    ``fluxflow-jax train`` runs (``fluxflow_jax.huge_pages``); without, glibc's defaults."""
    if huge_pages:
        return environment_with_huge_pages(os.environ) or dict(os.environ)
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
                if t and not t.startswith(f"{TUNABLE}=")]
    return {**os.environ, "GLIBC_TUNABLES": ":".join(tunables)}


def run_worker(spec: dict, compile_timeout: float | None) -> dict:
    """The worker's result, or {"error": why}. A torch.compile worker still warming up
    after ``compile_timeout`` seconds is stopped (its whole process group: inductor may
    have started compile workers)."""
    limit = compile_timeout if spec["variant"] == "torch.compile" else None
    start = (time.monotonic(), busy_cpu_seconds(), children_cpu_seconds())
    result = run_process(spec, limit)
    wall, busy, ours = (now - then for now, then in zip(
        (time.monotonic(), busy_cpu_seconds(), children_cpu_seconds()), start, strict=True))
    # Other processes' CPU use while this worker ran, in cores: a shared machine's
    # neighbours slow both frameworks (threads waiting on a busy core), so it is recorded.
    result["other_load_cores"] = max(busy - ours, 0.0) / wall
    return result


def run_process(spec: dict, limit: float | None) -> dict:
    """Run the worker; stop it (process group) if it is still warming up after ``limit``."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True,
                                env=worker_environment(spec["huge_pages"]))
        try:
            return read_worker(proc, log, spec, limit)
        finally:  # also on SIGTERM (main's SystemExit): the worker has its own session
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def read_worker(proc: subprocess.Popen, log: Any, spec: dict, limit: float | None) -> dict:
    """The result the worker reports, or {"error": why} (``run_process``)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + limit if limit else None
    result: dict = {}
    while True:
        try:
            line = lines.get(timeout=None if deadline is None
                             else max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            return {"error": f"torch.compile warm-up ({spec['warmup']} steps) took over "
                             f"{limit:.0f} s; stopped"}
        if line is None:
            break
        kind, _, payload = line.partition(" ")
        if kind == "WARM":
            deadline = None
            result["warmup_seconds"] = json.loads(payload)["seconds"]
        elif kind == "RESULT":
            result.update(json.loads(payload))
    proc.wait()
    if proc.returncode != 0 or "times" not in result:
        log.seek(0)
        tail = [line for line in log.read().splitlines() if line.strip()][-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}
    return result


def pool_rounds(results: list[dict]) -> dict:
    """One variant's rounds as one result: all step times, each round's median, the largest
    memory and neighbours' load; the first error if any round failed."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    pooled = {**results[0], "times": [t for r in results for t in r["times"]]}
    pooled["round_medians"] = [statistics.median(r["times"]) for r in results]
    for key in ("peak_rss_bytes", "rss_growth_bytes", "other_load_cores",
                "page_faults_per_step"):
        pooled[key] = max(r[key] for r in results)
    return pooled


def summarise(spec: dict, result: dict) -> dict:
    row, batch_size = dict(spec), spec["batch_size"]
    if "error" in result:
        return {**row, **result}
    median = statistics.median(result["times"])
    row.update({k: v for k, v in result.items() if k != "times"})
    row.update(step_seconds_median=median, step_seconds_mean=statistics.fmean(result["times"]),
               step_seconds_all=result["times"], images_per_second=batch_size / median)
    flops, peak = result.get("flops_per_step"), result.get("peak_flops")
    row["mfu"] = flops / median / peak if flops and peak else None
    return row


def add_ratios(rows: list[dict]) -> None:
    """JAX step time / PyTorch step time, on every row measured against it."""
    jax_time = {(r["config"], r["stage"]): r["step_seconds_median"] for r in rows
                if r["variant"] == "jax" and "error" not in r}
    for r in rows:
        base = jax_time.get((r["config"], r["stage"]))
        if r["variant"] != "jax" and base and "error" not in r:
            r["jax_over_torch"] = base / r["step_seconds_median"]
        uncached = jax_time.get((r["config"], "flow"))
        if r["stage"] == "flow_cached" and uncached and "error" not in r:
            r["note"] = (f"{uncached / r['step_seconds_median']:.2f}x the speed of the "
                         "uncached flow step")


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _spread(values: list[float]) -> str:
    return f"{min(values):.4f}-{max(values):.4f}" if len(values) > 1 else "-"


def print_table(rows: list[dict]) -> None:
    header = ("config", "stage", "variant", "median s", "mean s", "img/s", "warm-up s",
              "RSS MiB (+growth)", "faults/step", "params", "GFLOP/step", "MFU", "JAX/this",
              "others' load", "round medians s")
    table = [header]
    for r in rows:
        if "error" in r:
            table.append((r["config"], r["stage"], r["variant"], "failed: " + r["error"]))
            continue
        device_peak = r.get("device_peak_bytes")
        memory = f"{_mib(r['peak_rss_bytes'])} (+{_mib(r['rss_growth_bytes'])})" + (
            f", dev {_mib(device_peak)}" if device_peak else "")
        flops = r.get("flops_per_step")
        table.append((
            r["config"], r["stage"], r["variant"], f"{r['step_seconds_median']:.4f}",
            f"{r['step_seconds_mean']:.4f}", f"{r['images_per_second']:.2f}",
            f"{r['warmup_seconds']:.1f}", memory, f"{r['page_faults_per_step']:.0f}",
            f"{r['params']:,}",
            f"{flops / 1e9:.2f}" if flops else "-",
            f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a",
            f"{r['jax_over_torch']:.2f}" if "jax_over_torch" in r else "-",
            f"{r['other_load_cores']:.2f}", _spread(r.get("round_medians", []))))
    widths = [max(len(row[i]) for row in table if len(row) > i and len(row) == len(header))
              for i in range(len(header))]
    for row in table:
        if len(row) != len(header):
            cells = zip(row[:3], widths, strict=False)
            print("  ".join(c.ljust(w) for c, w in cells) + "  " + row[3])
        else:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    for r in rows:
        if r.get("note"):
            print(f"note [{r['config']} {r['stage']} {r['variant']}]: {r['note']}")
    devices = sorted({r["device"] for r in rows if "device" in r})
    print("devices: " + "; ".join(devices))
    print("JAX/this: JAX median step time / this row's (below 1: JAX is faster). "
          "RSS: the worker's peak max RSS (growth over its post-import RSS). "
          "faults/step: minor page faults per timed step (fresh pages the step touched). "
          "MFU: n/a without a known peak FLOP/s (CPUs). others' load: CPU cores other "
          "processes kept busy meanwhile. Round medians: the lowest and highest median of "
          "one round (--rounds).")
    busy = [r for r in rows if r.get("other_load_cores", 0) > 0.25]
    if busy:
        print(f"WARNING: other processes used > 0.25 cores during {len(busy)} row(s); "
              f"those timings are inflated (this machine has {os.cpu_count()} cores)")


def parse_list(text: str, valid: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in valid]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or 'empty'}; valid: {','.join(valid)}")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny", help=f"from {','.join(CONFIGS)}")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each variant runs (in turns, a new process each time)")
    parser.add_argument("--compile-timeout", type=float, default=300.0,
                        help="seconds torch.compile's warm-up may take before it counts "
                             "as failed")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each worker, wait up to this long for other processes "
                             "to leave the CPUs idle (shared machines)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the steps' arithmetic (bf16: JAX's precision: bf16, "
                             "PyTorch's bfloat16 autocast)")
    parser.add_argument("--batch-size", type=int,
                        help="images per step for every config (default: each config's own)")
    parser.add_argument("--remat", action="store_true",
                        help="rematerialise the JAX step's blocks (memory for compute)")
    parser.add_argument("--huge-pages", choices=("on", "off"), default="on",
                        help="on: every worker (both frameworks) runs with glibc's "
                             "glibc.malloc.hugetlb=1, as fluxflow-jax train does; off: "
                             "glibc's default allocator settings for every worker")
    parser.add_argument("--json", type=Path, help="write every row (all step times) here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if min(args.steps, args.warmup, args.rounds, args.batch_size or 1) < 1:
        raise SystemExit("--steps, --warmup, --rounds and --batch-size must be >= 1 "
                         "(warm-up includes compilation)")
    # A time limit's SIGTERM unwinds through run_process, which stops the running worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    variants = parse_list(args.variants, VARIANTS, "variants")
    rows = []
    for config in parse_list(args.configs, list(CONFIGS), "configs"):
        for stage in parse_list(args.stages, STAGES, "stages"):
            # The reference has no latent cache: its flow rows stand for both.
            specs = [{"config": config, "stage": stage, "variant": variant,
                      "steps": args.steps, "warmup": args.warmup,
                      "precision": args.precision, "remat": args.remat,
                      "batch_size": args.batch_size or CONFIGS[config].batch_size,
                      "huge_pages": args.huge_pages == "on"} for variant in variants
                     if stage != "flow_cached" or variant == "jax"]
            results: list[list[dict]] = [[] for _ in specs]
            for number in range(1, args.rounds + 1):
                for spec, done in zip(specs, results, strict=True):
                    if args.wait_idle > 0:
                        wait_for_quiet(args.wait_idle)
                    print(f"[{config} {stage} {spec['variant']}] round {number} ...",
                          file=sys.stderr, flush=True)
                    done.append(run_worker(spec, args.compile_timeout))
            rows += [summarise(spec, pool_rounds(done))
                     for spec, done in zip(specs, results, strict=True)]
            add_ratios(rows)
            if args.json:  # after each stage, so a stopped run keeps what it finished
                args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
