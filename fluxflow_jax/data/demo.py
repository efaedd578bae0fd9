"""A procedural text-to-image dataset: coloured shapes with captions that describe them.

Quickstarts and tests train on it with nothing to download. A sample is a function of
(seed, index) alone, through a hash rather than a random-number stream, so it never changes
between runs, processes or library versions; the caption always tells the truth: the named
colour is at the shape's centre and the named background fills the image's corners.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from fluxflow_jax.data.samples import RawSample

# Far enough apart that no two are confused at a glance or by a model.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "orange": (250, 140, 20),
    "yellow": (250, 220, 30),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (30, 70, 220),
    "purple": (130, 50, 190),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Radius (centre to the farthest point) as a fraction of the image's short side.
SIZES = {"small": 0.12, "medium": 0.18, "large": 0.25}
# Where the centre is, as fractions of (width, height). A shape never reaches past 0.55 of
# the width from its side's edge, so the opposite side's corners show the background.
POSITIONS = {
    "in the top left": (0.3, 0.3), "at the top": (0.5, 0.3), "in the top right": (0.7, 0.3),
    "on the left": (0.3, 0.5), "in the middle": (0.5, 0.5), "on the right": (0.7, 0.5),
    "in the bottom left": (0.3, 0.7), "at the bottom": (0.5, 0.7),
    "in the bottom right": (0.7, 0.7),
}
TWO_TONE_SHARE = 4  # one background in this many is two-tone: top half, then bottom half


@dataclass(frozen=True)
class Scene:
    """What one sample shows; the caption and the pixels are both drawn from it."""

    shape: str
    colour: str
    size: str
    position: str
    background: tuple[str, ...]  # one colour, or the top half's and the bottom half's
    height: int
    width: int

    @property
    def caption(self) -> str:
        backdrop = " and ".join(self.background)
        article = "an" if backdrop[0] in "aeiou" else "a"
        return (f"a {self.size} {self.colour} {self.shape} {self.position} "
                f"on {article} {backdrop} background")


def _picker(seed: int, index: int):
    """Successive choices from a 256-bit hash of (seed, index): stable everywhere."""
    digest = hashlib.blake2b(f"fluxflow-demo/{seed}/{index}".encode(), digest_size=32).digest()
    state = int.from_bytes(digest, "little")

    def pick(options: Sequence):
        nonlocal state
        state, choice = divmod(state, len(options))
        return options[choice]

    return pick


def _polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Vertices of a regular polygon or star around (cx, cy), the first one pointing up."""
    points, inner = {"square": (4, None), "triangle": (3, None), "star": (5, 0.45),
                     "diamond": (4, None)}[shape]
    turn = math.pi / 4 if shape == "square" else 0.0  # a square stands on its side
    radii = [radius] if inner is None else [radius, radius * inner]
    count = points * len(radii)
    return [(cx + radii[k % len(radii)] * math.sin(2 * math.pi * k / count + turn),
             cy - radii[k % len(radii)] * math.cos(2 * math.pi * k / count + turn))
            for k in range(count)]


def render(scene: Scene) -> np.ndarray:
    """The scene's pixels, uint8 [H, W, 3]; flat colours, no anti-aliasing."""
    image = Image.new("RGB", (scene.width, scene.height), COLOURS[scene.background[0]])
    draw = ImageDraw.Draw(image)
    if len(scene.background) == 2:
        draw.rectangle((0, scene.height // 2, scene.width, scene.height),
                       fill=COLOURS[scene.background[1]])
    fx, fy = POSITIONS[scene.position]
    cx, cy = fx * scene.width, fy * scene.height
    radius = SIZES[scene.size] * min(scene.width, scene.height)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, radius), fill=fill)
    return np.array(image)


class DemoSource:
    """``length`` captioned shape images, height ``image_size``, one of ``aspect_ratios`` each.

    Width is ``image_size * ratio`` rounded to a multiple of 16 (at least 16), so several
    ratios give several sizes for batching by size to sort out.
    """

    def __init__(self, length: int = 1024, image_size: int = 64, seed: int = 0,
                 aspect_ratios: Sequence[float] = (1.0,)):
        if length < 0 or image_size < 16 or not aspect_ratios or min(aspect_ratios) <= 0:
            raise ValueError(f"need length >= 0, image_size >= 16 and positive aspect ratios; "
                             f"got {length}, {image_size}, {tuple(aspect_ratios)}")
        self.length, self.height, self.seed = length, image_size, seed
        self.widths = tuple(max(16, round(image_size * ratio / 16) * 16)
                            for ratio in aspect_ratios)

    def __len__(self) -> int:
        return self.length

    def _check(self, index: int) -> None:
        if not 0 <= index < self.length:
            raise IndexError(f"demo index {index} out of range [0, {self.length})")

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample ``index``, without rendering it."""
        self._check(index)
        return self.height, _picker(self.seed, index)(self.widths)

    def scene(self, index: int) -> Scene:
        """What sample ``index`` shows."""
        self._check(index)
        pick = _picker(self.seed, index)
        width = pick(self.widths)  # first, so image_size agrees without the rest
        colour = pick(tuple(COLOURS))
        others = tuple(name for name in COLOURS if name != colour)
        background = (pick(others),)
        if pick(range(TWO_TONE_SHARE)) == 0:
            background += (pick(tuple(name for name in others if name != background[0])),)
        return Scene(shape=pick(SHAPES), colour=colour, size=pick(tuple(SIZES)),
                     position=pick(tuple(POSITIONS)), background=background,
                     height=self.height, width=width)

    def __getitem__(self, index: int) -> RawSample:
        scene = self.scene(index)
        return RawSample(key=f"demo/{index}", image=render(scene), caption=scene.caption)
