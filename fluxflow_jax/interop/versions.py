"""Which PyTorch ``fluxflow`` architecture version a checkpoint holds.

The version labels PyTorch writes cannot be trusted: ``save_versioned_checkpoint`` labels
every pipeline "0.3.0" by default, v060 ones included, and the trainer's files carry no
label at all unless built through its model factory. The keys can: each version adds or
drops tensors (v060 the compressor's ``final_norm`` and no ``expander.context_mixer``,
v070 the compressor's ``context_proj``, v080 the flow's pillar attention). So the keys
decide, and a label only chooses among the versions the keys leave open (e.g. for a file
with the flow processor alone, which is the same in v030, v060 and v070).
"""

from __future__ import annotations

from typing import Mapping

from fluxflow_jax.interop.state import CheckpointError
from fluxflow_jax.models.config import ARCHITECTURES, DEFAULT_VERSION

KNOWN_VERSIONS = tuple(sorted(ARCHITECTURES))


def label_version(label: object) -> str | None:
    """The architecture a PyTorch version label names ("0.6.1" -> "0.6.0"); None if the
    label names none (PyTorch's "legacy" or "0.2.x", or anything else)."""
    parts = str(label).split(".")
    if len(parts) < 2:
        return None
    version = f"{parts[0]}.{parts[1]}.0"
    return version if version in KNOWN_VERSIONS else None


def _key_evidence(groups: Mapping[str, Mapping[str, object]]) -> list[tuple[str, set[str]]]:
    """(what a component's keys show, the versions consistent with it) per component."""
    evidence = []
    if "latent_proj.0.0.weight" in (c := groups.get("compressor", {})):
        if "context_proj.weight" in c:
            evidence.append(("compressor.context_proj", {"0.7.0", "0.8.0"}))
        elif "final_norm.weight" in c:
            evidence.append(("compressor.final_norm", {"0.6.0"}))
        else:
            evidence.append(("a compressor without final_norm", {"0.3.0"}))
    if "to_rgb_conv.0.weight" in (e := groups.get("expander", {})):
        if any(k.startswith("context_mixer.") for k in e):
            evidence.append(("expander.context_mixer", {"0.3.0"}))
        else:
            evidence.append(("an expander without context_mixer", {"0.6.0", "0.7.0", "0.8.0"}))
    if "vae_to_dmodel.weight" in (f := groups.get("flow_processor", {})):
        if any(".pillar_cross_attn." in k for k in f):
            evidence.append(("flow_processor pillar attention", {"0.8.0"}))
        else:
            evidence.append(("a flow_processor without pillar attention",
                             {"0.3.0", "0.6.0", "0.7.0"}))
    return evidence


def detect_version(groups: Mapping[str, Mapping[str, object]], label: object,
                   source: str) -> str:
    """The architecture version of a checkpoint's component tensors (keys unprefixed),
    with ``label`` (its metadata's model_version, or None) deciding only what keys leave
    open; the default version (or the earliest the keys fit) when neither tells."""
    evidence = _key_evidence(groups)
    candidates = set(KNOWN_VERSIONS)
    for _, versions in evidence:
        if not candidates & versions:
            described = "; ".join(f"{what} ({', '.join(sorted(v))})" for what, v in evidence)
            raise CheckpointError(f"{source} mixes architecture versions: {described}")
        candidates &= versions
    labelled = label_version(label) if label is not None else None
    if label is not None and labelled is None and len(candidates) > 1:
        raise CheckpointError(f"{source} declares model_version {label!r}, which names no "
                              f"PyTorch fluxflow architecture ({', '.join(KNOWN_VERSIONS)})")
    if len(candidates) == 1:
        [version] = candidates
    elif labelled in candidates:
        version = labelled
    elif DEFAULT_VERSION in candidates:
        version = DEFAULT_VERSION
    else:  # e.g. a v070 VAE alone, which v080 shares: the earliest version it fits
        version = min(candidates)
    return version
