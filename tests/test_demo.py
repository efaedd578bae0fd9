"""The demo dataset: deterministic, varied, sized as announced, and captioned truthfully."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fluxflow_jax.data.demo import COLOURS, POSITIONS, SHAPES, SIZES, DemoSource
from fluxflow_jax.data.samples import decode_image

CAPTION = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(POSITIONS)}) on an? ({'|'.join(COLOURS)})(?: and ({'|'.join(COLOURS)}))? "
    r"background")


def parse(caption):
    match = CAPTION.fullmatch(caption)
    assert match, caption
    size, colour, shape, position, top, bottom = match.groups()
    return size, colour, shape, position, top, bottom or top


def test_same_seed_and_index_same_sample():
    a, b = (DemoSource(seed=3, aspect_ratios=(1.0, 2.0)) for _ in range(2))
    for index in (0, 1, 17, 1000):
        x, y = a[index], b[index]
        assert x.key == y.key == f"demo/{index}" and x.caption == y.caption
        np.testing.assert_array_equal(x.image, y.image)
    other = DemoSource(seed=4, aspect_ratios=(1.0, 2.0))
    assert [a[i].caption for i in range(20)] != [other[i].caption for i in range(20)]


def test_captions_are_pinned():
    """Hash-based choices: these never change, whatever the platform or library versions."""
    source = DemoSource()
    assert [source[i].caption for i in range(3)] == [
        "a small purple diamond on the left on a pink background",
        "a small red triangle in the middle on an orange background",
        "a medium pink star in the middle on a brown background",
    ]


def test_samples_vary():
    source = DemoSource(length=300, image_size=32)
    parsed = [parse(source[i].caption) for i in range(len(source))]
    sizes, colours, shapes, positions, tops, _ = map(set, zip(*parsed))
    assert shapes == set(SHAPES) and sizes == set(SIZES) and positions == set(POSITIONS)
    assert colours == set(COLOURS) and tops == set(COLOURS)
    assert any(top != bottom for *_, top, bottom in parsed)  # some two-tone backgrounds
    assert len({source[i].caption for i in range(len(source))}) > 250
    assert len({source[i].image.tobytes() for i in range(len(source))}) > 250


@pytest.mark.parametrize("image_size, ratios", [(64, (1.0,)), (48, (0.5, 1.0, 1.7))])
def test_captions_tell_the_truth(image_size, ratios):
    source = DemoSource(length=400, image_size=image_size, seed=1, aspect_ratios=ratios)
    for index in range(len(source)):
        sample = source[index]
        _, colour, _, position, top, bottom = parse(sample.caption)
        height, width = sample.image.shape[:2]
        fx, fy = POSITIONS[position]
        centre = sample.image[int(fy * height), int(fx * width)]
        assert tuple(centre) == COLOURS[colour], sample.caption
        column = width - 1 if fx <= 0.5 else 0  # the side away from the shape
        assert tuple(sample.image[0, column]) == COLOURS[top], sample.caption
        assert tuple(sample.image[-1, column]) == COLOURS[bottom], sample.caption
        assert colour not in (top, bottom)


def test_image_size_is_the_rendered_size():
    source = DemoSource(length=200, image_size=64, aspect_ratios=(1.0, 1.5, 0.75))
    sizes = set()
    for index in range(len(source)):
        sample = source[index]
        assert sample.image.dtype == np.uint8
        assert sample.image.shape == (*source.image_size(index), 3)
        sizes.add(source.image_size(index))
    assert sizes == {(64, 64), (64, 96), (64, 48)}
    assert decode_image(source[5]).size == source.image_size(5)[::-1]


def test_bounds_and_arguments():
    source = DemoSource(length=5)
    assert len(source) == 5
    with pytest.raises(IndexError):
        source[5]
    with pytest.raises(IndexError):
        source.image_size(-1)
    assert len(list(source)) == 5  # iteration stops at IndexError
    with pytest.raises(ValueError):
        DemoSource(aspect_ratios=())
    with pytest.raises(ValueError):
        DemoSource(image_size=8)
