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
from fluxflow_jax.pipeline.yaml_file import KeyPath, read_yaml
from fluxflow_jax.settings import Flag, aliases_of, checks_of, flags_of, keys_of, setting
from fluxflow_jax.suggest import did_you_mean
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.modes import STEP_MODES
from fluxflow_jax.training.train_step import COMPRESSOR_LR_SCALE
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

    mode: str = setting("epoch", one_of(("epoch", "loss_threshold")),
                        "`epoch`: the step runs its epochs; `loss_threshold`: it may end "
                        "earlier")
    metric: str | None = setting(None, optional(check_str),
                                 "required for `loss_threshold`: a metric the step reports "
                                 "(validation metrics included), or an alias")
    threshold: float | None = setting(None, optional(in_interval("(-inf, inf)", 0.01)),
                                      "required for `loss_threshold`")
    comparison: str = setting("<", one_of(("<", ">")),
                              "`<`: the step ends when the metric falls below `threshold`; "
                              "`>`: when it rises above it (`val_psnr`, accuracies)")
    min_epochs: int = setting(0, integer_at_least(0),
                              "epochs before the threshold is looked at; must not exceed the "
                              "step's epochs")
    max_epochs: int | None = setting(None, _OPTIONAL_POSITIVE_INT,
                                     "caps the step's epochs: it runs at most "
                                     "min(`n_epochs`, `max_epochs`)")
    patience: int = setting(1, integer_at_least(1),
                            "consecutive epoch ends the threshold must hold at")


TRANSITION_CHECKS = checks_of(TransitionConfig)
# Keys the reader accepts and ignores -> their meaning.
TRANSITION_IGNORED = {"value": "accepted for reference configs; no effect"}

# Loss settings a step may give, routed to the train step's option objects.
VAE_LOSS_KEYS = tuple(key.name for key in keys_of(VAEOptions))
FLOW_LOSS_KEYS = {key.name: key.field for key in keys_of(FlowOptions)}  # step key -> field


def _option_checks() -> dict[str, Check]:
    """Type checks of the loss keys; their ranges are checked by the option objects."""
    return {key.name: (check_bool if isinstance(key.default, bool) else
                       integer_at_least(0) if isinstance(key.default, int) else
                       check_str if isinstance(key.default, str) else
                       optional(in_interval("(-inf, inf)", key.default or 0.999)))
            for key in (*keys_of(VAEOptions), *keys_of(FlowOptions))}


