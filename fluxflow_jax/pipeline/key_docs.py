"""The key tables of docs/pipeline.md and the flag tables of docs/training.md, made from
the keys' declarations (``settings``).

Each table stands between ``<!-- keys: NAME -->`` and ``<!-- /keys -->`` in its page;
``tools/config_docs.py`` rewrites them and a test checks they are current.
"""

from __future__ import annotations

import re

from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.pipeline.config import (FLAGS, MODEL_OTHER_KEYS, STEP_FORMS,
                                          TOP_LEVEL_KEYS, TRANSITION_IGNORED, DataConfig,
                                          DatasetConfig, OutputConfig, StepConfig,
                                          TrainingConfig, TransitionConfig)
from fluxflow_jax.pipeline.flags import GROUPS
from fluxflow_jax.settings import flag_table, key_table
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.vae_step import VAEOptions

KEY_TABLES = {  # docs/pipeline.md
    "model": key_table(FluxFlowConfig, MODEL_OTHER_KEYS),
    "data": key_table(DataConfig),
    "training": key_table(TrainingConfig),
    "step": key_table(StepConfig, STEP_FORMS),
    "vae_losses": key_table(VAEOptions),
    "flow_losses": key_table(FlowOptions),
    "datasets": key_table(DatasetConfig),
    "transitions": key_table(TransitionConfig, TRANSITION_IGNORED),
    "output": key_table(OutputConfig),
    "top_level": key_table(None, TOP_LEVEL_KEYS),
}
FLAG_TABLES = {  # docs/training.md, one per group of --help
    f"flags_{group}": flag_table([flag for flag in FLAGS if GROUPS[flag.section] == group],
                                anchors_in="pipeline.md")
    for group in dict.fromkeys(GROUPS.values())}
PAGES = {"pipeline.md": KEY_TABLES, "training.md": FLAG_TABLES}  # under docs/
_BLOCK = re.compile(r"(<!-- keys: (\w+) -->\n).*?(<!-- /keys -->)", re.S)


def with_tables(page: str, text: str) -> str:
    """``text`` of docs/``page`` with every marked table made anew."""
    return _BLOCK.sub(lambda m: f"{m[1]}\n{PAGES[page][m[2]]}\n\n{m[3]}", text)


def missing_tables(page: str, text: str) -> list[str]:
    """The tables of docs/``page`` that ``text`` has no markers for."""
    return sorted(set(PAGES[page]) - {m[2] for m in _BLOCK.finditer(text)})
