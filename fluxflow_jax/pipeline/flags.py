"""The reference's training flags (``fluxflow-train``), as overrides of the YAML config.

Every flag maps to one config key. Only the flags given on the command line override the
file (in any spelling, ``--lr 1e-4`` or ``--lr=1e-4``); the schema's defaults fill the rest.
"""

from __future__ import annotations

import argparse
from typing import Any

# (flag, section, key, kind): kind is a type, "flag" (store_true), or (type, "+") for lists.
FLAGS: tuple[tuple[str, str, str, Any], ...] = (
    # data
    ("data_path", "data", "data_path", str),
    ("captions_file", "data", "captions_file", str),
    ("fixed_prompt_prefix", "data", "fixed_prompt_prefix", str),
    ("use_webdataset", "data", "use_webdataset", "flag"),
    ("webdataset_token", "data", "webdataset_token", str),
    ("webdataset_url", "data", "webdataset_url", str),
    ("webdataset_image_key", "data", "webdataset_image_key", str),
    ("webdataset_label_key", "data", "webdataset_label_key", str),
    ("webdataset_caption_key", "data", "webdataset_caption_key", str),
    ("webdataset_size", "data", "webdataset_size", int),
    ("webdataset_samples_per_shard", "data", "webdataset_samples_per_shard", int),
    ("use_tt2m", "data", "use_webdataset", "flag"),  # deprecated alias
    ("tt2m_token", "data", "webdataset_token", str),  # deprecated alias
    ("use_demo", "data", "use_demo", "flag"),
    ("tfds_name", "data", "tfds_name", str),
    ("tokenizer_name", "data", "tokenizer_name", str),
    ("img_size", "data", "img_size", int),
    ("channels", "data", "channels", int),
    ("reduced_min_sizes", "data", "reduced_min_sizes", (int, "+")),
    ("dataloader_max_retries", "data", "dataloader_max_retries", int),
    ("dataloader_retry_delay", "data", "dataloader_retry_delay", float),
    # model
    ("model_checkpoint", "model_checkpoint", "", str),
    ("model_version", "model", "model_version", str),
    ("vae_dim", "model", "vae_dim", int),
    ("text_embedding_dim", "model", "text_embed_dim", int),
    ("feature_maps_dim", "model", "flow_dim", int),
    ("feature_maps_dim_disc", "model", "feature_maps_dim_disc", int),
    ("pretrained_bert_model", "model", "pretrained_bert_model", str),
    # training
    ("n_epochs", "training", "n_epochs", int),
    ("batch_size", "training", "batch_size", int),
    ("workers", "training", "workers", int),
    ("lr", "training", "lr", float),
    ("lr_min", "training", "lr_min", float),
    ("preserve_lr", "training", "preserve_lr", "flag"),
    ("optim_sched_config", "training", "optim_sched_config", str),
    ("training_steps", "training", "training_steps", int),
    ("use_fp16", "training", "use_fp16", "flag"),
    ("precision", "training", "precision", str),
    ("remat", "training", "remat", "flag"),
    ("initial_clipping_norm", "training", "initial_clipping_norm", float),
    ("gradient_accumulation_steps", "training", "gradient_accumulation_steps", int),
    ("max_steps", "training", "max_steps", int),
    ("seed", "training", "seed", int),
    ("devices", "training", "devices", int),
    ("shard_params", "training", "shard_params", "flag"),
    ("distributed", "training", "distributed", "flag"),
    ("coordinator_address", "training", "coordinator_address", str),
    ("num_processes", "training", "num_processes", int),
    ("process_id", "training", "process_id", int),
    ("train_vae", "training", "train_vae", "flag"),
    ("gan_training", "training", "gan_training", "flag"),
    ("use_lpips", "training", "use_lpips", "flag"),
    ("train_spade", "training", "train_spade", "flag"),
    ("train_diff", "training", "train_diff", "flag"),
    ("train_diff_full", "training", "train_diff_full", "flag"),
    ("kl_beta", "training", "kl_beta", float),
    ("kl_warmup_steps", "training", "kl_warmup_steps", int),
    ("kl_free_bits", "training", "kl_free_bits", float),
    ("lambda_adv", "training", "lambda_adv", float),
    ("lambda_lpips", "training", "lambda_lpips", float),
    # output
    ("output_path", "output", "output_path", str),
    ("log_interval", "output", "log_interval", int),
    ("checkpoint_save_interval", "output", "checkpoint_save_interval", int),
    ("samples_per_checkpoint", "output", "samples_per_checkpoint", int),
    ("sample_interval", "output", "sample_interval", int),
    ("no_samples", "output", "no_samples", "flag"),
    ("generate_diagrams", "output", "generate_diagrams", "flag"),
    ("test_image_address", "output", "test_image_address", (str, "+")),
    ("sample_captions", "output", "sample_captions", (str, "+")),
    ("sample_steps", "output", "sample_steps", int),
    ("profile_steps", "output", "profile_steps", str),
    ("sample_sizes", "output", "sample_sizes", (lambda text: int(text) if text.isdigit()
                                                 else text, "+")),  # 512 or WxH
)
_GROUPS = {"data": "data", "model": "model", "model_checkpoint": "model",
           "training": "training", "output": "output"}


def flag_name(section: str, key: str = "") -> str:
    """The flag that sets ``section.key`` (the first listed where several do)."""
    return next(flag for flag, s, k, _ in FLAGS if (s, k) == (section, key))


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Add every flag of ``FLAGS``; a flag not given leaves no attribute (the YAML's or the
    schema's value stands)."""
    groups = {name: parser.add_argument_group(name) for name in dict.fromkeys(
        _GROUPS.values())}
    for flag, section, key, kind in FLAGS:
        target = f"{section}.{key}" if key else section
        options: dict[str, Any] = {"dest": f"override:{flag}", "default": argparse.SUPPRESS,
                                   "help": f"sets {target}"}
        if kind == "flag":
            options["action"] = "store_true"
        elif isinstance(kind, tuple):
            options.update(type=kind[0], nargs=kind[1])
        else:
            options["type"] = kind
        groups[_GROUPS[section]].add_argument(f"--{flag}", **options)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{section: {key: value}} (``model_checkpoint``: the path) of the flags given."""
    out: dict[str, Any] = {}
    for flag, section, key, _ in FLAGS:
        dest = f"override:{flag}"
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if section == "model_checkpoint":
            out[section] = value
        else:
            out.setdefault(section, {})[key] = value
    return out