@dataclass(frozen=True)
class StepConfig:
    """One pipeline step (or the single step of standard mode)."""

    name: str = setting("", check_str, "the step's name; must be unique, without `/` or `\\`, "
                        "not starting with `.` (it names files)", default_text="`step_<i>`")
    description: str = setting("", check_str, "printed at the step's start and in the plan")
    n_epochs: int | None = setting(None, _OPTIONAL_POSITIVE_INT,
                                   "required: the most epochs the step runs", default_text="—")
    max_steps: int | None = setting(None, _OPTIONAL_POSITIVE_INT,
                                    "the step ends after this many batches")
    gradient_accumulation_steps: int | None = setting(
        None, _OPTIONAL_POSITIVE_INT, "micro-batches per update in this step; null: the run's "
        "`training.gradient_accumulation_steps`")
    cache_latents: bool = setting(
        False, check_bool, "flow steps with the compressor frozen: encode each image once and "
        "train on the stored posteriors, see [Cached latents](#cached-latents)")
    cache_text: bool = setting(
        False, check_bool, "flow steps with the language model frozen: run it once per caption "
        "and train the text encoder's head on the stored features, see [Cached "
        "text](#cached-text)")
    dataset: str | None = setting(
        None, optional(check_str), "the [named dataset](#named-datasets) the step reads; null: "
        "`training.pipeline.default_dataset`, else the `data` section (pipeline steps only)")
    use_ema: bool = setting(
        True, check_bool, "`false`: the step keeps no averages, as `ema_decay: null` and "
        "`flow_ema_decay: null` would (less memory); the averages of earlier steps stay in "
        "the state")
    train_vae: bool = setting(False, check_bool, "VAE part with the reconstruction loss "
                              "(compressor + expander)", flag=True)
    train_reconstruction: bool | None = setting(
        None, optional(check_bool), "null: as `train_vae`; `false` with a VAE part: GAN-only "
        "(no pixel or LPIPS loss)")
    gan_training: bool = setting(False, check_bool, "the discriminator and the adversarial "
                                 "generator loss", flag=True)
    train_spade: bool = setting(
        False, check_bool, "the expander's SPADE conditioning on the latent (off: the expander "
        "runs without SPADE and its SPADE weights are not trained)", flag=True)
    use_lpips: bool = setting(False, check_bool, "add LPIPS to the reconstruction loss",
                              flag=True)
    train_diff: bool = setting(False, check_bool, "flow part: the flow processor (and the "
                               "text encoder unless frozen)", flag=True)
    train_diff_full: bool = setting(False, check_bool, "same as `train_diff`", flag=True)
    train_flow: bool = setting(False, check_bool, "same as `train_diff`")
    freeze_vae: bool | None = setting(None, optional(check_bool), "`true` freezes compressor "
                                      "+ expander, `false` unfreezes them, null: unchanged")
    freeze_flow: bool | None = setting(None, optional(check_bool),
                                       "the same for the flow processor")
    freeze_text_encoder: bool | None = setting(None, optional(check_bool),
                                               "the same for the text encoder")
    freeze: tuple[str, ...] = setting((), check_str_list, "components to freeze")
    unfreeze: tuple[str, ...] = setting((), check_str_list, "components to unfreeze")
    optimizers: Mapping[str, Mapping[str, Any]] = setting(
        {}, check_mapping, "per-group optimizer configs (`vae`, `discriminator`, `flow`, "
        "`text_encoder`)")
    schedulers: Mapping[str, Mapping[str, Any]] = setting({}, check_mapping,
                                                          "per-group scheduler configs")
    optim_sched_config: str | None = setting(
        None, optional(check_str), "per-model JSON file for this step (else "
        "`training.optim_sched_config`)")
    lr: float | None = setting(None, optional(_POSITIVE), "learning rate of this step's "
                               "default optimizers; null: `training.lr`")
    lr_min: float | None = setting(
        None, optional(in_interval("[0, 1]", 0.1)), "`eta_min_factor` of this step's default "
        "cosine schedulers (and of file cosine schedulers without one)")
    initial_clipping_norm: float | None = setting(
        None, optional(_POSITIVE), "this step's gradient clip; null: "
        "`training.initial_clipping_norm`")
    compressor_lr_scale: float = setting(
        1.0, COMPRESSOR_LR_SCALE, "the compressor trains at this times the `vae` group's "
        "learning rate (its weight decay too), see [Optimizer groups](#optimizer-groups); "
        "steps that train the compressor only")
    transition_on: TransitionConfig = setting(
        TransitionConfig(), None, "when the step ends early: [Transitions](#transitions)",
        default_text="`epoch`")
    losses: Mapping[str, Any] = field(default_factory=dict)  # VAE_LOSS_KEYS / FLOW_LOSS_KEYS
    origin: str = field(default="", compare=False)  # "file:line", for messages


STEP_CHECKS: dict[str, Check] = {**checks_of(StepConfig), **_option_checks()}
# Keys of a step the reader takes apart -> their meaning.
STEP_FORMS = {"optimization": "the reference's form: `{optimizers: {...}, schedulers: "
                              "{...}}`, merged into `optimizers` and `schedulers` (giving one "
                              "both ways is an error)"}
MODE_KEYS = (*STEP_MODES, "use_lpips", "train_reconstruction")


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
    "noise": ("dimensions", "num_samples", "noise_std"),
    "data": ()}
DATASET_REQUIRED = {"local": ("image_folder", "captions_file"), "webdataset": ("webdataset_url",),
                    "noise": (), "data": ()}


