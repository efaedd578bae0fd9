"""Cached text features: each caption run through a frozen language model once, kept on disk.

A flow step whose language model (the text encoder's DistilBERT) is frozen runs it in eval
mode, so a caption gives the same features every epoch, while the language model is most
of the step's work at the full DistilBERT's size. With ``cache_text: true`` each caption's
features (``BertTextEncoder.features``: the last hidden state averaged over its positions)
are computed once and stored; the train step runs only the head on them
(``BertTextEncoder.project``), which still trains. Entries are found by the caption's token
ids and attention mask (``encoding_cache``), so another tokenizer or ``max_length`` finds
none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from fluxflow_jax.models.text_encoder import in_language_model
from fluxflow_jax.pipeline.encoding_cache import EncodingCache, own_copy, weights_digest
from fluxflow_jax.training.flow_step import TEXT_FEATURES
from fluxflow_jax.training.state import Networks


class TextCache(EncodingCache):
    """The features of one frozen language model, stored in ``root / <weights digest>``.
    The digest covers the language model's weights only: the head may go on training."""

    def __init__(self, root: Path, nets: Networks, params: Any, buffers: Any,
                 model_version: str):
        language_model = {k: params[k] for k in params if in_language_model((k,))}
        folder = Path(root) / weights_digest(language_model, buffers, model_version,
                                             nets.compute_dtype)
        encode = jax.jit(lambda p, b, ids, mask: (nets.outputs(
            nets.bind("text_encoder", p, b).features(ids, mask)),))
        encoder = {"text_encoder": own_copy(params)}, {"text_encoder": own_copy(buffers)}
        super().__init__(folder, lambda ids, mask: encode(*encoder, ids, mask),
                         ("input_ids", "attention_mask"), (TEXT_FEATURES,))
