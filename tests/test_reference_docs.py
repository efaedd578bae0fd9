"""The PyTorch trainer's documented configs: every YAML example in ``fluxflow-training``
0.2.1's and 0.8.1's README and docs, read from the pinned sdists at test time.

An example the PyTorch trainer accepts validates here once given data (the built-in demo
set stands in for the example's image folder; the tests' 8 virtual CPU devices are reduced
to one). One it refuses, or whose keys it silently ignores, is refused here with a message
naming the culprit; so is each 0.8.1-only key, by name, until 0.8.1 configs are supported.
Fragments (one step's keys, a section) are checked where their page puts them.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from fluxflow_jax import pinned
from fluxflow_jax.pipeline.config import ConfigError, load_config
from fluxflow_jax.pipeline.plan import check_run
from fluxflow_jax.pipeline.yaml_file import YamlFileError, read_yaml

SDISTS = {
    "0.2.1": "2efe94f01507152a5cfe6f4bd8de46dd1ebb18046c5405c5d3dfef50ef2b62fb",
    "0.8.1": "0c8d0524552da940de15afd880a4b88b607a4610b4025b65c655ce808e5af539",
}
VALID = None
LATER = "fluxflow-training 0.8.1 key that fluxflow-jax does not support yet"
NOT_YAML = "not valid YAML"

# A step the fragments of one step's keys are placed in, and its variants.
STEP = {"name": "example", "n_epochs": 1}
VAE = {**STEP, "train_vae": True}
ALL = {**STEP, "train_vae": True, "gan_training": True, "train_diff": True}

# (version, page, index of the ```yaml block on it): (where it goes, what is expected).
# Where: "config" (a whole file), "training" / "model" / "data" (that section), "steps"
# (a list of steps) or a dict (a step the keys are added to). Expected: VALID, or text the
# refusal must contain.
_SHARED = {  # pages whose examples are the same in both versions, by index
    "PIPELINE_ARCHITECTURE": {
        0: ("config", VALID),
        1: ("config", "at least one training mode"),  # steps of placeholders only
        2: (STEP, VALID),
        3: (STEP, VALID),
        4: (VAE, "cannot freeze and train the same component: ['expander']"),
        5: (VAE, VALID),
        6: (ALL, VALID),
        7: (VAE, VALID),
        8: (VAE, VALID),
        9: (VAE, VALID),
        10: ("config", VALID),
    },
}
EXAMPLES: dict[tuple[str, str, int], tuple[Any, str | None]] = {
    ("0.2.1", "README.md", 0): ("config", VALID),  # the flow trains after step 1 froze it
    ("0.2.1", "README.md", 1): ("config", VALID),
    ("0.2.1", "README.md", 2): ("config", VALID),  # reduced_min_sizes: null
    ("0.2.1", "README.md", 3): ("config", VALID),
    # The wrong and the right form side by side; the last 'training' wins: a step with
    # neither n_epochs nor a mode, which the reference refuses too.
    ("0.2.1", "README.md", 4): ("config", "n_epochs is required"),
    **{("0.2.1", "docs/PIPELINE_ARCHITECTURE.md", i): v
       for i, v in _SHARED["PIPELINE_ARCHITECTURE"].items()},
    ("0.2.1", "docs/PIPELINE_ARCHITECTURE.md", 11): ("training", "n_epochs is required"),
    # training.output_path and stop_condition: keys the reference never reads.
    ("0.2.1", "docs/TRAINING_GUIDE.md", 0): ("config", "'training.output_path'"),
    ("0.2.1", "docs/TRAINING_GUIDE.md", 1): ("config", VALID),
    ("0.2.1", "docs/TRAINING_GUIDE.md", 2): ("steps", VALID),
    ("0.2.1", "docs/TRAINING_GUIDE.md", 3): ("config", "'training.output_path'"),

    ("0.8.1", "README.md", 0): ("config", VALID),
    ("0.8.1", "README.md", 1): ("config", VALID),
    ("0.8.1", "README.md", 2): ("config", f"use_ema' is a {LATER}"),
    ("0.8.1", "README.md", 3): ("config", VALID),
    ("0.8.1", "README.md", 4): ("config", VALID),
    ("0.8.1", "docs/CFG_MEMORY_VALIDATION.md", 0): ("config", f"use_ema' is a {LATER}"),
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 0): ("config", f"datasets' is a {LATER}"),
    **{("0.8.1", "docs/MULTI_DATASET_TRAINING.md", i): ("training", f"datasets' is a {LATER}")
       for i in (1, 2, 3, 4, 5, 6, 9)},
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 7): ("config", "steps[0].batch_size'"),
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 8): ("training", NOT_YAML),  # "..." in a map
    # The body of an optimizer/scheduler JSON file written as YAML, not a config.
    ("0.8.1", "docs/OPTIMIZERS.md", 0): ("config", "unknown top-level key 'optimizer_config'"),
    **{("0.8.1", "docs/PIPELINE_ARCHITECTURE.md", i): v
       for i, v in _SHARED["PIPELINE_ARCHITECTURE"].items()},
    ("0.8.1", "docs/PIPELINE_ARCHITECTURE.md", 11): ("training", "n_epochs is required"),
    ("0.8.1", "docs/PIPELINE_ARCHITECTURE.md", 12): ("training", VALID),
    ("0.8.1", "docs/PIPELINE_ARCHITECTURE.md", 13): ("training", "n_epochs is required"),
    ("0.8.1", "docs/SCHEDULERS.md", 0): ("config", "unknown top-level key 'scheduler_config'"),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 0): ("training", VALID),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 1): (VAE, VALID),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 2): ("data", VALID),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 3): (STEP, VALID),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 4): (VAE, VALID),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 5): ("model", VALID),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 6): ("training", VALID),
    # Inline optimizers with 'optimizer_type': the reference reads neither (only
    # optimization.optimizers with 'type').
    ("0.8.1", "docs/TRAINING_GUIDE.md", 7): ("config", "optimizer_type"),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 8): ("config", "optimizer_type"),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 9): ("config", "unknown top-level key 'optimizer_config'"),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 10): (VAE, VALID),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 11): ("training", "n_epochs is required"),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 12): ("config", "'training.output_path'"),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 13): ("config", VALID),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 14): ("steps", VALID),
    ("0.8.1", "docs/TRAINING_GUIDE.md", 15): ("config", "'training.output_path'"),
    # Every loss switch, in a step without n_epochs, which 0.8.1 refuses too.
    ("0.8.1", "docs/VAE_CONTRAST_FIXES.md", 0): ("config", "n_epochs is required"),
    # 'epochs' and 'use_gan' are not keys of either trainer.
    ("0.8.1", "docs/VAE_CONTRAST_FIXES.md", 1): ("training", "'training.pipeline.steps[0].epochs'"),
}

_BLOCK = re.compile(r"```ya?ml\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def examples() -> dict[tuple[str, str, int], str]:
    """Every ```yaml block of each version's README.md and docs/*.md, from its sdist."""
    found = {}
    for version, sha256 in SDISTS.items():
        name = f"fluxflow_training-{version}.tar.gz"
        sdist = pinned.cached(pinned.Pinned("fluxflow-training", version, name, sha256),
                              manual=f"Fetch {name} elsewhere into the cache's downloads folder")
        root = f"fluxflow_training-{version}/"
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                page = member.name.removeprefix(root)
                if page == "README.md" or re.fullmatch(r"docs/[^/]+\.md", page):
                    text = tar.extractfile(member).read().decode("utf-8")
                    for index, block in enumerate(_BLOCK.findall(text)):
                        found[(version, page, index)] = block
    return found


def test_every_example_is_classified(examples):
    assert sorted(examples) == sorted(EXAMPLES)


def _given_data(data: dict[str, Any] | None) -> dict[str, Any]:
    """The example's data section with the demo set as its source."""
    kept = {k: v for k, v in (data or {}).items() if k not in ("data_path", "captions_file")}
    return {**kept, "use_demo": True, "demo_samples": 8}


def _document(where: Any, example: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"training": {"pipeline": {"steps": [VAE]}}}
    if where == "config":
        document = dict(example)
    elif where == "steps":  # steps shown for their modes: n_epochs left out for brevity
        document = {"training": {"pipeline": {"steps": [{**STEP, **s} for s in example]}}}
    elif where in ("training", "model", "data"):
        document = {**base, where: {**base.get(where, {}), **example}}
        if where == "training" and isinstance(example.get("steps"), list):
            document["training"] = {"pipeline": example}  # a pipeline section's keys
    else:
        document = {"training": {"pipeline": {"steps": [{**where, **example}]}}}
    document["data"] = _given_data(document.get("data"))
    training = document.get("training")
    if isinstance(training, dict):
        document["training"] = {**training, "devices": 1}
    return document


def _refusal(path: Path) -> str:
    try:
        plan = check_run(load_config(path))
    except ConfigError as err:
        return "\n".join(err.problems)
    return "\n".join(plan.problems)


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: f"{k[0]}:{k[1]}#{k[2]}")
def test_reference_example(examples, key, tmp_path, monkeypatch):
    where, expected = EXAMPLES[key]
    monkeypatch.chdir(tmp_path)  # the examples' optim_sched_config files, given empty
    for name in ("adam_warmup", "lion_gan", "lion_flow"):
        (tmp_path / "configs").mkdir(exist_ok=True)
        (tmp_path / "configs" / f"{name}.json").write_text(json.dumps({}))
    block = tmp_path / "block.yaml"
    block.write_text(examples[key])
    if expected is NOT_YAML:
        with pytest.raises(YamlFileError, match=f"{block}:6: {NOT_YAML}"):
            read_yaml(block)
        return
    example, _ = read_yaml(block)  # YAML 1.2 numbers (lr: 1e-5), as a config file is read
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(_document(where, example)))
    refusal = _refusal(path)
    if expected is VALID:
        assert refusal == ""
    else:
        assert expected in refusal
