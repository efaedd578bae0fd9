"""Training image geometry: hand-computed sizes, an independent search, versions, crops."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.data.images import (aspect_size, batch_versions, bucket_of, fixed_size,
                                      reduced_size, to_array)


def search(width, height, side, multiple=16):
    """The min-distortion rule written as a plain loop over every grid pair."""
    long, short = max(width, height), min(width, height)
    top = max(side, math.ceil(Fraction(side * long, short * multiple)) * multiple)
    grid = [s for s in range(side, top + 1) if s % multiple == 0]
    scored = [(abs(math.log((w / h) / (width / height))), w * h, w, h) for w in grid for h in grid]
    _, _, w, h = min(scored)
    return w, h


@pytest.mark.parametrize("width, height, side, expected", [
    # 4:3 at 256: the range is [256, ceil(256 * 4/3 / 16) * 16] = [256, 352], i.e. 16 * [16, 22].
    # 4:3 itself needs 16 * (4k, 3k) with 3k >= 16, so 4k >= 24 > 22: unreachable. The closest
    # fractions of [16, 22] are 21/16 = 1.3125 (|log| 0.0157) and 22/17 = 1.294 (0.0298).
    (1024, 768, 256, (336, 256)),
    (768, 1024, 256, (256, 336)),  # the same, portrait
    (500, 500, 256, (256, 256)),  # square: range [256, 256]
    (500, 500, 250, (256, 256)),  # off-grid side: rounded up to 256
    # 4:1 at 256: range [256, 1024] holds 1024/256 exactly; any larger pair has a larger area.
    (2000, 500, 256, (1024, 256)),
    # 10:3 at 256: range 16 * [16, ceil(53.33)] = 16 * [16, 54]. Only height 16 (x 16) leaves
    # room for ~3.33; of 53/16 = 3.3125 (|log| 0.0063) and 54/16 = 3.375 (0.0124), 53 wins.
    (1000, 300, 256, (848, 256)),
    (300, 1000, 256, (256, 848)),
    # 3:5 at 256: range 16 * [16, ceil(26.67)] = 16 * [16, 27]; 5:3 needs 16 * (3k, 5k),
    # 5k <= 27 means 3k < 16. Best: 27/16 = 1.6875 (|log| 0.0124) over 26/16 (0.0253).
    (300, 500, 256, (256, 432)),
])
def test_aspect_size_hand_computed(width, height, side, expected):
    assert aspect_size(width, height, side) == expected
    assert bucket_of(width, height, side) == expected[::-1]


def test_aspect_size_matches_a_plain_search():
    rng = np.random.default_rng(0)
    short, ratio = rng.integers(16, 2000, 300), rng.uniform(1, 4, 300)
    sides = rng.choice([64, 128, 200, 256], 300)
    cases = [(int(s * r), int(s), int(side)) for s, r, side in zip(short, ratio, sides)]
    cases += [(h, w, side) for w, h, side in cases[:100]]  # portrait
    cases += [(w, h, 256) for w in range(200, 1200, 97) for h in range(200, 1200, 89)]
    cases += [(5000, 300, 128), (97, 1601, 64)]  # banners
    for width, height, side in cases:
        w, h = aspect_size(width, height, side)
        assert (w, h) == search(width, height, side), (width, height, side)
        assert w % 16 == h % 16 == 0 and min(w, h) >= side


def test_aspect_size_banner_is_cheap():
    assert aspect_size(100_000, 100, 512) == (512_000, 512)  # a 32000-size range, not 32000^2


def test_aspect_size_other_multiple():
    assert aspect_size(1024, 768, 256, multiple=8) == search(1024, 768, 256, multiple=8)
    with pytest.raises(ValueError):
        aspect_size(0, 10, 256)


def noise(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels), pixels


def test_reduced_sizes_follow_the_reference_rounding():
    # 128 -> long side round(170.67) = 171 -> 160; 256 -> 341 -> 336; 512 -> 683 -> 672.
    assert [reduced_size(1024, 768, s) for s in (128, 256, 512)] == [
        (160, 128), (336, 256), (672, 512)]
    # Portrait: 64 -> round(106.67) = 107 -> 96; 128 -> 213 -> 208; never below 16.
    assert [reduced_size(300, 500, s) for s in (64, 128)] == [(64, 96), (128, 208)]
    assert reduced_size(1000, 10, 8) == (800, 16)


def test_batch_versions_share_shapes_within_a_batch():
    """Two images of different shapes in one (256, 336) batch: the same scales, sized from
    the batch's aspect; a reduced size not below the batch's short side is left out."""
    for width, height in ((1024, 768), (600, 600)):
        image, _ = noise(width, height)
        versions = batch_versions(image, (256, 336), reduced_min_sizes=[256, 128, 64])
        assert [v.size for v in versions] == [(80, 64), (160, 128), (336, 256)]
        assert all(v.mode == "RGB" for v in versions)


def test_batch_versions_are_lanczos_resizes_of_the_original():
    image, pixels = noise(320, 240)
    small, main = batch_versions(image, (256, 336), reduced_min_sizes=[64])
    np.testing.assert_array_equal(np.asarray(small),
                                  np.asarray(image.resize((80, 64), Image.Resampling.LANCZOS)))
    np.testing.assert_array_equal(
        np.asarray(main), np.asarray(image.resize((336, 256), Image.Resampling.LANCZOS)))
    image, pixels = noise(336, 256)
    np.testing.assert_array_equal(np.asarray(batch_versions(image, (256, 336))[0]), pixels)


@pytest.mark.parametrize("width, height, window", [
    (192, 64, np.s_[:, 64:128]),  # wide, already at size: the middle third exactly
    (64, 201, np.s_[68:132, :]),  # tall: (201 - 64) // 2 = 68 rows above
])
def test_fixed_size_is_a_centre_crop(width, height, window):
    image, pixels = noise(width, height)
    out = fixed_size(image, 64)
    assert out.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(out), pixels[window])


def test_fixed_size_scales_the_short_side_first():
    bands = np.zeros((128, 384, 3), np.uint8)
    bands[:, :128, 0] = bands[:, 128:256, 1] = bands[:, 256:, 2] = 255  # red | green | blue
    out = np.asarray(fixed_size(Image.fromarray(bands), 64)).astype(int)
    assert out.shape == (64, 64, 3)
    # Downscaled 2x, the green band is exactly the crop; away from its edges it is pure green.
    assert np.abs(out[:, 8:56] - [0, 255, 0]).max() <= 1
    assert fixed_size(Image.fromarray(bands), 100).size == (100, 100)


def test_to_array_range_and_dtype():
    pixels = np.array([[[0, 128, 255], [255, 0, 64]]], np.uint8)
    array = to_array(Image.fromarray(pixels))
    assert array.dtype == np.float32 and array.shape == (1, 2, 3)
    np.testing.assert_allclose(array, (pixels / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert array.min() == -1.0 and array.max() == 1.0
    assert to_array(Image.new("L", (5, 4), 255)).shape == (4, 5, 3)
