"""The caption text every source hands on: one line, stripped, optionally prefixed."""

from __future__ import annotations

from fluxflow_jax.data.samples import BadSampleError


def finish_caption(key: str, text: str, prefix: str | None) -> str:
    """``text`` on one line and stripped, as "<prefix>. <text>" when a prefix is set.

    Raises ``BadSampleError`` for ``key`` when nothing is left: an empty caption would train
    the model on no text at all.
    """
    caption = " ".join(text.splitlines()).strip()
    if not caption:
        raise BadSampleError(key, "empty caption")
    return f"{prefix}. {caption}" if prefix else caption
