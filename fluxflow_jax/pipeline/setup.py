"""What a run is built from: its data loader, initial models, LPIPS network and devices.

Each builder turns a user mistake (no data source, a missing file, a checkpoint of another
architecture) into a ``ConfigError`` naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from fluxflow_jax import parallel
from fluxflow_jax.data import (CaptionedFolder, DataConfigError, DataLoader, DemoSource,
                               LoaderConfig, NoiseSource, TFDSSource, Tokenizer,
                               TokenizerError, WebDatasetSource)
from fluxflow_jax.interop import CheckpointError, load_fluxflow
from fluxflow_jax.models.bundle import COMPONENTS, FluxFlowModels
from fluxflow_jax.models.compressor_start import start_as_pass_through
from fluxflow_jax.models.config import WEIGHTLESS_FIELDS, FluxFlowConfig
from fluxflow_jax.pipeline.config import (ConfigError, DataConfig, DatasetConfig, Feed,
                                          RunConfig, StepConfig)
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training import modes
from fluxflow_jax.training.lpips import LPIPS, LPIPSWeightsError, default_weights_path
from fluxflow_jax.training.lpips_weights import ConversionError, ensure_default_weights

# Hub names of the reference's tokenizer: all mean the bert-base-uncased vocab, found locally.
_DEFAULT_TOKENIZERS = ("distilbert-base-uncased", "bert-base-uncased")


def _source_kinds(data: DataConfig) -> list[str]:
    kinds = []
    if data.data_path or data.captions_file:
        kinds.append("data_path + captions_file")
    if data.use_webdataset:
        kinds.append("use_webdataset")
    if data.tfds_name:
        kinds.append("tfds_name")
    if data.use_demo:
        kinds.append("use_demo")
    return kinds


def make_source(data: DataConfig):
    """The one data source the ``data`` section names."""
    kinds = _source_kinds(data)
    if len(kinds) != 1:
        given = f"it gives {' and '.join(kinds)}" if kinds else "it gives none"
        raise ConfigError([f"data: name exactly one source ({given}): data.data_path with "
                           "data.captions_file, data.use_webdataset with "
                           "data.webdataset_url, data.tfds_name, or data.use_demo: true"])
    if data.use_demo:
        return DemoSource(length=data.demo_samples, image_size=data.img_size, seed=data.seed)
    if data.use_webdataset:
        return WebDatasetSource(
            data.webdataset_url, image_key=data.webdataset_image_key,
            label_key=data.webdataset_label_key, caption_key=data.webdataset_caption_key,
            token=data.webdataset_token, samples_per_epoch=data.webdataset_size,
            samples_per_shard=data.webdataset_samples_per_shard,
            fixed_prompt_prefix=data.fixed_prompt_prefix)
    if data.tfds_name:
        return TFDSSource(data.tfds_name, split=data.tfds_split, data_dir=data.tfds_data_dir,
                          image_key=data.tfds_image_key, caption_key=data.tfds_caption_key,
                          fixed_prompt_prefix=data.fixed_prompt_prefix)
    if not (data.data_path and data.captions_file):
        raise ConfigError(["data: a local dataset needs both data.data_path (the image "
                           "folder) and data.captions_file"])
    return CaptionedFolder(data.data_path, data.captions_file, data.fixed_prompt_prefix)


def make_dataset_source(dataset: DatasetConfig, data: DataConfig):
    """The source of one named dataset; images and captions are read with the data
    section's settings (fixed_prompt_prefix, seed), as the reference does."""
    if dataset.type == "data":
        return make_source(data)
    if dataset.type == "noise":
        height, width = dataset.dimensions
        return NoiseSource(dataset.num_samples, height, width, dataset.noise_std, data.seed)
    if dataset.type == "webdataset":
        return WebDatasetSource(
            dataset.webdataset_url, image_key=dataset.webdataset_image_key,
            label_key=dataset.webdataset_label_key,
            caption_key=dataset.webdataset_caption_key, token=dataset.webdataset_token,
            samples_per_epoch=dataset.webdataset_size,
            samples_per_shard=dataset.webdataset_samples_per_shard,
            fixed_prompt_prefix=data.fixed_prompt_prefix)
    return CaptionedFolder(dataset.image_folder, dataset.captions_file,
                           data.fixed_prompt_prefix)


