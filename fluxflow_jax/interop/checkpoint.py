"""Reading and writing PyTorch ``fluxflow`` checkpoint files.

Layout written by ``save_fluxflow``, in the model's architecture version (v060:
``FluxPipeline.from_pretrained`` on the weights file; v030, v070 and v080:
``load_versioned_checkpoint`` on the directory; each loads every key):

    flxflow_final.safetensors   diffuser.compressor.* / diffuser.flow_processor.* /
                                diffuser.expander.*
    text_encoder.safetensors    text_encoder.* (language_model.* included)
    D_img.safetensors           D_img.*
    model_metadata.json         {"model_version": "0.6.0", "architecture": {...}, ...}

Reading accepts what PyTorch ``fluxflow`` and its trainer write: that layout, PyTorch's
``model.safetensors`` directories, and single files. The version comes from the keys
(``fluxflow_jax.interop.versions``).

Weights are only ever read from safetensors. A save replaces the whole checkpoint: the
metadata, written last, lists every file's hash, and loading verifies them, so an interrupted
save is reported, never loaded as a mix of old and new files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

import fluxflow_jax
from fluxflow_jax.atomic import atomic_copy, atomic_write, write_temp
from fluxflow_jax.interop.keymap import COMPONENT_TABLES
from fluxflow_jax.interop.state import (CheckpointError, check_coverage, export_tensors,
                                        import_tensors)
from fluxflow_jax.interop.versions import detect_version
from fluxflow_jax.models.bundle import COMPONENT_CLASSES, FluxFlowModels
from fluxflow_jax.models.config import ARCHITECTURES, FluxFlowConfig

WEIGHT_FILES = ("model.safetensors", "flxflow_final.safetensors")
TEXT_ENCODER_FILE = "text_encoder.safetensors"
DISCRIMINATOR_FILE = "D_img.safetensors"
METADATA_FILE = "model_metadata.json"
_LAYOUT_FILES = (*WEIGHT_FILES, TEXT_ENCODER_FILE, DISCRIMINATOR_FILE, METADATA_FILE)
# Non-persistent in current transformers, but files written by transformers < 4.31 hold it.
_IGNORED_KEYS = {"text_encoder.language_model.embeddings.position_ids"}
_VAE_COMPONENTS = ("compressor", "flow_processor", "expander")


class TorchIncompatibilityWarning(UserWarning):
    """A checkpoint written with widths PyTorch ``fluxflow``'s loaders cannot rebuild."""


# Architecture fields the PyTorch loader reads from model_metadata.json (ModelLoaderV03).
_TORCH_ARCHITECTURE_FIELDS = ("vae_dim", "downscales", "flow_dim", "in_channels", "max_hw",
                              "vae_attn_layers", "text_embed_dim", "flow_attn_heads",
                              "flow_transformer_layers", "upscales")


# ----------------------------------------------------------------------------- reading


def load_fluxflow(path: str | os.PathLike, *, dtype: jnp.dtype | None = None
                  ) -> FluxFlowModels:
    """Load a fluxflow checkpoint (directory or single ``.safetensors`` file) into NNX modules.

    The architecture comes from tensor shapes, completed by ``model_metadata.json`` for the
    fields shapes cannot tell (``max_hw``, attention head counts). Components absent from the
    checkpoint are None. Modules are returned in eval mode. ``dtype`` (e.g. ``jnp.float64``)
    casts every tensor; by default they keep the file's float32.
    """
    tensors, metadata, source = _read_checkpoint(Path(path))
    groups = _drop_foreign_networks(_split_components(tensors, source), source)
    if not groups:
        raise CheckpointError(f"{source} holds no fluxflow weights (expected keys starting "
                              "with diffuser.compressor., diffuser.flow_processor., "
                              "diffuser.expander., text_encoder. or D_img.)")
    gamma = sorted(k for k in groups.get("expander", {}) if ".spade.mlp_gamma." in k)
    if gamma:
        raise CheckpointError(
            f"{source} has fluxflow-core 0.2.x SPADE keys (e.g. 'expander.{gamma[0]}'): that "
            "architecture computes different images than PyTorch fluxflow 0.8.1's, which "
            "fluxflow-jax implements. Remove the mlp_gamma keys to load the rest, as "
            "PyTorch fluxflow 0.8.1 does.")
    config = infer_config(groups, metadata.get("architecture", {}),
                          label=metadata.get("model_version"), source=source)
    models = FluxFlowModels(config)
    for name, component_tensors in groups.items():
        setattr(models, name, component_from_tensors(name, config, component_tensors,
                                                     source=source, dtype=dtype))
    return models.eval()


