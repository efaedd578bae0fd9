"""The key tables of docs/pipeline.md, made from the keys' declarations (``settings``).

Each table stands between ``<!-- keys: NAME -->`` and ``<!-- /keys -->`` in the docs;
``tools/config_docs.py`` rewrites them and a test checks they are current.
"""

from __future__ import annotations

import re

from fluxflow_jax.pipeline.config import (STEP_FORMS, TRANSITION_IGNORED, DataConfig,
                                          DatasetConfig, OutputConfig, StepConfig,
                                          TrainingConfig, TransitionConfig)
from fluxflow_jax.settings import key_table
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.vae_step import VAEOptions

TABLES = {
    "data": key_table(DataConfig),
    "training": key_table(TrainingConfig),
    "step": key_table(StepConfig, STEP_FORMS),
    "vae_losses": key_table(VAEOptions),
    "flow_losses": key_table(FlowOptions),
    "datasets": key_table(DatasetConfig),
    "transitions": key_table(TransitionConfig, TRANSITION_IGNORED),
    "output": key_table(OutputConfig),
}
_BLOCK = re.compile(r"(<!-- keys: (\w+) -->\n).*?(<!-- /keys -->)", re.S)


def with_tables(text: str) -> str:
    """``text`` with every marked table made anew; ``KeyError`` for an unknown name."""
    return _BLOCK.sub(lambda m: f"{m[1]}\n{TABLES[m[2]]}\n\n{m[3]}", text)


def missing_tables(text: str) -> list[str]:
    """The tables ``text`` has no markers for."""
    return sorted(set(TABLES) - {m[2] for m in _BLOCK.finditer(text)})
