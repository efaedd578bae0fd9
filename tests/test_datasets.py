"""Named datasets (fluxflow-training 0.8.1's ``training.pipeline.datasets``): each step reads
its own (or the default) with that dataset's batch size and workers, the ``noise`` type
gives the reference's noise images, and a pipeline over several datasets, killed mid-run,
resumes to the losses and files of a run never interrupted. Per-step ``use_ema`` too."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fluxflow_jax.cli import main
from fluxflow_jax.data import DataLoader, DemoSource, LoaderConfig, NoiseSource
from fluxflow_jax.data.noise import noise_pixels
from fluxflow_jax.data.tokenizer import Tokenizer
from fluxflow_jax.pipeline.config import ConfigError, load_config
from fluxflow_jax.pipeline.plan import check_run
from fluxflow_jax.pipeline.run import Run
from fluxflow_jax.pipeline.setup import Loaders
from pipeline_helpers import DATA, TINY_MODEL, assert_same_losses
from test_pipeline_resume import ENV, _digest, _wait_for_batches

pytestmark = pytest.mark.filterwarnings("ignore:.*PyTorch fluxflow cannot rebuild")
SHAPES = 6  # images in the local folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict[str, str]:
    """A local dataset: demo images as PNG files, 32 px high, two widths (two buckets)."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    source, lines = DemoSource(SHAPES, image_size=32, aspect_ratios=(1.0, 1.5)), []
    for index in range(SHAPES):
        sample = source[index]
        Image.fromarray(sample.image).save(root / "images" / f"{index}.png")
        lines.append(f"{index}.png\t{sample.caption}")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return {"image_folder": str(root / "images"), "captions_file": str(root / "captions.txt")}


def write(tmp_path: Path, steps: list[dict], datasets: dict[str, dict], *,
          name: str = "run", default: str | None = None, **training: Any) -> Path:
    pipeline: dict[str, Any] = {"defaults": {"lr": 1.0e-3}, "steps": steps,
                                "datasets": datasets}
    if default:
        pipeline["default_dataset"] = default
    document = {"model": TINY_MODEL, "data": DATA,
                "training": {"batch_size": 2, "devices": 1, **training, "pipeline": pipeline},
                "output": {"output_path": str(tmp_path / name), "log_interval": 1,
                           "checkpoint_save_interval": 1, "generate_diagrams": False,
                           "no_samples": True}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_each_step_reads_its_dataset_with_its_batching(tmp_path, folder):
    """A step's own dataset, else default_dataset; batch size and workers from the dataset,
    else the run; gradient accumulation multiplies the dataset's batch; loaders shared by
    steps reading the same data the same way."""
    datasets = {"shapes": {"type": "local", **folder, "batch_size": 3, "workers": 2},
                "noise": {"type": "noise", "dimensions": [32, 48], "num_samples": 8}}
    steps = [{"name": "a", "n_epochs": 1, "train_vae": True, "dataset": "shapes"},
             {"name": "b", "n_epochs": 1, "train_vae": True},
             {"name": "c", "n_epochs": 1, "train_vae": True, "dataset": "shapes"},
             {"name": "d", "n_epochs": 1, "train_vae": True, "dataset": "shapes",
              "gradient_accumulation_steps": 2}]
    config = load_config(write(tmp_path, steps, datasets, default="noise", workers=4))
    plan = check_run(config)
    assert plan.problems == []
    assert [(s.feed.dataset, s.feed.batch_size, s.feed.workers) for s in plan.stages] == \
        [("shapes", 3, 2), ("noise", 2, 4), ("shapes", 3, 2), ("shapes", 3, 2)]
    loaders = Loaders(config)
    shapes, noise, again = (loaders.for_step(step, 1) for step in config.steps()[:3])
    accumulating = loaders.for_step(config.steps()[3], 2)
    assert again is shapes and accumulating.config.batch_size == 6
    assert isinstance(noise.source, NoiseSource) and len(shapes.source) == SHAPES
    # The folder's two sizes are bucketed apart at its own batch size.
    batches = list(shapes.epoch(0))
    assert [b.images.shape[0] for b in batches] == [3] * len(batches)
    assert {b.images.shape[1:3] for b in batches} <= {(32, 32), (32, 48)}
    assert [s.batches_per_epoch for s in plan.stages] == \
        [len(batches), 4, len(batches), accumulating.batches_per_epoch()]


def test_without_a_dataset_a_step_reads_the_data_section(tmp_path, folder):
    steps = [{"name": "a", "n_epochs": 1, "train_vae": True}]
    config = load_config(write(tmp_path, steps, {"shapes": {"type": "local", **folder}}))
    [stage] = check_run(config).stages
    assert (stage.feed.dataset, stage.feed.batch_size) == (None, 2)
    assert isinstance(Loaders(config).for_step(config.steps()[0], 1).source, DemoSource)


def test_a_data_dataset_reads_the_data_section_at_its_own_batch_size(tmp_path):
    """`type: data`: the data section's samples, batched apart from the steps reading the
    section itself."""
    steps = [{"name": "a", "n_epochs": 1, "train_vae": True},
             {"name": "b", "n_epochs": 1, "train_vae": True, "dataset": "wide"}]
    config = load_config(write(tmp_path, steps, {"wide": {"type": "data", "batch_size": 4}}))
    plan = check_run(config)
    assert plan.problems == []
    assert [(s.feed.dataset, s.feed.batch_size) for s in plan.stages] == \
        [(None, 2), ("wide", 4)]
    section, wide = (Loaders(config).for_step(step, 1) for step in config.steps())
    assert wide is not section and isinstance(wide.source, DemoSource)
    captions = [sorted(c for b in loader.epoch(0) for c in b.captions)
                for loader in (section, wide)]
    assert captions[0] == captions[1] and len(captions[0]) == DATA["demo_samples"]
    assert [s.batches_per_epoch for s in plan.stages] == \
        [DATA["demo_samples"] // 2, DATA["demo_samples"] // 4]


@pytest.mark.parametrize("datasets, step, message", [
    ({}, {"dataset": "missing"}, "'training.pipeline.steps[0].dataset' names the dataset "
     "'missing', which training.pipeline.datasets does not define; define it under "
     "training.pipeline.datasets"),
    ({"noise": {"type": "noise", "dimensions": [32]}}, {},
     "'training.pipeline.datasets.noise.dimensions' must be [height, width]"),
    ({"web": {"type": "webdataset"}}, {},
     "'training.pipeline.datasets.web' is of type webdataset, which needs 'webdataset_url'"),
    ({"web": {"type": "web"}}, {}, "'training.pipeline.datasets.web.type' must be one of "
     "['local', 'webdataset', 'noise', 'data'], got 'web'"),
    ({"local": {"image_folder": "x", "captions_file": "y", "noise_std": 2.0}}, {},
     "'training.pipeline.datasets.local.noise_std' applies to datasets of type noise, and "
     "this one is local"),
])
def test_dataset_mistakes_are_named(tmp_path, datasets, step, message):
    steps = [{"name": "a", "n_epochs": 1, "train_vae": True, **step}]
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, steps, datasets))
    [problem] = raised.value.problems
    assert message in problem


