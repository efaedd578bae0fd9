"""A folder of images plus a captions file: the local dataset format of the reference.

The captions file holds one ``image_name<TAB>caption`` line per image, UTF-8 (a leading
byte-order mark, as some editors write, is dropped); image paths are
``data_path / image_name``. Lines end at a line feed alone (a carriage return before it is
dropped), so other Unicode line breaks stay inside a caption. Blank lines are skipped (the
reference raised on them), and any other line without exactly one tab is a
``DataConfigError`` naming the file and line. The file is parsed once, up front; images are
only opened when the loader asks for them, so a missing or corrupt image costs one skipped
sample, not the run.
"""

from __future__ import annotations

from pathlib import Path

from fluxflow_jax.data.captions import finish_caption
from fluxflow_jax.data.errors import DataConfigError
from fluxflow_jax.data.samples import RawSample, header_size

_FORMAT = "image_name<TAB>caption"


def _read_lines(captions_file: Path) -> list[str]:
    """The file's lines, split at line feeds only: ``splitlines`` would also split at U+2028,
    form feeds and the like, cutting a caption in two and shifting every later line number."""
    try:
        text = captions_file.read_bytes().decode("utf-8-sig")  # a byte-order mark is no name
    except FileNotFoundError:
        raise DataConfigError(f"captions file {captions_file} does not exist") from None
    except IsADirectoryError:
        raise DataConfigError(f"captions file {captions_file} is a directory; give the "
                              "image_name<TAB>caption text file in it") from None
    except OSError as err:
        raise DataConfigError(f"captions file {captions_file}: cannot read it "
                              f"({err.strerror})") from None
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise DataConfigError(
            f"{captions_file}:{line}: not valid UTF-8; save the captions file as UTF-8"
        ) from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_captions(captions_file: Path) -> list[tuple[str, str]]:
    """(image_name, caption) for every non-blank line, in file order."""
    entries = []
    for number, line in enumerate(_read_lines(captions_file), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0]:
            raise DataConfigError(
                f"{captions_file}:{number}: expected '{_FORMAT}' (an image name, exactly one "
                f"tab, the caption), got {line[:80]!r}"
            )
        entries.append((fields[0], fields[1]))
    if not entries:
        raise DataConfigError(f"captions file {captions_file} has no '{_FORMAT}' lines")
    return entries


class CaptionedFolder:
    """Random-access source over ``data_path`` and its captions file."""

    def __init__(
        self,
        data_path: str | Path,
        captions_file: str | Path,
        fixed_prompt_prefix: str | None = None,
    ):
        self.data_path = Path(data_path)
        if not self.data_path.is_dir():
            raise DataConfigError(f"image folder {self.data_path} is not a directory")
        self._entries = parse_captions(Path(captions_file))
        self._prefix = fixed_prompt_prefix

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> RawSample:
        """The sample's path and caption; ``BadSampleError`` if its caption is empty.

        A missing image file is only noticed when the loader decodes it.
        """
        name, text = self._entries[index]
        path = self.data_path / name
        return RawSample(str(path), path, finish_caption(str(path), text, self._prefix))

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) from the image header; ``BadSampleError`` when it cannot be read."""
        path = self.data_path / self._entries[index][0]
        return header_size(path, str(path))
