"""tools/torch_trainer_compare.py's inputs for the PyTorch trainer (fluxflow-training 0.8.1):
the pipeline YAML it writes parses with the trainer's own config parser and model config
into the same steps, epochs, learning rates and frozen parts as ours; the image folder
and tokenizer it writes give the trainer's tokenizer call the caption ids ours gives."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from fluxflow.config import ModelConfig
from PIL import Image
from transformers import AutoTokenizer

from fluxflow_jax.data import DemoSource, Tokenizer
from fluxflow_jax.pipeline.config import read_config

ROOT = Path(__file__).resolve().parents[1]


def _load(location: Path, name: str) -> types.ModuleType:
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name,
                                                                                   location))
    module.__spec__.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load(ROOT / "tools" / "torch_trainer_compare.py", "torch_trainer_compare")


@pytest.fixture(scope="module")
def parse_pipeline_config(monkeypatch_module):
    """The trainer's pipeline_config.py, run alone: the trainer package's __init__ and
    fluxflow.utils import torchvision, which does not load beside the CPU torch; the file
    needs only fluxflow.utils' logger, given here from fluxflow's own logger file."""
    fluxflow_dir = Path(importlib.util.find_spec("fluxflow").submodule_search_locations[0])
    utils = types.ModuleType("fluxflow.utils")
    vars(utils).update(vars(_load(fluxflow_dir / "utils" / "logger.py",
                                  "fluxflow_utils_logger")))
    monkeypatch_module.setitem(sys.modules, "fluxflow.utils", utils)
    trainer_dir = Path(importlib.util.find_spec("fluxflow_training")
                       .submodule_search_locations[0])
    return _load(trainer_dir / "training" / "pipeline_config.py",
                 "fluxflow_training_pipeline_config").parse_pipeline_config


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_trainer_yaml_parses_into_the_same_pipeline(tool, parse_pipeline_config, tmp_path):
    ours = tool.with_epochs(tool.comparable(yaml.safe_load(
        (ROOT / "configs" / "quickstart.yaml").read_text())), {"flow": 2})
    written = tool.trainer_config(ours, images=tmp_path / "images",
                                  captions=tmp_path / "captions.txt",
                                  tokenizer=tmp_path / "tokenizer", output=tmp_path / "run")
    document = yaml.safe_load(yaml.safe_dump(written))  # what the trainer reads back

    model = ModelConfig(**document["model"])
    assert (model.model_type, model.model_version, model.vae_dim, model.feature_maps_dim,
            model.text_embedding_dim) == ("bezier", "0.6.0", 16, 32, 32)
    assert document["data"]["img_size"] == 32 and document["training"]["batch_size"] == 4

    pipeline = parse_pipeline_config(document["training"]["pipeline"])
    ours_steps = read_config(ours).training.pipeline.steps
    assert [s.name for s in pipeline.steps] == [s.name for s in ours_steps]
    assert [s.n_epochs for s in pipeline.steps] == [s.n_epochs for s in ours_steps] \
        == [5, 1, 2]
    assert [s.dataset for s in ours_steps] == [None] * 3  # both read batches of 4
    assert read_config(ours).model_config().flow_noise == "gaussian"
    assert [s.max_steps for s in pipeline.steps] == [None, 16, None]
    assert all(s.batch_size == 4 and s.workers == 0 and s.lr == 2e-3 and not s.use_lpips
               for s in pipeline.steps)
    vae, gan, flow = pipeline.steps
    assert vae.train_vae and vae.train_spade and not vae.gan_training
    assert gan.gan_training and gan.lambda_adv == 0.1 and gan.r1_interval == 4
    assert gan.optimization.optimizers["vae"].lr == 2e-4
    assert gan.optimization.optimizers["vae"].betas == (0.5, 0.999)
    assert flow.train_diff and flow.cfg_dropout_prob == 0.1
    assert flow.freeze == ["compressor", "expander"] and not flow.train_vae
    # every model a step trains has a scheduler (the trainer's VAE step needs one)
    assert set(vae.optimization.schedulers) == {"vae"}
    assert set(gan.optimization.schedulers) == {"vae", "discriminator"}
    assert set(flow.optimization.schedulers) == {"flow"}
    assert flow.optimization.schedulers["flow"].type == "CosineAnnealingLR"


def test_image_folder_and_tokenizer_give_the_trainer_our_samples(tool, tmp_path):
    data = read_config({"data": {"use_demo": True, "demo_samples": 5, "img_size": 32}}).data
    images, captions = tool.write_image_folder(data, tmp_path / "data")
    source = DemoSource(length=5, image_size=32, seed=data.seed)
    lines = captions.read_text().splitlines()
    assert len(lines) == 5
    for index, line in enumerate(lines):
        name, caption = line.split("\t")  # the trainer's reading of the file
        assert caption == source[index].caption
        np.testing.assert_array_equal(np.asarray(Image.open(images / name)),
                                      source[index].image)

    theirs = AutoTokenizer.from_pretrained(str(tool.write_tokenizer_dir(tmp_path / "tok")),
                                           local_files_only=True)
    texts = [line.split("\t")[1] for line in lines]
    encoded = theirs(texts, max_length=32, padding="max_length", truncation=True)
    ids, mask = Tokenizer.load().encode(texts, 32)
    np.testing.assert_array_equal(np.asarray(encoded["input_ids"]), ids)
    np.testing.assert_array_equal(np.asarray(encoded["attention_mask"]), mask.astype(int))


def test_epochs_for_an_unknown_step_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "torch_trainer_compare.py"),
                           "--epochs", "flows=2", "--out", str(tmp_path / "out"),
                           "--record", str(tmp_path / "record.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "--epochs names no step of the config: ['flows']" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "record.jsonl").exists()