def test_a_missing_dataset_folder_is_named_with_its_key(tmp_path):
    datasets = {"gone": {"image_folder": str(tmp_path / "nowhere"), "captions_file": "x"}}
    steps = [{"name": "a", "n_epochs": 1, "train_vae": True, "dataset": "gone"}]
    problems = check_run(load_config(write(tmp_path, steps, datasets))).problems
    assert problems == [f"training.pipeline.datasets.gone: image folder {tmp_path / 'nowhere'} "
                        "is not a directory"]


def test_noise_pixels_are_the_reference_formula():
    """The same Gaussian draws give the same pixels as 0.8.1's NoiseDataset computes them
    (clamp to [-3, 3], map onto [0, 1], scale by 255, truncate to bytes)."""
    noise = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0)) * 2.5
    expected = (((torch.clamp(noise, -3.0, 3.0) + 3.0) / 6.0) * 255).byte()
    ours = noise_pixels(noise.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(ours, expected.permute(1, 2, 0).numpy())


def test_noise_samples_are_fixed_uncaptioned_and_trained_on():
    source = NoiseSource(4, height=16, width=24, noise_std=1.0, seed=7)
    first, again = source[1], NoiseSource(4, 16, 24, 1.0, seed=7)[1]
    assert first.image.shape == (16, 24, 3) and first.caption == ""
    assert np.array_equal(first.image, again.image)
    assert not np.array_equal(first.image, source[2].image)
    assert abs(float(first.image.mean()) - 127.5) < 10  # centred on the middle grey
    loader = DataLoader(source, Tokenizer.load(), LoaderConfig(batch_size=2, image_size=16))
    batches = list(loader.epoch(0))
    assert len(batches) == 2 and loader.bad_samples.count == 0  # empty captions kept
    assert batches[0].captions == ("", "")


@pytest.mark.parametrize("use_ema, averaged", [(True, ("compressor", "expander")),
                                               (False, ())])
def test_use_ema_false_keeps_no_averages(tmp_path, use_ema, averaged):
    steps = [{"name": "a", "n_epochs": 1, "train_vae": True, "use_ema": use_ema},
             {"name": "b", "n_epochs": 1, "train_diff": True, "freeze_vae": True,
              "use_ema": use_ema}]
    stages = check_run(load_config(write(tmp_path, steps, {}))).stages
    assert stages[0].ema_components == averaged
    assert stages[1].ema_components == averaged + (("flow_processor", "text_encoder")
                                                   if use_ema else ())


# A VAE step on the image folder (two buckets, batches of 2), then a flow step on the
# default noise dataset (batches of 4), each stopped by max_steps.
MULTI = [{"name": "vae", "n_epochs": 1, "max_steps": 3, "train_vae": True,
          "dataset": "shapes"},
         {"name": "flow", "n_epochs": 2, "max_steps": 3, "train_diff": True,
          "freeze_vae": True}]


def test_a_killed_multi_dataset_pipeline_resumes_exactly_and_exports(tmp_path, folder):
    datasets = {"shapes": {"type": "local", **folder},
                "noise": {"type": "noise", "dimensions": [32, 32], "num_samples": 8,
                          "batch_size": 4}}
    config = {"steps": MULTI, "datasets": datasets, "default": "noise"}
    whole = write(tmp_path, name="whole", **config)
    killed = write(tmp_path, name="killed", **config)
    Run(load_config(whole), echo=lambda line: None).run()  # compiles into the cache

    process = subprocess.Popen([sys.executable, "-m", "fluxflow_jax.cli", "train", "--config",
                                str(killed)], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _wait_for_batches(process, tmp_path / "killed", 4)  # into the flow step
    time.sleep(np.random.default_rng(1).uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    finish = subprocess.run([sys.executable, "-m", "fluxflow_jax.cli", "train", "--config",
                             str(killed)], env=ENV, capture_output=True, timeout=600)
    assert finish.returncode == 0, finish.stderr.decode()[-2000:]

    assert_same_losses(tmp_path / "killed", tmp_path / "whole")
    assert _digest(tmp_path / "killed") == _digest(tmp_path / "whole")
    assert "flxflow_final.safetensors" in _digest(tmp_path / "whole")
    assert main(["export", str(tmp_path / "killed"), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "flxflow_final.safetensors").is_file()
