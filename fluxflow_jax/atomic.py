"""Writing files so that no reader ever sees a half-written one."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # read once: changing the umask later would race


def write_temp(path: Path, data: bytes, mode: int | None = None) -> Path:
    """``data`` written in full and synced to a hidden temporary file beside ``path``
    (permissions ``mode``, by default what the umask gives a new file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE if mode is None else mode)
    except OSError as err:  # e.g. a full disk: named after the file meant, not the temp
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new
    one, never a partial file."""
    os.replace(write_temp(path, data, mode), path)


def atomic_copy(source: Path, path: Path) -> None:
    """Give ``path`` the content of ``source`` atomically, as a hard link where the file
    system has them (no second copy on disk; replacing either name later leaves the other
    as it is), else as a copy."""
    link = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(source, link)
    except OSError:
        atomic_write(path, source.read_bytes())
        return
    os.replace(link, path)
