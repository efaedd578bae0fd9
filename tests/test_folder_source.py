"""The image folder + captions file source."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.data.errors import DataConfigError
from fluxflow_jax.data.folder import CaptionedFolder
from fluxflow_jax.data.samples import BadSampleError, decode_image


@pytest.fixture
def folder(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((40, 10, 3), np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


def write_captions(folder, text):
    path = folder / "captions.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_samples_are_paths_and_captions_in_file_order(folder):
    captions = write_captions(folder, "a.png\ta red square\n\n  \nb.jpg\tA tall one \r\n")
    source = CaptionedFolder(folder, captions)
    assert len(source) == 2  # blank and whitespace-only lines are skipped
    first, second = source[0], source[1]
    assert first.image == folder / "a.png" and first.key == str(folder / "a.png")
    assert first.caption == "a red square"
    assert second.caption == "A tall one"
    assert decode_image(first).size == (30, 20)


def test_prefix_is_joined_with_a_full_stop(folder):
    source = CaptionedFolder(folder, write_captions(folder, "a.png\tcat\n"), "watercolour")
    assert source[0].caption == "watercolour. cat"


def size_or_reason(source: CaptionedFolder, index: int) -> tuple[int, int] | str:
    try:
        return source.image_size(index)
    except BadSampleError as err:
        return err.reason


def test_image_size_reads_the_header_or_says_why_not(folder):
    captions = write_captions(folder, "a.png\tx\nb.jpg\ty\nbroken.png\tz\nmissing.png\tw\n")
    source = CaptionedFolder(folder, captions)
    reasons = [size_or_reason(source, i) for i in range(4)]
    assert reasons[:2] == [(20, 30), (40, 10)]
    assert reasons[2].startswith("not a readable image (cannot identify image file")
    assert reasons[3] == "image file not found"


def write_oversized_png(path, width=30000, height=30000):
    """A small PNG whose header claims ``width`` x ``height``, with a valid header checksum."""
    Image.new("RGB", (2, 2)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # the IHDR chunk's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))  # its CRC, over type and data
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_is_unreadable(folder):
    write_oversized_png(folder / "huge.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(folder / "huge.png")
    source = CaptionedFolder(folder, write_captions(folder, "huge.png\tbig\na.png\tx\n"))
    assert "exceeds limit" in size_or_reason(source, 0)
    assert source.image_size(1) == (20, 30)


def test_lines_end_at_line_feeds_only(folder):
    """U+2028, form feeds, NEL and a lone carriage return are caption text, not line ends."""
    text = "a.png\tone\u2028two\x0cthree\x85four\rfive\r\nb.jpg\tok\n"
    source = CaptionedFolder(folder, write_captions(folder, text))
    assert [source[i].caption for i in range(2)] == ["one two three four five", "ok"]
    with pytest.raises(DataConfigError, match=r"captions.txt:4: .*'no tab\\x0chere'"):
        CaptionedFolder(folder, write_captions(folder, text + "\nno tab\x0chere\n"))


def test_missing_image_is_a_bad_sample_when_decoded(folder):
    source = CaptionedFolder(folder, write_captions(folder, "missing.png\tw\n"))
    sample = source[0]  # indexing stays cheap: nothing is opened yet
    with pytest.raises(BadSampleError, match="missing.png: image file not found"):
        decode_image(sample)


def test_empty_caption_is_a_bad_sample(folder):
    source = CaptionedFolder(folder, write_captions(folder, "a.png\t  \nb.jpg\tok\n"))
    with pytest.raises(BadSampleError, match="a.png: empty caption"):
        source[0]
    assert source[1].caption == "ok"


@pytest.mark.parametrize("line", ["a.png caption with spaces", "a.png\tone\ttwo", "\tno name"])
def test_malformed_line_names_file_line_and_format(folder, line):
    captions = write_captions(folder, f"b.jpg\tfine\n\n{line}\n")
    with pytest.raises(DataConfigError) as err:
        CaptionedFolder(folder, captions)
    message = str(err.value)
    assert message.startswith(f"{captions}:3: ") and "image_name<TAB>caption" in message
    assert repr(line) in message


def test_missing_files_and_folders_are_config_errors(folder):
    with pytest.raises(DataConfigError, match="captions file .*nope.txt does not exist"):
        CaptionedFolder(folder, folder / "nope.txt")
    captions = write_captions(folder, "a.png\tx\n")
    with pytest.raises(DataConfigError, match="image folder .*absent is not a directory"):
        CaptionedFolder(folder / "absent", captions)
    with pytest.raises(DataConfigError, match="has no 'image_name<TAB>caption' lines"):
        CaptionedFolder(folder, write_captions(folder, "\n\n"))


def test_non_utf8_captions_name_the_line(folder):
    captions = folder / "captions.txt"
    captions.write_bytes(b"a.png\tok\nb.jpg\tcaf\xe9\n")
    with pytest.raises(DataConfigError, match=r"captions.txt:2: not valid UTF-8"):
        CaptionedFolder(folder, captions)


def test_a_byte_order_mark_does_not_hide_the_first_image(folder):
    """Editors on Windows start UTF-8 files with U+FEFF; it is not part of the image name."""
    source = CaptionedFolder(folder, write_captions(folder, "\ufeffa.png\tred\nb.jpg\tblue\n"))
    assert source[0].key == str(folder / "a.png") and source.image_size(0) == (20, 30)


def test_a_directory_named_as_the_captions_file(folder):
    with pytest.raises(DataConfigError, match=f"captions file {folder} is a directory"):
        CaptionedFolder(folder, folder)