@dataclass(frozen=True)
class DatasetConfig:
    """One named dataset of ``training.pipeline.datasets``: an image folder (``local``), tar
    shards (``webdataset``), synthetic Gaussian noise (``noise``) or the data section's own
    source (``data``), read with the data section's image and caption settings, with its
    own batch size and workers if given."""

    type: str = setting("local", one_of(tuple(DATASET_TYPES)),
                        "`local` (an image folder), `webdataset` (tar shards), `noise` "
                        "(synthetic) or `data` (the [`data`](#data) section's source, so "
                        "that a step reads it at another batch size)")
    image_folder: str | None = setting(None, optional(check_str),
                                       "`local`, required: the image folder")
    captions_file: str | None = setting(None, optional(check_str), "`local`, required: "
                                        "`image_name<TAB>caption` lines")
    webdataset_url: str | None = setting(None, optional(check_str), "`webdataset`, required: "
                                         "shards, as [`data.webdataset_url`](#data)")
    webdataset_token: str | None = setting(None, optional(check_str), "`webdataset`: bearer "
                                           "token for `http(s)`/`hf://` shards")
    webdataset_image_key: str = setting("png", check_str,
                                        "`webdataset`: as in [`data`](#data)")
    webdataset_label_key: str = setting("json", check_str,
                                        "`webdataset`: as in [`data`](#data)")
    webdataset_caption_key: str = setting("prompt", check_str,
                                          "`webdataset`: as in [`data`](#data)")
    webdataset_size: int = setting(10000, integer_at_least(1),
                                   "`webdataset`: samples per epoch")
    webdataset_samples_per_shard: int = setting(1000, integer_at_least(1),
                                                "`webdataset`: assumed shard size")
    dimensions: tuple[int, ...] = setting((512, 512), _check_dimensions, "`noise`: [height, "
                                          "width] of every image (each at least 16)")
    num_samples: int = setting(10000, integer_at_least(1), "`noise`: images per epoch")
    noise_std: float = setting(
        1.0, in_interval("(0, inf)", 1.0), "`noise`: σ of the Gaussian pixels, clipped to ±3 "
        "and mapped onto 0..255 as the reference does; every image has the empty caption")
    batch_size: int | None = setting(None, _OPTIONAL_POSITIVE_INT, "the batch size of steps "
                                     "reading this dataset; null: `training.batch_size`")
    workers: int | None = setting(None, _OPTIONAL_POSITIVE_INT, "loader threads for this "
                                  "dataset; null: `training.workers`")


DATASET_CHECKS = checks_of(DatasetConfig)


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

    data_path: str | None = setting(None, optional(check_str),
                                    "image folder of a local dataset", flag=True)
    captions_file: str | None = setting(None, optional(check_str),
                                        "`image_name<TAB>caption` lines, UTF-8", flag=True)
    fixed_prompt_prefix: str | None = setting(
        None, optional(check_str), "every caption becomes `\"<prefix>. <caption>\"` (all "
        "sources)", flag=True)
    use_webdataset: bool = setting(False, check_bool, "read WebDataset tar shards", flag=True,
                                   aliases=("use_tt2m",))
    webdataset_url: str = setting(
        "hf://datasets/jackyhate/text-to-image-2M/data_512_2M/*.tar", check_str,
        "shards: local paths, globs, `{000..099}` braces, `http(s)://`, `hf://datasets/...`",
        flag=True)
    webdataset_token: str | None = setting(
        None, optional(check_str), "bearer token for `http(s)`/`hf://` shards", flag=True,
        aliases=("tt2m_token",))
    webdataset_image_key: str = setting("png", check_str, "image member of a sample",
                                        flag=True)
    webdataset_label_key: str = setting("json", check_str,
                                        "JSON member holding the caption field", flag=True)
    webdataset_caption_key: str = setting(
        "prompt", check_str, "caption member (e.g. `txt`), else this field of the JSON member",
        flag=True)
    webdataset_size: int | None = setting(
        None, _OPTIONAL_POSITIVE_INT, "samples per epoch; null: shards × "
        "`webdataset_samples_per_shard`", flag=True)
    webdataset_samples_per_shard: int = setting(
        10000, integer_at_least(1), "assumed shard size for the epoch length", flag=True)
    tfds_name: str | None = setting(None, optional(check_str),
                                    "a prepared TFDS dataset (ArrayRecord)", flag=True)
    tfds_split: str = setting("train", check_str, "TFDS split")
    tfds_data_dir: str | None = setting(None, optional(check_str), "TFDS data directory")
    tfds_image_key: str = setting("image", check_str, "TFDS image feature")
    tfds_caption_key: str = setting("caption", check_str, "TFDS caption feature")
    use_demo: bool = setting(False, check_bool, "the built-in synthetic dataset (captioned "
                             "shapes, no download)", flag=True)
    demo_samples: int = setting(256, integer_at_least(1), "demo dataset size")
    validation_samples: int = setting(
        32, integer_at_least(1), "held-out samples of [validation](#validation) and "
        "`fluxflow-jax evaluate`; for the demo data, the indices after `demo_samples` (never "
        "trained on)")
    img_size: int = setting(1024, integer_at_least(16), "short side of the training images "
                            "(aspect kept, 16-pixel grid)", flag=True)
    fixed_size: bool = setting(False, check_bool,
                               "square `img_size` centre crops instead of aspect buckets")
    reduced_min_sizes: tuple[int, ...] = setting(
        (), check_int_list, "extra smaller scales (each in [16, `img_size`)): every batch is "
        "also trained at each, one update per scale", flag=True)
    channels: int = setting(3, integer_at_least(1), "accepted; has no effect (images are RGB; "
                            "see `model.in_channels`)", flag=True)
    tokenizer_name: str | None = setting(
        None, optional(check_str), "vocab file or directory (`vocab.txt`/`tokenizer.json`); "
        "null, `distilbert-base-uncased` or `bert-base-uncased`: the default lookup", flag=True)
    max_length: int = setting(128, integer_at_least(2), "caption tokens")
    seed: int = setting(42, check_seed, "data order (shuffling) seed")
    on_bad_sample: str = setting(
        "skip", one_of(("skip", "error")), "`skip` (count, log, replace in the batch) or "
        "`error` (stop, naming the sample). Images whose header cannot be read are found "
        "before training (and by `validate`); the others when decoded. Each epoch's skips are "
        "counted in the log")
    dataloader_max_retries: int = setting(5, integer_at_least(0),
                                          "accepted for reference configs; no effect",
                                          flag=True)
    dataloader_retry_delay: float = setting(5.0, in_interval("[0, inf)", 5.0),
                                            "accepted for reference configs; no effect",
                                            flag=True)


