"""Prompts for ``fluxflow-jax generate``: from the command line, a file, or a directory.

Each prompt comes with the file stem its image is written under: the ``.txt`` file's own
stem for a prompts directory (the reference's ``--text_prompts_path``), otherwise a short
slug of the text numbered by position, so two prompts never overwrite each other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class PromptError(ValueError):
    """Prompts that cannot be read; the message names the file and the fix."""


class Prompt(NamedTuple):
    stem: str  # output file name without extension
    text: str


def slug(text: str, index: int, width: int = 48) -> str:
    """``003_a-red-circle-on-blue``: position first, then the text's words, filesystem-safe."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:width].rstrip("-")
    return f"{index:03d}_{words or 'prompt'}"


def read_prompts(prompts: Sequence[str] = (), prompts_file: Path | None = None,
                 prompts_dir: Path | None = None) -> list[Prompt]:
    """Every prompt given: ``prompts`` in order, then the file's non-empty lines, then each
    ``*.txt`` of the directory (sorted by name, whole content as one prompt)."""
    texts = [text.strip() for text in prompts]
    if prompts_file is not None:
        texts += [line.strip() for line in _read(prompts_file).split("\n") if line.strip()]
    found = [Prompt(slug(text, i), text) for i, text in enumerate(texts)]
    if prompts_dir is not None:
        if not prompts_dir.is_dir():
            raise PromptError(f"{prompts_dir}: not a directory of .txt prompt files")
        files = sorted(prompts_dir.glob("*.txt"))
        if not files:
            raise PromptError(f"{prompts_dir}: no .txt prompt files in it")
        found += [Prompt(path.stem, " ".join(_read(path).split())) for path in files]
    empty = [p.stem for p in found if not p.text]
    if empty:
        raise PromptError(f"empty prompt(s): {', '.join(empty)}")
    if not found:
        raise PromptError("no prompts: give --prompt, --prompts_file or --text_prompts_path")
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PromptError(f"{path}: cannot read it ({err})") from None
