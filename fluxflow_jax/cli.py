"""The ``fluxflow-jax`` command.

User errors (a missing or mismatched checkpoint) print one line naming the problem and exit
with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import sys
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxflow-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version",
                        version=f"fluxflow-jax {fluxflow_jax.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="show a checkpoint's architecture and sizes")
    info.add_argument("checkpoint", help="checkpoint directory or .safetensors file "
                                         "(fluxflow-jax or PyTorch fluxflow v030)")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fluxflow_jax.interop import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CheckpointError as err:
        print(f"fluxflow-jax {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
