"""Every config the repository ships passes ``fluxflow-jax validate`` as the README runs it:
a key renamed or a value out of range in one of them fails here, not on a user's machine."""

import contextlib
import io
from pathlib import Path

import pytest

from fluxflow_jax import cli

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_the_repository_ships_its_configs():
    assert {path.stem for path in CONFIGS} >= {"quickstart", "demo"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_shipped_config_validates(path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["validate", str(path)]) == 0
    assert f"Config: {path}" in printed.getvalue() and "Step 1/" in printed.getvalue()
