"""Config keys are declared once: the key tables of docs/pipeline.md, the flag tables of
docs/training.md, the reader's checks and the command-line flags all come from the
declarations, and the docs stay current."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fluxflow_jax.checks import integer_at_least, optional
from fluxflow_jax.cli import build_parser
from fluxflow_jax.pipeline.config import (DATA_ALIASES, DATA_CHECKS, FLAGS, STEP_CHECKS,
                                          DataConfig, load_config)
from fluxflow_jax.pipeline.flags import overrides
from fluxflow_jax.pipeline.key_docs import KEY_TABLES, PAGES, missing_tables, with_tables
from fluxflow_jax.settings import aliases_of, checks_of, flags_of, key_table, plain, setting
from fluxflow_jax.training.modes import STEP_MODES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TOOL = ROOT / "tools" / "config_docs.py"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_docs_tables_match_the_declarations(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    assert not missing_tables(page, text), f"docs/{page} lacks {missing_tables(page, text)}"
    assert with_tables(page, text) == text, (
        f"docs/{page}'s config tables differ from the declarations; run "
        "'python tools/config_docs.py' to rewrite them")


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=False)


def _copy_docs(tmp_path: Path) -> Path:
    for page in PAGES:
        shutil.copy(DOCS / page, tmp_path / page)
    return tmp_path


def test_tool_check_fails_on_a_stale_table_and_rewriting_fixes_it(tmp_path):
    docs = _copy_docs(tmp_path)
    page = docs / "pipeline.md"
    page.write_text(page.read_text(encoding="utf-8").replace(
        "| `img_size` | 1024 |", "| `img_size` | 512 |"), encoding="utf-8")
    failed = _run_tool("--check", "--docs", str(docs))
    assert failed.returncode == 1
    assert "pipeline.md" in failed.stderr and "python tools/config_docs.py" in failed.stderr
    assert _run_tool("--docs", str(docs)).returncode == 0
    assert page.read_text(encoding="utf-8") == (DOCS / "pipeline.md").read_text(
        encoding="utf-8")
    assert _run_tool("--check", "--docs", str(docs)).returncode == 0


def test_tool_names_missing_markers(tmp_path):
    docs = _copy_docs(tmp_path)
    page = docs / "training.md"
    page.write_text(page.read_text(encoding="utf-8").replace("<!-- keys: flags_output -->",
                                                             ""), encoding="utf-8")
    failed = _run_tool("--check", "--docs", str(docs))
    assert failed.returncode == 1 and "['flags_output']" in failed.stderr


def test_a_key_table_lists_the_declared_keys_with_default_help_and_aliases():
    rows = KEY_TABLES["data"].splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == list(DATA_CHECKS)
    assert f"| `img_size` | {DataConfig.img_size} | short side of the training images" in (
        KEY_TABLES["data"])
    assert "| `use_webdataset` | false | read WebDataset tar shards (alias `use_tt2m`) |" in (
        KEY_TABLES["data"])
    assert DATA_ALIASES == {"use_tt2m": "use_webdataset", "tt2m_token": "webdataset_token"}


def test_train_help_shows_each_flag_with_its_key_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--img_size VALUE short side of the training images (aspect kept, 16-pixel " \
           "grid) (sets data.img_size)" in shown
    assert "--kl_beta VALUE final KL weight β (sets training.kl_beta)" in shown
    assert "--use_tt2m old name of --use_webdataset (sets data.use_webdataset)" in shown
    assert "[Gradient accumulation]" not in shown and "Gradient accumulation" in shown
    assert all(f"--{flag.name}" in shown for flag in FLAGS)


@pytest.mark.parametrize("argv, read, value", [
    (["--use_tt2m"], lambda c: c.data.use_webdataset, True),
    (["--reduced_min_sizes", "256", "512"], lambda c: c.data.reduced_min_sizes, (256, 512)),
    (["--sample_sizes", "512", "512x384"], lambda c: c.output.sample_sizes, (512, "512x384")),
    (["--initial_clipping_norm", "0.5"], lambda c: c.training.initial_clipping_norm, 0.5),
    (["--kl_beta", "0.01"], lambda c: c.training.step.losses["kl_beta"], 0.01),
    (["--train_vae"], lambda c: c.training.step.train_vae, True),
    (["--feature_maps_dim", "64"], lambda c: c.model["flow_dim"], 64),
])
def test_derived_flags_set_their_keys(tmp_path, argv, read, value):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data: {use_demo: true}\n")
    args = build_parser().parse_args(["train", "--config", str(config_file), *argv])
    assert read(load_config(config_file, overrides(args))) == value


def test_one_declaration_gives_the_check_alias_flag_and_table_row():
    @dataclass(frozen=True)
    class Section:
        width: int | None = setting(None, optional(integer_at_least(1)), "the `width`; see "
                                    "[Widths](#widths), 100%", flag=True, aliases=("w",))
        sizes: tuple[int, ...] = setting((8, 16), integer_at_least(1), "sizes")
        switch: bool = setting(False, None, "read elsewhere", flag="on")

    checks = checks_of(Section)
    assert list(checks) == ["width", "sizes"]
    assert checks["width"]("s.width", 0) == "'s.width' must be an integer >= 1, got 0 (or null)"
    assert aliases_of(Section) == {"w": "width"}
    flags = flags_of("s", Section)
    assert [(f.name, f.key, f.kind, f.usage) for f in flags] == [
        ("width", "width", int, "--width VALUE"), ("w", "width", int, "--w VALUE"),
        ("on", "switch", "flag", "--on")]
    assert plain(flags[0].help) == "the width; see Widths, 100%%"
    assert key_table(Section, {"old": "ignored"}).splitlines() == [
        "| key | default | meaning |", "|---|---|---|",
        "| `width` | null | the `width`; see [Widths](#widths), 100% (alias `w`) |",
        "| `sizes` | [8, 16] | sizes |",
        "| `switch` | false | read elsewhere |",
        "| `old` | null | ignored |"]


def test_every_step_mode_is_a_declared_step_key():
    assert set(STEP_MODES) <= set(STEP_CHECKS)
