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
                               LoaderConfig, TFDSSource, Tokenizer, TokenizerError,
                               WebDatasetSource)
from fluxflow_jax.interop import CheckpointError, load_fluxflow
from fluxflow_jax.models.bundle import COMPONENTS, FluxFlowModels
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.pipeline.config import ConfigError, DataConfig, RunConfig
from fluxflow_jax.pipeline.stages import Stage
from fluxflow_jax.training.lpips import LPIPS, LPIPSWeightsError

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


def load_tokenizer(data: DataConfig) -> Tokenizer:
    name = data.tokenizer_name
    return Tokenizer.load(None if name is None or name in _DEFAULT_TOKENIZERS else name)


def make_loader(run: RunConfig) -> DataLoader:
    """The host's data loader (its share of every global batch)."""
    data, hosts = run.data, jax.process_count()
    if run.training.batch_size % hosts:
        raise ConfigError([f"training.batch_size ({run.training.batch_size}) must be "
                           f"divisible by the {hosts} hosts"])
    try:
        return DataLoader(make_source(data), load_tokenizer(data), LoaderConfig(
            batch_size=run.training.batch_size // hosts, image_size=data.img_size,
            fixed_size=data.fixed_size, reduced_min_sizes=data.reduced_min_sizes,
            max_length=data.max_length, seed=data.seed, workers=run.training.workers,
            on_bad_sample=data.on_bad_sample, shard_index=jax.process_index(),
            shard_count=hosts))
    except (DataConfigError, TokenizerError) as err:
        raise ConfigError([f"data: {err}"]) from None


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


def make_mesh(run: RunConfig) -> Mesh | None:
    """A data-parallel mesh over the devices the run uses; None for one device."""
    devices = jax.devices()
    count = run.training.devices or len(devices)
    if count > len(devices):
        raise ConfigError([f"training.devices is {count}, but only {len(devices)} "
                           "devices are available"])
    if count == 1:
        return None
    if run.training.batch_size % count:
        raise ConfigError([f"training.batch_size ({run.training.batch_size}) must be "
                           f"divisible by the {count} devices; change it or set "
                           "training.devices"])
    return parallel.data_mesh(devices[:count])


def _checkpoint_models(run: RunConfig) -> FluxFlowModels:
    """``model_checkpoint``'s models, checked against the model section."""
    try:
        loaded = load_fluxflow(run.model_checkpoint)
    except CheckpointError as err:
        raise ConfigError([f"model_checkpoint: {err}"]) from None
    differing = [f"model.{key} is {value!r}, the checkpoint has "
                 f"{getattr(loaded.config, key)!r}" for key, value in run.model.items()
                 if getattr(loaded.config, key) != value]
    if differing:
        raise ConfigError([f"model_checkpoint {run.model_checkpoint} does not match the "
                           f"model section: {'; '.join(differing)} (remove those keys to "
                           "take the checkpoint's architecture)"])
    return loaded


def model_config(run: RunConfig) -> FluxFlowConfig:
    """The architecture the run trains: the checkpoint's, or the model section's."""
    return _checkpoint_models(run).config if run.model_checkpoint else run.model_config()


def initial_models(run: RunConfig) -> FluxFlowModels:
    """Fresh models (seeded by training.seed), or ``model_checkpoint``'s weights with any
    component it lacks freshly initialised."""
    if run.model_checkpoint is None:
        return FluxFlowModels.create(run.model_config(), nnx.Rngs(run.training.seed)).train()
    loaded = _checkpoint_models(run)
    missing = [c for c in COMPONENTS if getattr(loaded, c) is None]
    fresh = FluxFlowModels.create(loaded.config, nnx.Rngs(run.training.seed), tuple(missing))
    for name in missing:
        setattr(loaded, name, getattr(fresh, name))
    return loaded.train()


def load_lpips(run: RunConfig, stages: list[Stage]) -> LPIPS | None:
    """The LPIPS network if any stage's reconstruction loss or validation uses it."""
    if run.output.validation_interval is None and not any(
            s.config.vae and s.config.vae.train_reconstruction and s.config.vae.use_lpips
            for s in stages):
        return None
    path = Path(run.training.lpips_weights).expanduser() if run.training.lpips_weights \
        else None
    try:
        return LPIPS.from_file(path)
    except LPIPSWeightsError as err:
        raise ConfigError([f"training.lpips_weights: {err}"]) from None
