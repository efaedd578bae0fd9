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
            image.seek(0)  # an animation trains on its first frame
            image.load()  # decode now: truncated files fail here, not later
            return to_rgb(image, sample.key)
    except FileNotFoundError:
        raise BadSampleError(sample.key, "image file not found") from None
    except _UNREADABLE as err:
        raise BadSampleError(sample.key, f"unreadable image ({err})") from None


# Integer modes wider than 8 bits: Pillow's own conversion clips them at 255 (a 16-bit
# grayscale image would train as near-white), so they are scaled down here.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WHITE = (255, 255, 255)


def to_rgb(image: Image.Image, key: str) -> Image.Image:
    """8-bit RGB pixels of any image mode: 16-bit grayscale scaled to 8 bits, transparency
    (alpha channels and transparent palette entries) composited over white, CMYK, palette
    and the rest through Pillow; ``BadSampleError`` for float pixels (no known range)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_INTEGER_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if image.mode == "F":
        raise BadSampleError(key, "32-bit float pixels (mode F) have no known range; save the "
                                  "image as 8- or 16-bit")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def header_size(payload: ImagePayload, key: str) -> tuple[int, int]:
    """(height, width) from the image header without decoding the pixels;
    ``BadSampleError`` for ``key`` saying why when it cannot be read (a missing file, a
    file that is not an image, an oversized one)."""
    if isinstance(payload, np.ndarray):
        return payload.shape[0], payload.shape[1]
    try:
        with _open(payload) as image:
            return image.height, image.width
    except FileNotFoundError:
        raise BadSampleError(key, "image file not found") from None
    except IsADirectoryError:
        raise BadSampleError(key, "a directory, not an image file") from None
    except _UNREADABLE as err:
        raise BadSampleError(key, f"not a readable image ({err})") from None