def component_from_tensors(name: str, config: FluxFlowConfig,
                           tensors: Mapping[str, np.ndarray], *, source: str = "state dict",
                           dtype: jnp.dtype | None = None) -> nnx.Module:
    """Build component ``name`` (in eval mode) from its PyTorch state dict, keys unprefixed.

    The module is created abstractly (no random init) and every variable is then filled.
    """
    prefix, build_table = COMPONENT_TABLES[name]
    module = nnx.eval_shape(lambda: COMPONENT_CLASSES[name](config, rngs=nnx.Rngs(0)))
    table = build_table(config)
    check_coverage(module, table)  # every variable gets a value: none stays abstract
    import_tensors(module, table, tensors, source=f"{source} ({prefix}*)", dtype=dtype)
    module.eval()
    return module


def _read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict, str]:
    """All tensors of a checkpoint (by full key), its metadata, and a name for messages."""
    if path.is_dir():
        weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        files = [f for f in (weights, path / TEXT_ENCODER_FILE, path / DISCRIMINATOR_FILE)
                 if f is not None and f.is_file()]
        if not files:
            raise CheckpointError(
                f"{path} holds no checkpoint: expected {' or '.join(WEIGHT_FILES)}, "
                f"{TEXT_ENCODER_FILE} or {DISCRIMINATOR_FILE}")
        metadata_path = path / METADATA_FILE
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: weights are only read from .safetensors files")
        files, metadata_path = [path], path.parent / METADATA_FILE
    else:
        raise CheckpointError(f"{path} does not exist")
    metadata = _read_metadata(metadata_path)
    recorded = _recorded_hashes(path, metadata)
    labels = []
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        data = file.read_bytes()
        if file.name in recorded and hashlib.sha256(data).hexdigest() != recorded[file.name]:
            raise CheckpointError(f"{path} is inconsistent (an interrupted save?): {file.name} "
                                  f"does not match the hash in {METADATA_FILE}")
        labels.append(_header_metadata(data).get("model_version"))
        for key, value in _parse_safetensors(data, file).items():
            # Legacy fluxflow writers put text_encoder.* in both files: fine if identical.
            if key in tensors and not np.array_equal(tensors[key], value):
                raise CheckpointError(f"key '{key}' appears with different values in more "
                                      f"than one file of {path}")
            tensors[key] = value
    # The trainer labels its weights file inside the safetensors header.
    header_label = next((label for label in labels if label is not None), None)
    if header_label is not None:
        metadata.setdefault("model_version", header_label)
    return tensors, metadata, str(path)


def _recorded_hashes(path: Path, metadata: Mapping[str, Any]) -> dict[str, str]:
    """The file hashes fluxflow-jax's metadata records, after checking that a directory
    holds exactly the files it lists; {} for metadata written by PyTorch or by hand."""
    recorded = metadata.get("checksum", {}).get("files")
    if not isinstance(recorded, dict):
        return {}
    if path.is_dir():
        present = {f.name for f in path.iterdir() if f.name in _LAYOUT_FILES} - {METADATA_FILE}
        if present != set(recorded):
            raise CheckpointError(f"{path} is inconsistent (an interrupted save?): "
                                  f"{METADATA_FILE} lists {sorted(recorded)}, the directory "
                                  f"has {sorted(present)}")
    return recorded