def load_tokenizer(data: DataConfig) -> Tokenizer:
    name = data.tokenizer_name
    return Tokenizer.load(None if name is None or name in _DEFAULT_TOKENIZERS else name)


def make_loader(run: RunConfig, accumulation: int = 1, feed: Feed | None = None
                ) -> DataLoader:
    """The host's data loader (its share of every global batch) of ``feed`` (None: the
    data section at the run's batch size) for steps of ``accumulation`` micro-batches: its
    batches are the effective batches, the feed's ``batch_size`` x ``accumulation``
    samples."""
    data, hosts = run.data, jax.process_count()
    feed = feed or Feed(None, run.training.batch_size, run.training.workers)
    where = (f"training.pipeline.datasets.{feed.dataset}" if feed.dataset else "data")
    if feed.batch_size % hosts:
        size_key = f"{where}.batch_size" if feed.dataset else "training.batch_size"
        raise ConfigError([f"{size_key} ({feed.batch_size}) must be divisible by the "
                           f"{hosts} hosts"])
    try:
        source = (make_dataset_source(run.training.pipeline.datasets[feed.dataset], data)
                  if feed.dataset else make_source(data))
        return DataLoader(source, load_tokenizer(data), LoaderConfig(
            batch_size=feed.batch_size // hosts * accumulation,
            image_size=data.img_size,
            fixed_size=data.fixed_size, reduced_min_sizes=data.reduced_min_sizes,
            max_length=data.max_length, seed=data.seed, workers=feed.workers,
            on_bad_sample=data.on_bad_sample, shard_index=jax.process_index(),
            shard_count=hosts))
    except (DataConfigError, TokenizerError) as err:
        raise ConfigError([f"{where}: {err}"]) from None


class Loaders:
    """The run's data loaders, one per (feed, accumulation steps), each made on first need:
    steps reading the same dataset with the same effective batch share one loader (and its
    position)."""

    def __init__(self, run: RunConfig):
        self.run = run
        self._made: dict[tuple[Feed, int], DataLoader] = {}

    def get(self, feed: Feed, accumulation: int = 1) -> DataLoader:
        if (feed, accumulation) not in self._made:
            self._made[feed, accumulation] = make_loader(self.run, accumulation, feed)
        return self._made[feed, accumulation]

    def for_step(self, step: StepConfig, accumulation: int) -> DataLoader:
        return self.get(self.run.feed(step), accumulation)

    def made(self) -> list[DataLoader]:
        """Every loader made so far."""
        return list(self._made.values())


def check_text_inputs(config: FluxFlowConfig, data: DataConfig, tokenizer: Tokenizer,
                      stages: list[Stage]) -> None:
    """The text encoder must take every caption the loader gives: each token id in its
    table (an id past it makes every flow loss NaN, and every batch skipped), and
    ``max_length`` tokens within its positions."""
    if not any(stage.config.flow for stage in stages):
        return
    problems = []
    if config.text_vocab_size != tokenizer.vocab_size:
        problems.append(f"model.text_vocab_size is {config.text_vocab_size}, but the "
                        f"tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} ids; they "
                        "must be equal for the flow steps (remove model.text_vocab_size to "
                        "take the default)")
    if data.max_length > config.text_max_positions:
        problems.append(f"data.max_length ({data.max_length}) is more than the text "
                        f"encoder's positions (model.text_max_positions, "
                        f"{config.text_max_positions}); lower data.max_length")
    if problems:
        raise ConfigError(problems)


def check_output_path(run: RunConfig) -> None:
    """The output path must be a folder, or not exist yet (it is created)."""
    path = Path(run.output.output_path)
    if path.exists() and not path.is_dir():
        raise ConfigError([f"output.output_path: {path} is a file, not a folder; choose "
                           "another output_path"])


