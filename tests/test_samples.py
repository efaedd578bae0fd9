"""Decoding a sample's image: every Pillow mode becomes the 8-bit RGB it looks like."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.data.samples import BadSampleError, RawSample, decode_image, header_size


def decoded(image: Image.Image, format: str = "PNG", **save: object) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return np.asarray(decode_image(RawSample("x", buffer.getvalue(), "caption")))


def test_16_bit_grayscale_keeps_its_tones():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    pixels = decoded(Image.fromarray(ramp))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert 120 < pixels.mean() < 135  # a mid-gray ramp, not near-white


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    pixels = decoded(rgba)
    assert tuple(pixels[0, 0]) == (0, 0, 255) and tuple(pixels[1, 1]) == (255, 255, 255)
    gray_alpha = decoded(Image.new("LA", (4, 4), (0, 128)))
    assert tuple(gray_alpha[0, 0]) == (127, 127, 127)


def test_palette_with_a_transparent_entry():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    pixels = decoded(palette, transparency=0)
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[1, 1]) == (255, 0, 0)


def test_cmyk_and_bilevel():
    assert tuple(decoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF")[0, 0]) \
        == (255, 0, 0)
    assert tuple(decoded(Image.new("1", (4, 4), 1))[0, 0]) == (255, 255, 255)


def test_an_animation_trains_on_its_first_frame():
    frames = [Image.new("RGB", (4, 4), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    pixels = np.asarray(decode_image(RawSample("x", buffer.getvalue(), "c")))
    assert tuple(pixels[0, 0]) == (255, 0, 0)


def test_float_pixels_are_skipped_with_a_reason(tmp_path: Path):
    path = tmp_path / "depth.tiff"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(BadSampleError, match="mode F"):
        decode_image(RawSample(str(path), path, "c"))


@pytest.mark.parametrize("name, reason", [
    ("missing.png", "image file not found"),
    ("folder", "a directory, not an image file"),
    ("text.png", "not a readable image"),
])
def test_an_unreadable_header_says_why(tmp_path: Path, name: str, reason: str):
    (tmp_path / "folder").mkdir()
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(BadSampleError) as err:
        header_size(tmp_path / name, name)
    assert err.value.key == name and err.value.reason.startswith(reason)