DATA_CHECKS = checks_of(DataConfig)
DATA_ALIASES = aliases_of(DataConfig)


@dataclass(frozen=True)
class OutputConfig:
    """Where and how often a run writes."""

    output_path: str = setting("outputs", check_str,
                               "directory of everything the run writes", flag=True)
    log_interval: int = setting(10, integer_at_least(1), "a console line and a metrics record "
                                "at batch 1, 1 + `log_interval`, ... of every epoch", flag=True)
    checkpoint_save_interval: int = setting(
        50, integer_at_least(1), "a run checkpoint every this many batches of a step",
        flag=True)
    validation_interval: int | None = setting(
        None, _OPTIONAL_POSITIVE_INT, "held-out [validation](#validation) every this many "
        "batches of a step, and at its end; null: none")
    keep_last: int = setting(3, integer_at_least(1), "run checkpoints kept")
    generate_diagrams: bool = setting(True, check_bool,
                                      "draw the training graphs at every step end", flag=True)
    log_level: str = setting("INFO", one_of(("DEBUG", "INFO", "WARNING", "ERROR")),
                             "accepted (`DEBUG`, `INFO`, `WARNING`, `ERROR`); no effect yet")
    log_file: str | None = setting(None, optional(check_str), "accepted; no effect yet")
    samples_per_checkpoint: int = setting(
        1, integer_at_least(0), "samples at every N-th interval checkpoint (0: none), and "
        "always at epoch and step ends ([Samples](#samples))", flag=True)
    sample_interval: int | None = setting(
        None, _OPTIONAL_POSITIVE_INT, "samples every this many global steps instead (decoupled "
        "from checkpoints), and at epoch and step ends; null: by `samples_per_checkpoint`",
        flag=True)
    no_samples: bool = setting(False, check_bool, "no samples at all", flag=True)
    test_image_address: tuple[str, ...] = setting(
        (), check_str_list, "images reconstructed in VAE steps; []: the data's first 2 (none "
        "for streaming data)", flag=True)
    sample_captions: tuple[str, ...] = setting(("A sample caption",), check_str_list,
                                               "captions drawn in flow steps", flag=True)
    sample_sizes: tuple[int | str | tuple[int, int], ...] | None = setting(
        None, optional(_check_sizes), "sizes drawn (512, \"512x384\" or [512, 384]; each a "
        "size the model makes); null: `data.img_size`", flag=True)
    sample_steps: int = setting(20, integer_at_least(1),
                                "DPM-Solver++ steps of the text-to-image samples", flag=True)
    tensorboard: bool | None = setting(
        None, optional(check_bool), "[TensorBoard](#tensorboard) event files; null: on when "
        "`tensorboardX` is installed")
    profile_steps: str | None = setting(
        None, optional(_check_step_range), "`\"A:B\"` (flag `--profile_steps A:B`): a "
        "[profiler trace](#profiling) of global steps A+1 to B", flag=True)


