"""Does an image show what its demo caption says? Scores background, shape colour and
position against the scene the caption was written from.

Everything comes from the dataset's own definitions (``fluxflow_jax.data.demo``): the
palette, where each position puts the shape's centre, how two-tone backgrounds split. A
pixel's colour is the palette colour nearest to it, so the scorer needs no thresholds:

- background: the median colour of the corner patches (top corners for the top half's
  colour, bottom corners for the bottom half's); no shape reaches a corner patch;
- shape colour: the median colour of a small patch at the named position's centre;
- position: the centroid of the pixels of the named shape colour, assigned to the nearest
  of the dataset's positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fluxflow_jax.data.demo import COLOURS, POSITIONS, SIZES, Scene

ATTRIBUTES = ("background", "shape_colour", "position")
_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], np.float32)


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Palette indices of RGB pixels [..., 3] (0-255)."""
    distances = ((pixels[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    return distances.argmin(-1)


def _named(pixels: np.ndarray) -> str:
    """The palette name of a patch's per-channel median colour."""
    return _NAMES[int(nearest_colours(np.median(pixels.reshape(-1, 3), axis=0)))]


def _centre(scene: Scene, position: str) -> tuple[float, float]:
    fx, fy = POSITIONS[position]
    return fx * scene.width, fy * scene.height


def background(image: np.ndarray) -> tuple[str, str]:
    """(top half's, bottom half's) background colour, read in the corners."""
    height, width = image.shape[:2]
    side = max(1, min(height, width) // 16)  # well clear of the largest shape
    top = np.concatenate([image[:side, :side], image[:side, -side:]])
    bottom = np.concatenate([image[-side:, :side], image[-side:, -side:]])
    return _named(top), _named(bottom)


def shape_colour(image: np.ndarray, scene: Scene) -> str:
    """The colour at the centre of the position the caption names."""
    cx, cy = _centre(scene, scene.position)
    # A quarter of the smallest shape's radius: inside even a small star's core.
    reach = max(1, round(min(SIZES.values()) * min(scene.height, scene.width) / 4))
    x, y = int(cx), int(cy)
    return _named(image[max(0, y - reach + 1):y + reach, max(0, x - reach + 1):x + reach])


def position(image: np.ndarray, scene: Scene) -> str | None:
    """The dataset position nearest to the centroid of the caption colour's pixels (None
    when no pixel has that colour)."""
    mask = nearest_colours(image) == _NAMES.index(scene.colour)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
    return min(POSITIONS, key=lambda name: (_centre(scene, name)[0] - cx) ** 2
               + (_centre(scene, name)[1] - cy) ** 2)


def score(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Which of the caption's attributes ``image`` (uint8 [H, W, 3]) shows."""
    top, bottom = background(image)
    expected = (scene.background[0], scene.background[-1])
    return {"background": (top, bottom) == expected,
            "shape_colour": shape_colour(image, scene) == scene.colour,
            "position": position(image, scene) == scene.position}


def chance(scenes: Sequence[Scene]) -> dict[str, float]:
    """Accuracy of uniform guessing among the dataset's choices: one palette colour per
    background half (two-tone backgrounds need both), the shape colour, the position."""
    colours = len(COLOURS)
    return {"background": float(np.mean([colours ** -len(s.background) for s in scenes])),
            "shape_colour": 1 / colours, "position": 1 / len(POSITIONS)}


def accuracy(images: Sequence[np.ndarray], scenes: Sequence[Scene]) -> dict[str, float]:
    """Share of images showing each attribute of their scene's caption."""
    scores = [score(image, scene) for image, scene in zip(images, scenes, strict=True)]
    return {name: float(np.mean([s[name] for s in scores])) for name in ATTRIBUTES}
