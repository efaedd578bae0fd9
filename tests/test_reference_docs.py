"""The PyTorch trainer's documented configs: every YAML example in ``fluxflow-training``
0.2.1's and 0.8.1's README and docs, read from the pinned sdists at test time.

An example the PyTorch trainer accepts validates here once given data (the built-in demo
set stands in for the data section's image folder, a small folder and a tar shard of it for
the named datasets' folders and shard URLs; the tests' 8 virtual CPU devices are reduced to
one), and its steps read the datasets 0.8.1's own parser assigns them, with the same batch
sizes. One it refuses, or whose keys it silently ignores, is refused here by
``fluxflow-jax validate`` with exit status 2, a message naming the culprit and no traceback;
so is each 0.8.1-only key not supported yet, by name. Fragments (one step's keys, a
section) are checked where their page puts them.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from PIL import Image

import reference_source

from fluxflow_jax import pinned
from fluxflow_jax.cli import main
from fluxflow_jax.data import DemoSource
from fluxflow_jax.pipeline.config import load_config
from fluxflow_jax.pipeline.plan import check_run
from fluxflow_jax.pipeline.yaml_file import YamlFileError, read_yaml

SDISTS = {
    "0.2.1": "2efe94f01507152a5cfe6f4bd8de46dd1ebb18046c5405c5d3dfef50ef2b62fb",
    "0.8.1": "0c8d0524552da940de15afd880a4b88b607a4610b4025b65c655ce808e5af539",
}
VALID = None
NOT_YAML = "not valid YAML"

# A step the fragments of one step's keys are placed in, and its variants.
STEP = {"name": "example", "n_epochs": 1}
VAE = {**STEP, "train_vae": True}
ALL = {**STEP, "train_vae": True, "gan_training": True, "train_diff": True}

# (version, page, index of the ```yaml block on it): (where it goes, what is expected).
# Where: "config" (a whole file), "training" / "model" / "data" (that section), "pipeline"
# (keys of training.pipeline beside a step), "steps" (a list of steps) or a dict (a step the
# keys are added to). Expected: VALID, or text the refusal must contain.
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
    ("0.8.1", "README.md", 2): ("config", VALID),
    ("0.8.1", "README.md", 3): ("config", VALID),
    ("0.8.1", "README.md", 4): ("config", VALID),
    # A step without n_epochs (0.8.1 refuses it), whose batch_size and workers 0.8.1 ignores.
    ("0.8.1", "docs/CFG_MEMORY_VALIDATION.md", 0): ("config", "steps[0].batch_size'"),
    # Placeholder datasets without their required keys, steps without n_epochs or a mode.
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 0): (
        "config", "'training.pipeline.datasets.dataset_name_1' is of type local, which needs "
                  "'image_folder'"),
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 1): ("pipeline", VALID),
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 2): ("pipeline", VALID),
    **{("0.8.1", "docs/MULTI_DATASET_TRAINING.md", i): ("training", VALID) for i in (3, 4, 5)},
    # Steps without n_epochs or a mode (0.8.1 refuses them); a step batch_size it ignores.
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 6): ("training", "steps[1].batch_size'"),
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 7): ("config", "steps[0].batch_size'"),
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 8): ("training", NOT_YAML),  # "..." in a map
    # Datasets given as "..." (0.8.1 fails on them with an AttributeError).
    ("0.8.1", "docs/MULTI_DATASET_TRAINING.md", 9): (
        "pipeline", "'training.pipeline.datasets.dataset1' must be a mapping"),
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


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    """A small image folder, its captions file and a tar shard of it (png + json prompt,
    webdataset's default keys): what a named dataset's paths and URL become."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    source, lines = DemoSource(16, image_size=32), []
    with tarfile.open(root / "shard.tar", "w") as tar:
        for index in range(len(source)):
            sample, image = source[index], io.BytesIO()
            Image.fromarray(sample.image).save(image, format="PNG")
            (root / "images" / f"{index}.png").write_bytes(image.getvalue())
            lines.append(f"{index}.png\t{sample.caption}")
            for suffix, payload in (("png", image.getvalue()),
                                    ("json", json.dumps({"prompt": sample.caption}).encode())):
                member = tarfile.TarInfo(f"{index:04d}.{suffix}")
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return {"image_folder": str(root / "images"), "captions_file": str(root / "captions.txt"),
            "webdataset_url": str(root / "shard.tar")}


def _given_datasets(document: dict[str, Any], files: dict[str, str]) -> None:
    """Each named dataset's folder, captions file and shard URL, where it gives one,
    replaced by ``files``."""
    training = document.get("training")
    pipeline = training.get("pipeline") if isinstance(training, dict) else None
    datasets = pipeline.get("datasets") if isinstance(pipeline, dict) else None
    for dataset in (datasets or {}).values() if isinstance(datasets, dict) else ():
        if isinstance(dataset, dict):
            dataset.update({key: path for key, path in files.items() if key in dataset})


def _document(where: Any, example: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"training": {"pipeline": {"steps": [VAE]}}}
    if where == "config":
        document = dict(example)
    elif where == "steps":  # steps shown for their modes: n_epochs left out for brevity
        document = {"training": {"pipeline": {"steps": [{**STEP, **s} for s in example]}}}
    elif where == "pipeline":
        document = {"training": {"pipeline": {"steps": [VAE], **example}}}
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


def _reference_parser() -> Callable[[dict], Any]:
    """fluxflow-training 0.8.1's own parser of a training.pipeline section."""
    with reference_source.fluxflow_utils():
        module = reference_source.source_file(
            "fluxflow_training", "training/pipeline_config.py", "fluxflow_training_pipeline")
    return module.parse_pipeline_config


def _assert_same_meaning(document: dict[str, Any], path: Path) -> None:
    """Each step reads the dataset 0.8.1 assigns it (its own, else default_dataset, else
    the data section), with the batch size 0.8.1 gives it (the dataset's, else the run's),
    and keeps averages unless 0.8.1's use_ema is off."""
    training = document["training"]
    reference = _reference_parser()(training["pipeline"])
    plan = check_run(load_config(path))
    for ours, theirs in zip(plan.stages, reference.steps, strict=True):
        name = theirs.dataset or reference.default_dataset
        batch_size = training.get("batch_size", 2)
        if name:
            batch_size = reference.datasets[name].batch_size or batch_size
        assert (ours.feed.dataset, ours.feed.batch_size) == (name, batch_size), ours.label
        assert ours.step.use_ema == theirs.use_ema, ours.label


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: f"{k[0]}:{k[1]}#{k[2]}")
def test_reference_example(examples, data_files, key, tmp_path, monkeypatch, capsys):
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
    document = _document(where, example)
    _given_datasets(document, data_files)
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(document))
    status = main(["validate", str(path)])
    printed = "".join(capsys.readouterr())
    assert "Traceback" not in printed
    if expected is VALID:
        assert status == 0, printed
        if key[0] == "0.8.1" and "pipeline" in document["training"]:
            _assert_same_meaning(document, path)
    else:
        assert status == 2 and expected in printed, printed
