"""The reference's training flags (``fluxflow-train``), as overrides of the YAML config.

Every flag maps to one config key (``config.FLAGS``, derived from the keys' declarations,
help text included). Only the flags given on the command line override the file (in any
spelling, ``--lr 1e-4`` or ``--lr=1e-4``); the schema's defaults fill the rest.
"""

from __future__ import annotations

import argparse
from typing import Any

from fluxflow_jax.pipeline.config import FLAGS
from fluxflow_jax.settings import METAVAR, plain

GROUPS = {"data": "data", "model": "model", "model_checkpoint": "model",  # section -> group
          "training": "training", "output": "output"}


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Add every flag of ``FLAGS``; a flag not given leaves no attribute (the YAML's or the
    schema's value stands)."""
    groups = {name: parser.add_argument_group(name) for name in dict.fromkeys(
        GROUPS.values())}
    for flag in FLAGS:
        target = f"{flag.section}.{flag.key}" if flag.key else flag.section
        options: dict[str, Any] = {"dest": f"override:{flag.name}",
                                   "default": argparse.SUPPRESS,
                                   "help": f"{plain(flag.help)} (sets {target})"}
        if flag.kind == "flag":
            options["action"] = "store_true"
        elif isinstance(flag.kind, tuple):
            options.update(type=flag.kind[0], nargs=flag.kind[1], metavar=METAVAR)
        else:
            options.update(type=flag.kind, metavar=METAVAR)
        groups[GROUPS[flag.section]].add_argument(f"--{flag.name}", **options)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{section: {key: value}} (``model_checkpoint``: the path) of the flags given."""
    out: dict[str, Any] = {}
    for flag in FLAGS:
        dest = f"override:{flag.name}"
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if flag.section == "model_checkpoint":
            out[flag.section] = value
        else:
            out.setdefault(flag.section, {})[flag.key] = value
    return out