OUTPUT_CHECKS = checks_of(OutputConfig)


@dataclass(frozen=True)
class TrainingConfig:
    """Run-wide settings; the step keys given here form standard mode's single step."""

    n_epochs: int = setting(1, integer_at_least(1), "standard mode's epochs (pipeline steps "
                            "give their own `n_epochs`)", flag=True)
    batch_size: int = setting(2, integer_at_least(1), "global batch size (the micro-batch "
                              "with `gradient_accumulation_steps`)", flag=True)
    gradient_accumulation_steps: int = setting(
        1, integer_at_least(1), "micro-batches of `batch_size` per optimizer update "
        "(`--gradient_accumulation_steps`); a step may give its own, see [Gradient "
        "accumulation](#gradient-accumulation)", flag=True)
    workers: int = setting(1, integer_at_least(1), "data loader threads", flag=True)
    lr: float = setting(
        5e-4, _POSITIVE, "(the reference's: 5e-7, which trains nothing in practice; "
        "docs/learning.md) learning rate of the default optimizers when a step gives no `lr` "
        "(shared out per group, see [Optimizers](#optimizers-and-schedulers))", flag=True)
    lr_min: float = setting(0.1, in_interval("[0, 1]", 0.1), "`eta_min_factor` given to "
                            "cosine schedulers of the per-model JSON file that lack one",
                            flag=True)
    training_steps: int = setting(1, integer_at_least(1), "updates per batch (the batch is "
                                  "trained this many times)", flag=True)
    initial_clipping_norm: float | None = setting(
        1.0, optional(_POSITIVE), "global gradient-norm clip of every optimizer group; "
        "`null`: no clipping", flag=True)
    max_steps: int | None = setting(None, _OPTIONAL_POSITIVE_INT,
                                    "every step ends after this many batches", flag=True)
    seed: int = setting(0, check_seed, "model initialisation and training randomness",
                        flag=True)
    compressor_start: str = setting(
        "reference", one_of(("reference", "pass_through")), "how a fresh compressor starts: "
        "`reference` (PyTorch's initialisation, whose encoder output does not yet depend on "
        "the image) or `pass_through` (its encoder starts as an average pooling of the image; "
        "weights only, PyTorch loads the result; see [docs/learning.md](learning.md))",
        flag=True)
    devices: int | None = setting(None, _OPTIONAL_POSITIVE_INT, "data-parallel devices; null: "
                                  "all devices (of all hosts)", flag=True)
    shard_params: bool = setting(
        False, check_bool, "split parameters, optimizer moments and EMA over the devices "
        "instead of replicating them (FSDP style), see [Speed and memory](#speed-and-memory)",
        flag=True)
    precision: str | None = setting(
        None, optional(one_of(("fp32", "bf16"))), "`fp32` or `bf16` (mixed precision, see "
        "[Speed and memory](#speed-and-memory)); null: `bf16` if `use_fp16`, else `fp32`",
        flag=True)
    remat: bool = setting(False, check_bool, "recompute each block's activations in the "
                          "backward pass: less memory, about one more forward pass of compute",
                          flag=True)
    distributed: bool = setting(
        False, check_bool, "multi-host: join the other processes (`jax.distributed`) before "
        "training, see [Multi-host runs](#multi-host-runs)", flag=True)
    coordinator_address: str | None = setting(
        None, optional(check_str), "`host:port` of process 0 (else `JAX_COORDINATOR_ADDRESS` "
        "or cluster detection); giving it turns `distributed` on", flag=True)
    num_processes: int | None = setting(
        None, _OPTIONAL_POSITIVE_INT, "the run's process count (else `JAX_NUM_PROCESSES` or "
        "cluster detection)", flag=True)
    process_id: int | None = setting(
        None, optional(integer_at_least(0)), "this process's index (else `JAX_PROCESS_ID` or "
        "cluster detection)", flag=True)
    lpips_weights: str | None = setting(
        None, optional(check_str), "LPIPS weights file; null: "
        "`~/.cache/fluxflow_jax/lpips_vgg16.safetensors`, created on first need (as "
        "`fluxflow-jax lpips-weights` does)")
    optim_sched_config: str | None = setting(
        None, optional(check_str), "per-model optimizer/scheduler JSON file for every step",
        flag=True)
    use_fp16: bool = setting(False, check_bool, "the reference's mixed-precision switch: "
                             "trains in `bf16` unless `precision` says otherwise", flag=True)
    preserve_lr: bool = setting(False, check_bool, "accepted for reference configs; no effect "
                                "(resume always restores the schedules)", flag=True)
    pipeline: PipelineConfig | None = setting(
        None, None, "`defaults` and `steps`; its presence selects pipeline mode",
        default_text="—")
    step: StepConfig = StepConfig()  # standard mode's step

    @property
    def compute_precision(self) -> str:
        """The arithmetic the steps run in: ``precision``, else bf16 for ``use_fp16`` (JAX
        accelerators do mixed precision in bfloat16, which needs no loss scaling)."""
        return self.precision or ("bf16" if self.use_fp16 else "fp32")


