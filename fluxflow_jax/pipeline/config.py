"""The run configuration: one schema for the YAML file and the command line.

A config has the sections ``model``, ``data``, ``training`` (with ``training.pipeline``
for pipeline mode), ``output``, the legacy ``optimization.optim_sched_config`` and a top-level
``model_checkpoint``. Reading one collects every problem (unknown keys with the closest valid
name, wrong types) and reports them together, each with its file and line. Whether the
stages it describes can run (modes, freezing, transitions, optimizers) is checked when they
are built (``fluxflow_jax.pipeline.stages``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxflow_jax.checks import (Check, check_bool, check_seed, in_interval, integer_at_least,
                                 one_of, optional)
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.pipeline.flags import flag_name
from fluxflow_jax.pipeline.yaml_file import KeyPath, read_yaml
from fluxflow_jax.suggest import did_you_mean
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.modes import STEP_MODES
from fluxflow_jax.training.vae_step import VAEOptions


class ConfigError(ValueError):
    """Every problem of a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


# ----------------------------------------------------------------------------- checks

def check_str(key: str, value: Any) -> str | None:
    return None if isinstance(value, str) else f"'{key}' must be a string, got {value!r}"


def check_str_list(key: str, value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return None
    return f"'{key}' must be a list of names, e.g. [compressor, expander], got {value!r}"


def check_mapping(key: str, value: Any) -> str | None:
    return None if isinstance(value, Mapping) else f"'{key}' must be a mapping, got {value!r}"


def check_int_list(key: str, value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return f"'{key}' must be a list of integers, got {value!r}"


def _check_sizes(key: str, value: Any) -> str | None:
    """Sample sizes: integers, "WxH" strings or [W, H] pairs."""
    def size(item: Any) -> bool:
        if isinstance(item, int) and not isinstance(item, bool):
            return item > 0
        if isinstance(item, str):
            return re.fullmatch(r"\d+x\d+", item) is not None
        return isinstance(item, (list, tuple)) and len(item) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item)
    if isinstance(value, (list, tuple)) and all(size(v) for v in value):
        return None
    return f"'{key}' must be a list of sizes (512, \"512x384\" or [512, 384]), got {value!r}"


def _check_step_range(key: str, value: Any) -> str | None:
    """Global steps as a slice, "A:B" with A < B."""
    match = re.fullmatch(r"(\d+):(\d+)", value) if isinstance(value, str) else None
    if match and int(match.group(1)) < int(match.group(2)):
        return None
    return (f"'{key}' must be 'A:B' with 0 <= A < B (e.g. 10:15 traces global steps 11 "
            f"to 15), got {value!r}")


# Checks of list keys: for each of them, null means the empty list ("none").
LIST_CHECKS: tuple[Check, ...] = (check_str_list, check_int_list)


_POSITIVE = in_interval("(0, inf)", 1.0)
_OPTIONAL_POSITIVE_INT = optional(integer_at_least(1))


# ----------------------------------------------------------------------------- schema

@dataclass(frozen=True)
class TransitionConfig:
    """When a step hands over to the next: after its epochs (``epoch``), or as soon as the
    smoothed ``metric`` stays below (or, with ``comparison: ">"``, above) ``threshold``
    (``loss_threshold``)."""

    mode: str = "epoch"
    metric: str | None = None
    threshold: float | None = None
    comparison: str = "<"  # ">" for metrics that grow as the model learns (val_psnr)
    min_epochs: int = 0  # epochs before the threshold is looked at
    max_epochs: int | None = None  # None: the step's n_epochs
    patience: int = 1  # consecutive epoch ends the threshold must hold at


TRANSITION_CHECKS: dict[str, Check] = {
    "mode": one_of(("epoch", "loss_threshold")), "metric": optional(check_str),
    "threshold": optional(in_interval("(-inf, inf)", 0.01)), "comparison": one_of(("<", ">")),
    "min_epochs": integer_at_least(0), "max_epochs": _OPTIONAL_POSITIVE_INT,
    "patience": integer_at_least(1)}

# Loss settings a step may give, routed to the train step's option objects.
_VAE_MODE_FIELDS = ("train_reconstruction", "use_gan", "train_spade", "use_lpips")
VAE_LOSS_KEYS = tuple(f.name for f in dataclasses.fields(VAEOptions)
                      if f.name not in _VAE_MODE_FIELDS)
FLOW_LOSS_KEYS = {"lambda_align": "lambda_align", "cfg_dropout_prob": "cfg_dropout_prob",
                  "cfg_dropout_schedule": "cfg_dropout_schedule",
                  "flow_ema_decay": "ema_decay", "timestep_sampling": "timestep_sampling",
                  "flow_loss": "flow_loss", "num_train_timesteps": "num_train_timesteps",
                  "start_step": "start_step"}  # step key -> FlowOptions field


def _option_checks() -> dict[str, Check]:
    """Type checks of the loss keys; their ranges are checked by the option objects."""
    checks: dict[str, Check] = {}
    for options, names in ((VAEOptions(), {k: k for k in VAE_LOSS_KEYS}),
                           (FlowOptions(), FLOW_LOSS_KEYS)):
        for key, name in names.items():
            default = getattr(options, name)
            checks[key] = (check_bool if isinstance(default, bool) else
                           integer_at_least(0) if isinstance(default, int) else
                           check_str if isinstance(default, str) else
                           optional(in_interval("(-inf, inf)", default or 0.999)))
    return checks


@dataclass(frozen=True)
class StepConfig:
    """One pipeline step (or the single step of standard mode)."""

    name: str = ""
    description: str = ""
    n_epochs: int | None = None
    max_steps: int | None = None  # end the step after this many batches
    train_vae: bool = False
    train_reconstruction: bool | None = None  # None: as train_vae
    gan_training: bool = False
    train_spade: bool = False
    use_lpips: bool = False
    train_diff: bool = False
    train_diff_full: bool = False
    train_flow: bool = False
    freeze_vae: bool | None = None  # None: unchanged from the step before
    freeze_flow: bool | None = None
    freeze_text_encoder: bool | None = None
    freeze: tuple[str, ...] = ()
    unfreeze: tuple[str, ...] = ()
    losses: Mapping[str, Any] = field(default_factory=dict)  # VAE_LOSS_KEYS / FLOW_LOSS_KEYS
    optimizers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    schedulers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    optim_sched_config: str | None = None  # per-model JSON file
    lr: float | None = None  # learning rate of the default optimizers
    lr_min: float | None = None  # eta_min_factor of the default cosine schedules
    initial_clipping_norm: float | None = None  # None: the run's
    gradient_accumulation_steps: int | None = None  # None: the run's
    cache_latents: bool = False  # encode each image once (frozen compressor, flow only)
    use_ema: bool = True  # false: the step keeps no averages (ema_decay and flow_ema_decay off)
    dataset: str | None = None  # a name in training.pipeline.datasets; None: the default
    transition_on: TransitionConfig = TransitionConfig()
    origin: str = field(default="", compare=False)  # "file:line", for messages


STEP_CHECKS: dict[str, Check] = {
    "name": check_str, "description": check_str, "n_epochs": _OPTIONAL_POSITIVE_INT,
    "max_steps": _OPTIONAL_POSITIVE_INT,
    **{key: check_bool for key in (*STEP_MODES, "use_lpips")},
    **{key: optional(check_bool) for key in ("train_reconstruction", "freeze_vae",
                                             "freeze_flow", "freeze_text_encoder")},
    "freeze": check_str_list, "unfreeze": check_str_list,
    "optimizers": check_mapping, "schedulers": check_mapping,
    "optim_sched_config": optional(check_str), "lr": optional(_POSITIVE),
    "lr_min": optional(in_interval("[0, 1]", 0.1)),
    "initial_clipping_norm": optional(_POSITIVE),
    "gradient_accumulation_steps": _OPTIONAL_POSITIVE_INT, "cache_latents": check_bool,
    "use_ema": check_bool, "dataset": optional(check_str), **_option_checks()}
MODE_KEYS = (*STEP_MODES, "use_lpips", "train_reconstruction")


@dataclass(frozen=True)
class DatasetConfig:
    """One named dataset of ``training.pipeline.datasets``: an image folder (``local``), tar
    shards (``webdataset``) or synthetic Gaussian noise (``noise``), read with the data
    section's image and caption settings, with its own batch size and workers if given."""

    type: str = "local"
    image_folder: str | None = None  # local
    captions_file: str | None = None  # local
    webdataset_url: str | None = None
    webdataset_token: str | None = None
    webdataset_image_key: str = "png"
    webdataset_label_key: str = "json"
    webdataset_caption_key: str = "prompt"
    webdataset_size: int = 10000  # samples per epoch
    webdataset_samples_per_shard: int = 1000
    dimensions: tuple[int, ...] = (512, 512)  # noise: [height, width]
    num_samples: int = 10000  # noise
    noise_std: float = 1.0  # noise
    batch_size: int | None = None  # None: training.batch_size
    workers: int | None = None  # None: training.workers


def _check_dimensions(key: str, value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in value):
        return None
    return f"'{key}' must be [height, width], two integers >= 16, got {value!r}"


DATASET_TYPES = {  # type -> the keys that belong to it (the others are common)
    "local": ("image_folder", "captions_file"),
    "webdataset": ("webdataset_url", "webdataset_token", "webdataset_image_key",
                   "webdataset_label_key", "webdataset_caption_key", "webdataset_size",
                   "webdataset_samples_per_shard"),
    "noise": ("dimensions", "num_samples", "noise_std")}
DATASET_REQUIRED = {"local": ("image_folder", "captions_file"), "webdataset": ("webdataset_url",),
                    "noise": ()}
DATASET_CHECKS: dict[str, Check] = {
    "type": one_of(tuple(DATASET_TYPES)),
    **{key: optional(check_str) for key in ("image_folder", "captions_file", "webdataset_url",
                                            "webdataset_token")},
    **{key: check_str for key in ("webdataset_image_key", "webdataset_label_key",
                                  "webdataset_caption_key")},
    "webdataset_size": integer_at_least(1), "webdataset_samples_per_shard": integer_at_least(1),
    "dimensions": _check_dimensions, "num_samples": integer_at_least(1),
    "noise_std": in_interval("(0, inf)", 1.0),
    "batch_size": _OPTIONAL_POSITIVE_INT, "workers": _OPTIONAL_POSITIVE_INT}


@dataclass(frozen=True)
class Feed:
    """What a step reads: a named dataset (None: the data section) and its batching."""

    dataset: str | None
    batch_size: int
    workers: int


@dataclass(frozen=True)
class PipelineConfig:
    steps: tuple[StepConfig, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    datasets: Mapping[str, DatasetConfig] = field(default_factory=dict)
    default_dataset: str | None = None  # for steps without 'dataset'; None: the data section


@dataclass(frozen=True)
class DataConfig:
    """Where the images and captions come from, and how they become batches."""

    data_path: str | None = None
    captions_file: str | None = None
    fixed_prompt_prefix: str | None = None
    use_webdataset: bool = False
    webdataset_url: str = "hf://datasets/jackyhate/text-to-image-2M/data_512_2M/*.tar"
    webdataset_token: str | None = None
    webdataset_image_key: str = "png"
    webdataset_label_key: str = "json"
    webdataset_caption_key: str = "prompt"
    webdataset_size: int | None = None
    webdataset_samples_per_shard: int = 10000
    tfds_name: str | None = None
    tfds_split: str = "train"
    tfds_data_dir: str | None = None
    tfds_image_key: str = "image"
    tfds_caption_key: str = "caption"
    use_demo: bool = False  # the built-in synthetic dataset
    demo_samples: int = 256
    validation_samples: int = 32  # held out for evaluation (demo: the indices after demo_samples)
    img_size: int = 1024  # short side of the training images
    fixed_size: bool = False  # square img_size crops instead of aspect buckets
    reduced_min_sizes: tuple[int, ...] = ()
    channels: int = 3
    tokenizer_name: str | None = None  # vocab path; None or a hub name: the default lookup
    max_length: int = 128
    seed: int = 42
    on_bad_sample: str = "skip"
    dataloader_max_retries: int = 5  # accepted for reference configs; unused
    dataloader_retry_delay: float = 5.0  # accepted for reference configs; unused


DATA_CHECKS: dict[str, Check] = {
    **{key: optional(check_str) for key in ("data_path", "captions_file",
                                            "fixed_prompt_prefix", "webdataset_token",
                                            "tfds_name", "tfds_data_dir", "tokenizer_name")},
    **{key: check_str for key in ("webdataset_url", "webdataset_image_key",
                                  "webdataset_label_key", "webdataset_caption_key",
                                  "tfds_split", "tfds_image_key", "tfds_caption_key")},
    **{key: check_bool for key in ("use_webdataset", "use_demo", "fixed_size")},
    "webdataset_size": _OPTIONAL_POSITIVE_INT,
    "webdataset_samples_per_shard": integer_at_least(1), "demo_samples": integer_at_least(1),
    "validation_samples": integer_at_least(1),
    "img_size": integer_at_least(16), "reduced_min_sizes": check_int_list,
    "channels": integer_at_least(1), "max_length": integer_at_least(2),
    "seed": check_seed, "on_bad_sample": one_of(("skip", "error")),
    "dataloader_max_retries": integer_at_least(0),
    "dataloader_retry_delay": in_interval("[0, inf)", 5.0)}
DATA_ALIASES = {"use_tt2m": "use_webdataset", "tt2m_token": "webdataset_token"}


@dataclass(frozen=True)
class OutputConfig:
    output_path: str = "outputs"
    log_interval: int = 10  # batches between console lines and metrics records
    checkpoint_save_interval: int = 50  # batches between checkpoints
    validation_interval: int | None = None  # batches between held-out validations; None: off
    keep_last: int = 3  # run checkpoints kept
    generate_diagrams: bool = True  # training graphs at every step end
    samples_per_checkpoint: int = 1
    sample_interval: int | None = None  # global steps between samples; None: per checkpoint
    no_samples: bool = False
    test_image_address: tuple[str, ...] = ()
    sample_captions: tuple[str, ...] = ("A sample caption",)
    sample_sizes: tuple[Any, ...] | None = None  # None: data.img_size
    sample_steps: int = 20  # solver steps of the text-to-image samples
    tensorboard: bool | None = None  # event files; None: when tensorboardX is installed
    profile_steps: str | None = None  # "A:B": a jax.profiler trace of global steps A+1..B
    log_level: str = "INFO"
    log_file: str | None = None


OUTPUT_CHECKS: dict[str, Check] = {
    "output_path": check_str, "log_interval": integer_at_least(1),
    "checkpoint_save_interval": integer_at_least(1), "keep_last": integer_at_least(1),
    "validation_interval": _OPTIONAL_POSITIVE_INT,
    "generate_diagrams": check_bool, "samples_per_checkpoint": integer_at_least(0),
    "sample_interval": _OPTIONAL_POSITIVE_INT,
    "no_samples": check_bool, "test_image_address": check_str_list,
    "sample_captions": check_str_list, "sample_sizes": optional(_check_sizes),
    "sample_steps": integer_at_least(1), "tensorboard": optional(check_bool),
    "profile_steps": optional(_check_step_range),
    "log_level": one_of(("DEBUG", "INFO", "WARNING", "ERROR")),
    "log_file": optional(check_str)}


@dataclass(frozen=True)
class TrainingConfig:
    """Run-wide settings; the step keys given here form standard mode's single step."""

    n_epochs: int = 1
    batch_size: int = 2
    workers: int = 1
    lr: float = 5e-4  # the reference's 5e-7 trains nothing in practice (docs/learning.md)
    lr_min: float = 0.1
    preserve_lr: bool = False  # accepted for reference configs: resume restores schedules
    training_steps: int = 1  # updates per batch
    use_fp16: bool = False  # mixed precision, as bf16 (see precision)
    precision: str | None = None  # fp32 | bf16; None: bf16 if use_fp16, else fp32
    remat: bool = False  # recompute block activations in the backward pass (less memory)
    initial_clipping_norm: float = 1.0
    # micro-batches of batch_size per optimizer update (the effective batch: their sum)
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None  # every step ends after this many batches
    seed: int = 0  # model initialisation and training randomness
    devices: int | None = None  # data-parallel devices; None: all
    shard_params: bool = False  # split parameters, moments and EMA over them (FSDP style)
    lpips_weights: str | None = None  # None: the default path (fluxflow-jax lpips-weights)
    # Multi-host (jax.distributed): on, auto-detecting the cluster (SLURM, Open MPI, TPU pods,
    # Kubernetes) unless the coordinator and this process are given.
    distributed: bool = False
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    optim_sched_config: str | None = None
    step: StepConfig = StepConfig()  # standard mode's step
    pipeline: PipelineConfig | None = None

    @property
    def compute_precision(self) -> str:
        """The arithmetic the steps run in: ``precision``, else bf16 for ``use_fp16`` (JAX
        accelerators do mixed precision in bfloat16, which needs no loss scaling)."""
        return self.precision or ("bf16" if self.use_fp16 else "fp32")


TRAINING_CHECKS: dict[str, Check] = {
    "n_epochs": integer_at_least(1), "batch_size": integer_at_least(1),
    "workers": integer_at_least(1), "lr": _POSITIVE, "lr_min": in_interval("[0, 1]", 0.1),
    "preserve_lr": check_bool, "training_steps": integer_at_least(1),
    "use_fp16": check_bool, "precision": optional(one_of(("fp32", "bf16"))),
    "remat": check_bool, "initial_clipping_norm": optional(_POSITIVE),
    "gradient_accumulation_steps": integer_at_least(1),
    "max_steps": _OPTIONAL_POSITIVE_INT, "seed": check_seed,
    "devices": _OPTIONAL_POSITIVE_INT, "shard_params": check_bool,
    "lpips_weights": optional(check_str),
    "distributed": check_bool, "coordinator_address": optional(check_str),
    "num_processes": _OPTIONAL_POSITIVE_INT, "process_id": optional(integer_at_least(0)),
    "optim_sched_config": optional(check_str)}
# Run-wide keys the reference also parses (and ignores) in a step.
RUN_ONLY_KEYS = ("batch_size", "workers", "use_fp16", "training_steps", "seed", "devices",
                 "precision", "remat", "shard_params")
# Step keys of a standard-mode run; name, description and transitions belong to pipelines.
STANDARD_STEP_KEYS = tuple(k for k in STEP_CHECKS if k not in TRAINING_CHECKS
                           and k not in ("name", "description", "dataset"))

MODEL_ALIASES = {"feature_maps_dim": "flow_dim", "text_embedding_dim": "text_embed_dim"}
MODEL_IGNORED = ("feature_maps_dim_disc",)  # the reference's unused image-encoder width


@dataclass(frozen=True)
class RunConfig:
    model: Mapping[str, Any] = field(default_factory=dict)  # FluxFlowConfig fields
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    output: OutputConfig = OutputConfig()
    model_checkpoint: str | None = None
    source: str = "command line"  # the config file, for messages

    @property
    def is_pipeline(self) -> bool:
        return self.training.pipeline is not None

    def model_config(self) -> FluxFlowConfig:
        return FluxFlowConfig(**self.model)

    def steps(self) -> tuple[StepConfig, ...]:
        """The steps to run: the pipeline's, or standard mode's one."""
        return self.training.pipeline.steps if self.is_pipeline else (self.training.step,)

    def feed(self, step: StepConfig) -> Feed:
        """The data ``step`` reads: its dataset, else the pipeline's default_dataset, else
        the data section; batched by the dataset's batch_size and workers, else the run's."""
        pipeline = self.training.pipeline
        name = step.dataset or (pipeline.default_dataset if pipeline else None)
        dataset = pipeline.datasets[name] if name else DatasetConfig()
        return Feed(name, dataset.batch_size or self.training.batch_size,
                    dataset.workers or self.training.workers)


# ----------------------------------------------------------------------------- reading

class _Reader:
    """Turns nested mappings into the schema, collecting problems with their lines (a line
    number in ``source``, or a text such as "command line (--lr)" for a flag's value)."""

    def __init__(self, source: str, lines: Mapping[KeyPath, int | str]):
        self.source, self.lines, self.problems = source, lines, []

    def where(self, path: KeyPath) -> str:
        for cut in range(len(path), -1, -1):  # the nearest line known
            if path[:cut] in self.lines:
                line = self.lines[path[:cut]]
                return f"{self.source}:{line}" if isinstance(line, int) else line
        return self.source

    def problem(self, path: KeyPath, message: str) -> None:
        self.problems.append(f"{self.where(path)}: {message}")

    def mapping(self, value: Any, path: KeyPath) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(path, f"'{_dotted(path)}' must be a mapping, got {value!r}")
            return {}
        return value

    def fields(self, value: Mapping[str, Any], path: KeyPath, checks: Mapping[str, Check],
               aliases: Mapping[str, str] = {}, ignored: tuple[str, ...] = ()
               ) -> dict[str, Any]:
        """The checked known keys of ``value``; each unknown or invalid one is a problem."""
        out = {}
        for key, item in value.items():
            name = aliases.get(key, key)
            here = path + (key,)
            if key in ignored:
                continue
            if name not in checks:
                valid = [*checks, *aliases]
                hint = (f"; it is set for the whole run: training.{key}"
                        + (", or per dataset (training.pipeline.datasets)"
                           if key in ("batch_size", "workers") else "")
                        if key in RUN_ONLY_KEYS and path[:1] == ("training",) and len(path) > 1
                        else f"; it belongs in training.pipeline"
                        if key in ("datasets", "default_dataset") and path == ("training",)
                        else did_you_mean(key, valid))
                self.problem(here, f"unknown key '{_dotted(here)}'{hint}")
                continue
            if item is None and checks.get(name) in LIST_CHECKS:
                item = ()
            message = checks[name](_dotted(path + (name,)), item)
            if message:
                self.problem(here, message)
            elif name in out:
                self.problem(here, f"'{_dotted(path + (name,))}' is given twice (as "
                                   f"'{key}' and under another name)")
            else:
                out[name] = tuple(item) if isinstance(item, list) else item
        return out


def _dotted(path: KeyPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


_TRANSITION_TEXT = re.compile(r"\s*([A-Za-z_]\w*)\s*([<>])\s*([-+0-9.eE]+)\s*")


def _read_transition(reader: _Reader, value: Any, path: KeyPath) -> TransitionConfig:
    """A transition mapping, or the short form ``"loss_recon < 0.01"`` / ``"val_psnr > 24"``."""
    if isinstance(value, str):
        match = _TRANSITION_TEXT.fullmatch(value)
        try:
            threshold = float(match.group(3)) if match else None
        except ValueError:
            threshold = None
        if threshold is None:
            reader.problem(path, f"'{_dotted(path)}' must be a mapping such as {{mode: "
                                 f"loss_threshold, metric: loss_recon, threshold: 0.01}} or "
                                 f"the short form \"loss_recon < 0.01\", got {value!r}")
            return TransitionConfig()
        return TransitionConfig(mode="loss_threshold", metric=match.group(1),
                                threshold=threshold, comparison=match.group(2))
    values = reader.fields(reader.mapping(value, path), path, TRANSITION_CHECKS,
                           ignored=("value",))
    return _build(TransitionConfig, values)


def _read_step_fields(reader: _Reader, value: Mapping[str, Any], path: KeyPath,
                      checks: Mapping[str, Check]) -> dict[str, Any]:
    """Step keys, with the reference's ``optimization: {optimizers, schedulers}`` block
    merged into ``optimizers`` / ``schedulers``."""
    value = dict(value)
    nested = reader.mapping(value.pop("optimization", None), path + ("optimization",))
    fields = reader.fields(value, path, {**checks, "transition_on": lambda k, v: None})
    inner = reader.fields(nested, path + ("optimization",),
                          {"optimizers": check_mapping, "schedulers": check_mapping})
    for kind, groups in inner.items():
        if kind in fields:
            reader.problem(path + ("optimization", kind),
                           f"'{kind}' is given both inline and under 'optimization'; keep one")
        else:
            fields[kind] = groups
    return fields


def _make_step(reader: _Reader, fields: Mapping[str, Any], path: KeyPath) -> StepConfig:
    fields = dict(fields)
    losses = {k: fields.pop(k) for k in [*VAE_LOSS_KEYS, *FLOW_LOSS_KEYS] if k in fields}
    transition = fields.pop("transition_on", None)
    step = _build(StepConfig, {**fields, "losses": losses, "origin": reader.where(path)})
    if transition is not None:
        step = dataclasses.replace(
            step, transition_on=_read_transition(reader, transition, path + ("transition_on",)))
    return step


def _read_dataset(reader: _Reader, value: Any, path: KeyPath) -> DatasetConfig:
    """One named dataset; keys of another type than its own, or a missing required key, are
    problems (the reference ignores the first and fails on the second when it trains)."""
    if value is not None and not isinstance(value, Mapping):
        reader.mapping(value, path)  # reports it
        return DatasetConfig()
    value = reader.mapping(value, path)
    fields = reader.fields(value, path, DATASET_CHECKS)
    kind = value.get("type", DatasetConfig.type)
    if kind not in DATASET_TYPES:  # reported by the type check
        return DatasetConfig()
    for key in fields:
        owner = next((t for t, keys in DATASET_TYPES.items() if key in keys), kind)
        if owner != kind:
            reader.problem(path + (key,), f"'{_dotted(path + (key,))}' applies to datasets of "
                                          f"type {owner}, and this one is {kind}; remove it "
                                          "or change 'type'")
    for key in DATASET_REQUIRED[kind]:
        if fields.get(key) is None:
            reader.problem(path, f"'{_dotted(path)}' is of type {kind}, which needs "
                                 f"'{key}'; add it")
    return _build(DatasetConfig, fields)


def _read_datasets(reader: _Reader, value: Mapping[str, Any]
                   ) -> tuple[dict[str, DatasetConfig], str | None]:
    """The pipeline's named datasets and its default_dataset, checked to be one of them."""
    path = ("training", "pipeline")
    datasets = {str(name): _read_dataset(reader, item, path + ("datasets", name))
                for name, item in reader.mapping(value.get("datasets"),
                                                 path + ("datasets",)).items()}
    default = value.get("default_dataset")
    if default is not None and not isinstance(default, str):
        reader.problem(path + ("default_dataset",), f"'training.pipeline.default_dataset' "
                                                    f"must be a dataset name, got {default!r}")
        default = None
    _check_dataset_name(reader, default, datasets, path + ("default_dataset",))
    return datasets, default


def _check_dataset_name(reader: _Reader, name: str | None, datasets: Mapping[str, Any],
                        path: KeyPath) -> None:
    if name is not None and name not in datasets:
        known = (f"; the datasets are {sorted(datasets)}{did_you_mean(name, datasets)}"
                 if datasets else "; define it under training.pipeline.datasets")
        reader.problem(path, f"'{_dotted(path)}' names the dataset '{name}', which "
                             f"training.pipeline.datasets does not define{known}")


def _read_pipeline(reader: _Reader, value: Any, base: Mapping[str, Any]) -> PipelineConfig:
    path = ("training", "pipeline")
    value = reader.mapping(value, path)
    own = ("defaults", "steps", "datasets", "default_dataset")
    reader.fields({k: v for k, v in value.items() if k not in own},
                  path, {"mode": check_str})  # the reference's 'mode' key, unused
    datasets, default_dataset = _read_datasets(reader, value)
    defaults = _read_step_fields(reader, reader.mapping(value.get("defaults"),
                                                        path + ("defaults",)),
                                 path + ("defaults",), STEP_CHECKS)
    steps_value = value.get("steps")
    if not isinstance(steps_value, list) or not steps_value:
        reader.problem(path + ("steps",), "the pipeline has no steps: give "
                       "'training.pipeline.steps' as a list of steps, e.g. [{name: warmup, "
                       "n_epochs: 1, train_vae: true}]")
        return PipelineConfig(steps=(), defaults=defaults, datasets=datasets,
                              default_dataset=default_dataset)
    steps = []
    for index, item in enumerate(steps_value):
        here = path + ("steps", index)
        fields = _read_step_fields(reader, reader.mapping(item, here), here, STEP_CHECKS)
        merged = {**base, **defaults, **fields}
        _check_dataset_name(reader, merged.get("dataset"), datasets, here + ("dataset",))
        steps.append(_make_step(reader, merged, here))
    return PipelineConfig(steps=tuple(steps), defaults=defaults, datasets=datasets,
                          default_dataset=default_dataset)


def _read_model(reader: _Reader, value: Any) -> dict[str, Any]:
    checks = {name: (lambda key, v: None) for name in FluxFlowConfig.__dataclass_fields__}
    checks["pretrained_bert_model"] = lambda key, v: None if v is None else (
        f"'{key}': loading pretrained DistilBERT weights from a hub is not supported; "
        "initialise the text encoder from 'model_checkpoint' instead (or leave it null)")
    fields = reader.fields(reader.mapping(value, ("model",)), ("model",), checks,
                           MODEL_ALIASES, MODEL_IGNORED)
    fields.pop("pretrained_bert_model", None)
    try:
        FluxFlowConfig(**fields)
    except ValueError as err:  # lists every invalid field
        reader.problem(("model",), f"model: {err}")
    return fields


def read_config(document: Any, lines: Mapping[KeyPath, int | str] | None = None,
                source: str = "command line") -> RunConfig:
    """The ``RunConfig`` of a parsed YAML document; ``ConfigError`` lists every problem."""
    reader = _Reader(source, lines or {})
    if document is not None and not isinstance(document, Mapping):
        raise ConfigError([f"{source}: the config must be a mapping of sections (model, data, "
                           f"training, output, ...), got {type(document).__name__}"])
    root = reader.mapping(document, ())
    sections = ("model", "data", "training", "output", "optimization", "model_checkpoint")
    for key in root:
        if key not in sections:
            reader.problem((key,), f"unknown top-level key '{key}'"
                                   f"{did_you_mean(key, sections)}; valid: {list(sections)}")
    model = _read_model(reader, root.get("model"))
    data = reader.fields(reader.mapping(root.get("data"), ("data",)), ("data",), DATA_CHECKS,
                         DATA_ALIASES)
    output = reader.fields(reader.mapping(root.get("output"), ("output",)), ("output",),
                           OUTPUT_CHECKS)
    legacy = reader.fields(reader.mapping(root.get("optimization"), ("optimization",)),
                           ("optimization",), {"optim_sched_config": optional(check_str)})
    checkpoint = root.get("model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        reader.problem(("model_checkpoint",), f"'model_checkpoint' must be a path, got "
                                              f"{checkpoint!r}")
        checkpoint = None

    training_value = dict(reader.mapping(root.get("training"), ("training",)))
    has_pipeline = "pipeline" in training_value
    pipeline_value = training_value.pop("pipeline", None)
    standard_checks = {k: STEP_CHECKS[k] for k in STANDARD_STEP_KEYS}
    fields = _read_step_fields(reader, training_value, ("training",),
                               {**TRAINING_CHECKS, **standard_checks})
    if fields.pop("transition_on", None) is not None:
        reader.problem(("training", "transition_on"), "'training.transition_on' applies to "
                       "pipeline steps only; put it in a step or in training.pipeline.defaults")
    run_fields = {k: v for k, v in fields.items() if k in TRAINING_CHECKS}
    step_fields = {k: v for k, v in fields.items() if k not in TRAINING_CHECKS}
    if "optim_sched_config" in legacy:
        run_fields.setdefault("optim_sched_config", legacy["optim_sched_config"])
    pipeline = None
    if has_pipeline:
        # Standard-mode modes do not leak into steps; loss settings are step defaults.
        base = {k: v for k, v in step_fields.items() if k not in MODE_KEYS}
        pipeline = _read_pipeline(reader, pipeline_value, base)
    standard = _make_step(reader, {
        **step_fields, "n_epochs": run_fields.get("n_epochs", TrainingConfig.n_epochs)},
        ("training",))
    if reader.problems:
        raise ConfigError(reader.problems)
    return RunConfig(
        model=model, data=_build(DataConfig, data), output=_build(OutputConfig, output),
        training=_build(TrainingConfig, {**run_fields, "step": standard,
                                         "pipeline": pipeline}),
        model_checkpoint=checkpoint, source=source)


def load_config(path: str | Path, overrides: Mapping[str, Mapping[str, Any]] | None = None
                ) -> RunConfig:
    """Read a YAML config, with ``overrides`` ({section: {key: value}}, e.g. from the
    command line) replacing the file's values."""
    document, lines = read_yaml(path)
    return read_config(apply_overrides(document, overrides), _blame_flags(lines, overrides),
                       str(path))


def _blame_flags(lines: Mapping[KeyPath, int | str],
                 overrides: Mapping[str, Any] | None) -> dict[KeyPath, int | str]:
    """``lines`` with each overridden key (and what is under it) placed on the command line,
    so a flag's bad value is not blamed on the file's line for that key."""
    given = {(section,) if section == "model_checkpoint" else (section, key)
             for section, values in (overrides or {}).items()
             for key in (values if isinstance(values, Mapping) else ("",))}
    out: dict[KeyPath, int | str] = {k: v for k, v in lines.items()
                                     if not any(k[:len(g)] == g for g in given)}
    for path in given:
        out[path] = f"command line (--{flag_name(*path)})"
    return out


def apply_overrides(document: Any, overrides: Mapping[str, Mapping[str, Any]] | None) -> Any:
    """``document`` with each ``{section: {key: value}}`` set (a non-mapping document is left
    for ``read_config`` to report)."""
    if not overrides:
        return document
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        return document
    out = dict(document)
    for section, values in overrides.items():
        if section == "model_checkpoint":
            out[section] = values
            continue
        current = out.get(section)
        current = dict(current) if isinstance(current, Mapping) else {}
        aliases = {"model": MODEL_ALIASES, "data": DATA_ALIASES}.get(section, {})
        given = {aliases.get(key, key) for key in values}
        # A flag replaces the file's value under any spelling of the same key.
        kept = {k: v for k, v in current.items() if aliases.get(k, k) not in given}
        out[section] = {**kept, **values}
    return out

