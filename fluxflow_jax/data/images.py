"""Image geometry and normalisation for training: which size an image is trained at, and how.

The main version of an image keeps its aspect ratio as well as a 16-pixel grid allows (the
reference's "min-distortion" resize), so batches group images by that size rather than
cropping them; ``bucket_of`` gives it from the header size alone, before any decoding.
Optional reduced versions (smaller short sides) train the same image at lower resolutions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image

_LANCZOS = Image.Resampling.LANCZOS


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@functools.lru_cache(maxsize=4096)
def aspect_size(width: int, height: int, side: int, multiple: int = 16) -> tuple[int, int]:
    """The (width, height) a ``width`` x ``height`` image is trained at for short side ``side``.

    The reference's min-distortion rule: both sides range over the multiples of ``multiple``
    in [side, ceil(side * long / short / multiple) * multiple]; the pair whose aspect ratio is
    closest to the image's, by |log(w/h / W/H)|, wins, ties going to the smallest area.

    The upper bound is exact integer arithmetic. (The reference, which always uses the
    image's own short side, bounds the range in floats from the long side rounded up to 16;
    for about 1 image in 20 that overshoots by one grid step, and about 1 in 30 then gets a
    slightly different size.)

    For each height only the two grid widths around ``height * W/H`` can be closest, so only
    those are scored: the full grid's answer in linear time, which keeps banner-shaped images
    (a range of thousands of sizes) cheap.
    """
    if min(width, height, side, multiple) < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height}, side {side}, "
                         f"multiple {multiple}")
    short, long = min(width, height), max(width, height)
    low = _ceil_div(side, multiple) * multiple
    high = _ceil_div(side * long, short * multiple) * multiple  # on the grid and >= side
    sizes = np.arange(low, high + 1, multiple)
    above = np.searchsorted(sizes, sizes * (width / height))  # first width >= the ideal one
    nearest = np.clip(np.stack([above - 1, above], axis=1), 0, len(sizes) - 1)
    # Height-major, widths ascending, and the same float operations as the reference's full
    # grid, so exact ties (equal ratios) and their area tie-break pick the same pair.
    widths, heights = sizes[nearest].ravel(), np.repeat(sizes, 2)
    distortions = np.abs(np.log(widths / heights / (width / height)))
    candidates = np.nonzero(distortions == distortions.min())
    areas = widths[candidates] * heights[candidates]
    best = np.argmin(areas)
    return int(widths[candidates][best]), int(heights[candidates][best])


def bucket_of(width: int, height: int, scale: int) -> tuple[int, int]:
    """The (height, width) of an image's main version, from its header size alone.

    Images with equal buckets can share a batch without being decoded first.
    """
    main_width, main_height = aspect_size(width, height, scale)
    return main_height, main_width


def reduced_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with short side ``short_side`` and the long one scaled to match, both
    floored to a multiple of 16 (at least 16), as the reference sizes its reduced scales."""
    ratio = width / height
    if width <= height:
        new_width, new_height = short_side, round(short_side / ratio)
    else:
        new_width, new_height = round(short_side * ratio), short_side
    return max(16, new_width // 16 * 16), max(16, new_height // 16 * 16)


def batch_versions(image: Image.Image, size: tuple[int, int],
                   reduced_min_sizes: Sequence[int] = ()) -> list[Image.Image]:
    """The scales an image trains at in a batch whose main size is ``size`` (height, width),
    smallest first, all Lanczos-resampled from the original.

    One reduced scale for each of ``reduced_min_sizes`` below the batch's short side, sized
    from the batch's aspect (not the image's), so every image of a batch, and every batch of
    one main size, has the same scales and shapes.
    """
    height, width = size
    versions = [image.resize(reduced_size(width, height, short), _LANCZOS)
                for short in sorted(reduced_min_sizes) if short < min(width, height)]
    versions.append(image if image.size == (width, height)
                    else image.resize((width, height), _LANCZOS))
    return versions


def fixed_size(image: Image.Image, size: int) -> Image.Image:
    """A ``size`` x ``size`` centre crop after scaling the short side to ``size`` (Lanczos).

    For models and metrics that need one square size regardless of the image's shape.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.resize((new_width, new_height), _LANCZOS)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def to_array(image: Image.Image) -> np.ndarray:
    """An RGB image as float32 [H, W, 3] in [-1, 1]: ``(x / 255 - 0.5) / 0.5``, as trained on."""
    pixels = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, np.float32)
    return (pixels / 255.0 - 0.5) / 0.5