def _parse_safetensors(data: bytes, file: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load(data)
    except Exception as err:  # the library raises several types for corrupt headers
        raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from err


def _header_metadata(data: bytes) -> dict:
    """The ``__metadata__`` strings of a safetensors file's header ({} if none)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
    except (ValueError, UnicodeDecodeError):
        return {}  # _parse_safetensors reports the broken file
    found = header.get("__metadata__") if isinstance(header, dict) else None
    return found if isinstance(found, dict) else {}


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(metadata, dict) or not isinstance(metadata.get("architecture", {}),
                                                        dict):
        raise CheckpointError(f"{path} must be a JSON object whose 'architecture' is an "
                              "object")
    return metadata


def _split_components(tensors: Mapping[str, np.ndarray],
                      source: str) -> dict[str, dict[str, np.ndarray]]:
    """Group tensors by component, keys stripped of their prefix.

    As in the reference loader, VAE/flow keys are read behind ``diffuser.`` when any key has
    that prefix, and bare (``compressor.*``) otherwise.
    """
    prefixed = any(k.startswith("diffuser.") for k in tensors)
    prefixes = {name: (prefix if prefixed or name not in _VAE_COMPONENTS
                       else prefix.removeprefix("diffuser."))
                for name, (prefix, _) in COMPONENT_TABLES.items()}
    groups: dict[str, dict[str, np.ndarray]] = {}
    unexpected = []
    for key, value in tensors.items():
        if key in _IGNORED_KEYS:
            continue
        name = next((n for n, p in prefixes.items() if key.startswith(p)), None)
        if name is None:
            unexpected.append(key)
        else:
            groups.setdefault(name, {})[key[len(prefixes[name]):]] = value
    if unexpected:
        shown = ", ".join(f"'{k}'" for k in sorted(unexpected)[:10])
        more = f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""
        raise CheckpointError(f"{source}: unexpected keys {shown}{more} (not part of any "
                              "fluxflow component)")
    return groups


def _drop_foreign_networks(groups: dict[str, dict[str, np.ndarray]],
                           source: str) -> dict[str, dict[str, np.ndarray]]:
    """``groups`` without the networks PyTorch writers save that fluxflow-jax cannot run,
    each named in a warning; a run then initialises them afresh.

    - the fluxflow-training 0.8.1 trainer's discriminator, a different network (plain
      4x4 convolutions, no spectral norm) from the one fluxflow-jax trains;
    - a text encoder saved without its DistilBERT (``language_model.*``), as fluxflow's
      ``save_model`` does by default: the head alone cannot run.
    """
    if "backbone.0.weight" in groups.get("discriminator", {}):
        del groups["discriminator"]
        warnings.warn(f"{source}: D_img.* is fluxflow-training 0.8.1's discriminator, a "
                      "different network from fluxflow-jax's; it is left out (a GAN stage "
                      "starts a fresh one)", stacklevel=3)
    text = groups.get("text_encoder", {})
    if text and not any(k.startswith("language_model.") for k in text):
        del groups["text_encoder"]
        warnings.warn(f"{source}: text_encoder.* holds no language_model.* (saved without "
                      "its DistilBERT weights); the text encoder is left out", stacklevel=3)
    return groups


# ----------------------------------------------------------------------------- config


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.fullmatch(k))})


def _shape_facts(groups: Mapping[str, Mapping[str, np.ndarray]], version: str
                 ) -> dict[str, list[int]]:
    """Architecture fields each component's shapes imply in ``version`` (a field may be
    implied twice)."""
    facts: dict[str, list[int]] = {}
    add = lambda field, value: facts.setdefault(field, []).append(int(value))
    if (c := groups.get("compressor")) and "latent_proj.0.0.weight" in c:
        add("vae_dim", c["latent_proj.0.0.weight"].shape[0] // 5)
        add("in_channels", c["encoder_first_step.0.0.weight"].shape[1] - 2)
        add("downscales", _count(c, r"encoder_z\.(\d+)\.0\.weight"))
        add("vae_attn_layers", _count(c, r"token_attn\.(\d+)\.attn\.in_proj_weight"))
    if (f := groups.get("flow_processor")) and "vae_to_dmodel.weight" in f:
        flow_dim, latent_width = f["vae_to_dmodel.weight"].shape
        add("flow_dim", flow_dim)
        add("vae_dim", latent_width - ARCHITECTURES[version].context_dims)
        add("text_embed_dim", f["text_proj.weight"].shape[1])
        add("flow_transformer_layers", _count(f, r"transformer_blocks\.(\d+)\.self_attn\."
                                                 r"q_proj\.weight"))
        add("time_steps", f["time_embed.0.weight"].shape[0])
        if "transformer_blocks.0.rotary_pe.inv_freq" in f:
            add("flow_attn_heads",
                flow_dim // (2 * f["transformer_blocks.0.rotary_pe.inv_freq"].shape[0]))
    if (e := groups.get("expander")) and "to_rgb_conv.0.weight" in e:
        add("vae_dim", e["to_rgb_conv.0.weight"].shape[1])
        add("in_channels", e["to_rgb_conv.6.weight"].shape[0])
        add("upscales", _count(e, r"upscale\.layers\.(\d+)\.conv1\.0\.weight"))
        if "upscale.layers.0.spade.mlp_shared.0.weight" in e:
            add("spade_hidden", e["upscale.layers.0.spade.mlp_shared.0.weight"].shape[0])
    if (t := groups.get("text_encoder")) and "ouput_layer.3.weight" in t:
        words = t.get("language_model.embeddings.word_embeddings.weight")
        if words is not None:
            add("text_vocab_size", words.shape[0])
            add("text_dim", words.shape[1])
        positions = t.get("language_model.embeddings.position_embeddings.weight")
        if positions is not None:
            add("text_max_positions", positions.shape[0])
        add("text_layers", _count(t, r"language_model\.transformer\.layer\.(\d+)\.attention\."
                                     r"q_lin\.weight"))
        if "language_model.transformer.layer.0.ffn.lin1.weight" in t:
            add("text_hidden_dim", t["language_model.transformer.layer.0.ffn.lin1.weight"]
                .shape[0])
        add("text_head_width", t["ouput_layer.3.weight"].shape[1])
        add("text_embed_dim", t["ouput_layer.4.weight"].shape[0] // 5)
    if (d := groups.get("discriminator")) and "backbone.0.0.weight_orig" in d:
        add("disc_base_channels", d["backbone.0.0.weight_orig"].shape[0])
        add("disc_depth", _count(d, r"backbone\.(\d+)\.conv1\.0\.weight_orig"))
        add("disc_ctx_dim", d["ctx_proj.0.weight_orig"].shape[1]
            if "ctx_proj.0.weight_orig" in d else 0)
    return facts


def infer_config(groups: Mapping[str, Mapping[str, np.ndarray]], architecture: Mapping[str, Any],
                 *, label: object = None, source: str = "checkpoint") -> FluxFlowConfig:
    """The ``FluxFlowConfig`` of a checkpoint: the version from the keys (``label``, the
    metadata's model_version, only where they leave it open), shapes first, metadata for
    the rest.

    A metadata field or a pair of components that disagree with the shapes is an error.
    """
    known = {f.name for f in FluxFlowConfig.__dataclass_fields__.values()} - {"model_version"}
    fields: dict[str, Any] = {k: v for k, v in architecture.items() if k in known}
    fields["model_version"] = detect_version(groups, label, source)
    problems = []
    for field, values in _shape_facts(groups, fields["model_version"]).items():
        if len(set(values)) > 1:
            problems.append(f"components disagree on {field}: {sorted(set(values))}")
            continue
        if field in fields and fields[field] != values[0]:
            problems.append(f"{METADATA_FILE} says {field}={fields[field]} but the weights "
                            f"have {values[0]}")
        fields[field] = values[0]
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    latent_width = ARCHITECTURES[fields["model_version"]].latent_width(
        fields.get("vae_dim", FluxFlowConfig.vae_dim))
    if fields.get("disc_ctx_dim") == latent_width:
        fields["disc_ctx_dim"] = None  # the canonical spelling of "conditioned on the latent"
    try:
        return FluxFlowConfig(**fields)
    except (TypeError, ValueError) as err:  # TypeError: e.g. a string where a number goes
        raise CheckpointError(f"{source}: {METADATA_FILE} architecture: {err}") from err


# ----------------------------------------------------------------------------- writing


def save_fluxflow(path: str | os.PathLike, models: FluxFlowModels, *,
                  weights_name: str = WEIGHT_FILES[1],
                  training_info: Mapping[str, Any] | None = None,
                  warn_torch: bool = True) -> Path:
    """Write ``models`` as a PyTorch-loadable fluxflow checkpoint directory (see module doc).

    Only the components present are written; the VAE/flow file needs all three of
    compressor, flow processor and expander, as the PyTorch pipeline does. Warns
    (``TorchIncompatibilityWarning``; off with ``warn_torch=False`` for a caller that says
    it itself) when the config has values PyTorch ``fluxflow`` cannot rebuild.
    """
    out = Path(path)
    present = models.present()
    vae_parts = [n for n in _VAE_COMPONENTS if n in present]
    if vae_parts and len(vae_parts) != len(_VAE_COMPONENTS):
        missing = sorted(set(_VAE_COMPONENTS) - set(vae_parts))
        raise ValueError(f"cannot write {weights_name} without {missing}: the PyTorch "
                         "pipeline needs compressor, flow_processor and expander together")
    note = models.config.torch_note(tuple(present))
    if note and warn_torch:
        warnings.warn(f"writing {out}: {note}", TorchIncompatibilityWarning, stacklevel=2)
    payloads = {name: serialize_components(models, components)
                for components, name in layout_files(weights_name).items()
                if all(c in present for c in components)}
    metadata = _metadata(models.config, payloads, weights_name if vae_parts else None,
                         training_info)
    out.mkdir(parents=True, exist_ok=True)
    _commit(out, payloads, json.dumps(metadata, indent=2).encode())
    return out


def _commit(out: Path, payloads: Mapping[str, bytes], metadata: bytes) -> None:
    """Replace the checkpoint in ``out`` with ``payloads``, metadata last.

    Every file is first written in full beside its target. The data files are then moved
    into place, layout files this checkpoint does not have are removed (a stale
    ``model.safetensors`` would otherwise shadow a new ``flxflow_final.safetensors``), and
    the metadata, which lists every file's hash, is moved last: a save interrupted before
    that leaves files that no longer match the old metadata, which ``load_fluxflow``
    reports instead of loading a mix.
    """
    temps = {name: write_temp(out / name, data)
             for name, data in {**payloads, METADATA_FILE: metadata}.items()}
    try:
        for name in (*payloads, METADATA_FILE):
            if name == METADATA_FILE:
                for stale in set(_LAYOUT_FILES) - set(payloads) - {METADATA_FILE}:
                    (out / stale).unlink(missing_ok=True)
            os.replace(temps[name], out / name)
            del temps[name]
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def step_file_names(step: str, *, ema: bool = False) -> dict[str, tuple[str, ...]]:
    """{file name: components} of a pipeline step's weights (or of its averages)."""
    kind = "ema" if ema else "final"
    return {f"flxflow_step_{step}_{kind}.safetensors": _VAE_COMPONENTS,
            f"text_encoder_step_{step}{'_ema' if ema else ''}.safetensors": ("text_encoder",),
            f"D_img_step_{step}{'_ema' if ema else ''}.safetensors": ("discriminator",)}


def save_step_files(directory: str | os.PathLike, models: FluxFlowModels, step: str, *,
                    ema: bool = False,
                    copies_of: Mapping[tuple[str, ...], Path] | None = None) -> list[Path]:
    """A pipeline step's weights, beside the run's latest checkpoint, under per-step names:
    ``flxflow_step_<step>_final.safetensors``, ``text_encoder_step_<step>.safetensors`` and
    ``D_img_step_<step>.safetensors`` (``..._ema...`` for averaged weights; each file written
    atomically). They share the directory's ``model_metadata.json`` (``save_fluxflow``),
    whose architecture they have. ``copies_of`` maps components to a file already holding
    exactly their weights (e.g. the latest checkpoint's): their step file becomes a copy of
    it (``atomic_copy``) instead of a second serialization."""
    present = models.present()
    written = []
    for name, components in step_file_names(step, ema=ema).items():
        if all(c in present for c in components):
            source = (copies_of or {}).get(components)
            if source is None:
                atomic_write(Path(directory) / name, serialize_components(models, components))
            else:
                atomic_copy(source, Path(directory) / name)
            written.append(Path(directory) / name)
    return written


def layout_files(weights_name: str = WEIGHT_FILES[1]) -> dict[tuple[str, ...], str]:
    """{components: file name} of the files ``save_fluxflow`` writes."""
    return {_VAE_COMPONENTS: weights_name, ("text_encoder",): TEXT_ENCODER_FILE,
            ("discriminator",): DISCRIMINATOR_FILE}


def serialize_components(models: FluxFlowModels, components: tuple[str, ...]) -> bytes:
    """The components' tensors in PyTorch layout, as one safetensors file."""
    tensors: dict[str, np.ndarray] = {}
    for name in components:
        prefix, build_table = COMPONENT_TABLES[name]
        tensors.update(export_tensors(getattr(models, name), build_table(models.config),
                                      prefix))
    return safetensors.numpy.save(tensors, metadata={"format": "pt"})


def _metadata(config: FluxFlowConfig, payloads: Mapping[str, bytes], weights_name: str | None,
              training_info: Mapping[str, Any] | None) -> dict:
    fields = {f: getattr(config, f) for f in config.__dataclass_fields__
              if f != "model_version"}
    fields["disc_ctx_dim"] = config.discriminator_ctx_dim
    checksum: dict[str, Any] = {"algorithm": "sha256", "files": {
        name: hashlib.sha256(data).hexdigest() for name, data in payloads.items()}}
    if weights_name is not None:  # the field PyTorch fluxflow writes
        checksum["weights_hash"] = checksum["files"][weights_name]
    return {
        "model_version": config.model_version,
        "library_version": f"fluxflow-jax {fluxflow_jax.__version__}",
        # The PyTorch loader's fields first; the rest describe the full JAX config.
        "architecture": {**{f: fields.pop(f) for f in _TORCH_ARCHITECTURE_FIELDS}, **fields},
        "components": ({"compressor": "FluxCompressor", "flow_processor": "FluxFlowProcessor",
                        "expander": "FluxExpander"} if weights_name is not None else {}),
        "training_info": dict(training_info or {}),
        "checksum": checksum,
    }