def make_mesh(run: RunConfig) -> Mesh | None:
    """A data-parallel mesh over the devices the run uses; None for one device."""
    devices = jax.devices()
    count = run.training.devices or len(devices)
    if count > len(devices):
        raise ConfigError([f"training.devices is {count}, but only {len(devices)} "
                           "devices are available"])
    if count == 1:
        return None
    problems = [f"{key} ({size}) must be divisible by the {count} devices; change it or "
                "set training.devices" for key, size in _batch_sizes(run).items()
                if size % count]
    if problems:
        raise ConfigError(problems)
    return parallel.data_mesh(devices[:count])


def _batch_sizes(run: RunConfig) -> dict[str, int]:
    """Each batch size the run's steps train with, by the key that sets it."""
    sizes = {}
    for feed in {run.feed(step) for step in run.steps()}:
        key = (f"training.pipeline.datasets.{feed.dataset}.batch_size"
               if feed.batch_size != run.training.batch_size else "training.batch_size")
        sizes[key] = feed.batch_size
    return dict(sorted(sizes.items()))


def _checkpoint_models(run: RunConfig) -> FluxFlowModels:
    """``model_checkpoint``'s models, checked against the model section."""
    try:
        loaded = load_fluxflow(run.model_checkpoint)
    except CheckpointError as err:
        raise ConfigError([f"model_checkpoint: {err}"]) from None
    differing = [f"model.{key} is {value!r}, the checkpoint has "
                 f"{getattr(loaded.config, key)!r}" for key, value in run.model.items()
                 if key not in WEIGHTLESS_FIELDS and getattr(loaded.config, key) != value]
    if differing:
        raise ConfigError([f"model_checkpoint {run.model_checkpoint} does not match the "
                           f"model section: {'; '.join(differing)} (remove those keys to "
                           "take the checkpoint's architecture)"])
    return loaded.with_settings(**{key: value for key, value in run.model.items()
                                   if key in WEIGHTLESS_FIELDS})


def model_config(run: RunConfig) -> FluxFlowConfig:
    """The architecture the run trains: the checkpoint's, or the model section's."""
    return _checkpoint_models(run).config if run.model_checkpoint else run.model_config()


def initial_models(run: RunConfig) -> FluxFlowModels:
    """Fresh models (seeded by training.seed), or ``model_checkpoint``'s weights with any
    component it lacks freshly initialised."""
    if run.model_checkpoint is None:
        return _started(run, FluxFlowModels.create(run.model_config(),
                                                    nnx.Rngs(run.training.seed))).train()
    loaded = _checkpoint_models(run)
    missing = [c for c in COMPONENTS if getattr(loaded, c) is None]
    fresh = _started(run, FluxFlowModels.create(loaded.config, nnx.Rngs(run.training.seed),
                                                tuple(missing)))
    for name in missing:
        setattr(loaded, name, getattr(fresh, name))
    return loaded.train()


def _started(run: RunConfig, models: FluxFlowModels) -> FluxFlowModels:
    """Fresh ``models`` with the start ``training.compressor_start`` asks for."""
    if run.training.compressor_start == "pass_through" and models.compressor is not None:
        start_as_pass_through(models.compressor)
    return models


def load_lpips(run: RunConfig, stages: list[Stage], *, fetch: bool = True) -> LPIPS | None:
    """The LPIPS network if any stage's reconstruction loss or validation uses it. The
    default weights file is created on first need; with ``fetch`` off (checking a config)
    a missing default file is no problem, since training will create it."""
    if run.output.validation_interval is None and not any(
            modes.uses_lpips(s.config.vae, s.config.flow) for s in stages):
        return None
    path = Path(run.training.lpips_weights).expanduser() if run.training.lpips_weights \
        else None
    try:
        if path is None:
            if not fetch and not default_weights_path().is_file():
                return None
            path = ensure_default_weights()
        return LPIPS.from_file(path)
    except (LPIPSWeightsError, ConversionError) as err:
        raise ConfigError([f"training.lpips_weights: {err}"]) from None