TRAINING_CHECKS = checks_of(TrainingConfig)
# Run-wide keys the reference also parses (and ignores) in a step.
RUN_ONLY_KEYS = ("batch_size", "workers", "use_fp16", "training_steps", "seed", "devices",
                 "precision", "remat", "shard_params")
# Step keys of a standard-mode run; name, description and transitions belong to pipelines.
STANDARD_STEP_KEYS = tuple(k for k in STEP_CHECKS if k not in TRAINING_CHECKS
                           and k not in ("name", "description", "dataset"))

# The keys outside the sections' dataclasses -> their meaning.
TOP_LEVEL_KEYS = {
    "optimization.optim_sched_config": "the reference's location of the per-model JSON "
                                       "file; used when `training.optim_sched_config` is not "
                                       "given",
    "model_checkpoint": "initial weights: a fluxflow safetensors file or directory "
                        "([Fine-tuning](#fine-tuning-model_checkpoint))"}

MODEL_ALIASES = aliases_of(FluxFlowConfig)
# Keys of the model section that are no FluxFlowConfig field -> their meaning.
MODEL_OTHER_KEYS = {
    "pretrained_bert_model": "only `null` is accepted: initialise the text encoder from "
                             "`model_checkpoint` instead",
    "feature_maps_dim_disc": "accepted and ignored (the reference's unused image-encoder "
                             "width)"}
MODEL_IGNORED = ("feature_maps_dim_disc",)  # the reader drops it

# The reference's training flags (``fluxflow-train``): each sets one config key.
FLAGS: tuple[Flag, ...] = (
    *flags_of("data", DataConfig),
    Flag("model_checkpoint", "model_checkpoint", "", str, TOP_LEVEL_KEYS["model_checkpoint"]),
    *flags_of("model", FluxFlowConfig),
    Flag("pretrained_bert_model", "model", "pretrained_bert_model", str,
         MODEL_OTHER_KEYS["pretrained_bert_model"]),
    Flag("feature_maps_dim_disc", "model", "feature_maps_dim_disc", int,
         MODEL_OTHER_KEYS["feature_maps_dim_disc"]),
    *flags_of("training", TrainingConfig), *flags_of("training", StepConfig),
    *flags_of("training", VAEOptions),
    *flags_of("output", OutputConfig))


def flag_name(section: str, key: str = "") -> str:
    """The flag that sets ``section.key`` (the first listed where several do)."""
    return next(flag.name for flag in FLAGS if (flag.section, flag.key) == (section, key))


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
                           ignored=tuple(TRANSITION_IGNORED))
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

