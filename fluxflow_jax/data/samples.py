"""What every data source yields: a raw sample, decoded later in a loader worker.

Sources only say where an image is and what its caption is; decoding, resizing and
tokenising happen in the loader's workers, so a source stays cheap to index and a bad image
costs one skipped sample, never a crashed run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

# A file to read, encoded bytes (PNG, JPEG, WebP...), or already decoded pixels [H, W, C].
ImagePayload = Union[Path, bytes, np.ndarray]


class BadSampleError(Exception):
    """One sample that cannot be used (unreadable image, empty caption...).

    ``key`` names it (a file path, or shard and key) so the report says which one.
    """

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


@dataclass(frozen=True)
class RawSample:
    key: str  # where the sample came from, for messages
    image: ImagePayload
    caption: str


_UNREADABLE = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
               SyntaxError)


def _open(payload: Path | bytes) -> Image.Image:
    return Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload)


def decode_image(sample: RawSample) -> Image.Image:
    """The sample's image as RGB, fully decoded; ``BadSampleError`` if that fails."""
    payload = sample.image
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim not in (2, 3):
            raise BadSampleError(sample.key, f"pixel array of dtype {payload.dtype} and shape "
                                             f"{payload.shape}; expected uint8 [H, W(, C)]")
        array = payload if payload.ndim == 3 else payload[..., None]
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(array[..., :3]))
    try:
        with _open(payload) as image:
            image.load()  # decode now: truncated files fail here, not later
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadSampleError(sample.key, "image file not found") from None
    except _UNREADABLE as err:
        raise BadSampleError(sample.key, f"unreadable image ({err})") from None


def header_size(payload: ImagePayload) -> tuple[int, int] | None:
    """(height, width) from the image header without decoding the pixels; None when the
    header cannot be read (a missing, empty, corrupt or oversized image)."""
    if isinstance(payload, np.ndarray):
        return payload.shape[0], payload.shape[1]
    try:
        with _open(payload) as image:
            return image.height, image.width
    except _UNREADABLE:
        return None
