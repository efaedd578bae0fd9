"""The train command restarts itself once with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from fluxflow_jax import cli, huge_pages
from fluxflow_jax.huge_pages import environment_with_huge_pages


@pytest.fixture
def possible(monkeypatch):
    monkeypatch.setattr(huge_pages, "huge_pages_possible", lambda: True)


def test_the_tunable_joins_the_users_tunables_and_marks_the_restart(possible):
    env = environment_with_huge_pages({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    assert env["PATH"] == "/bin" and env["FLUXFLOW_JAX_RESTARTED"] == "1"
    assert environment_with_huge_pages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ", [
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice
    {"FLUXFLOW_JAX_HUGE_PAGES": "0"},  # opted out
    {"FLUXFLOW_JAX_RESTARTED": "1"},  # already restarted once
])
def test_nothing_changes_where_the_user_or_a_restart_decided(possible, environ):
    assert environment_with_huge_pages(environ) is None


def test_nothing_changes_without_transparent_huge_pages(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(huge_pages, "_THP_SETTING", setting)
    assert not huge_pages.huge_pages_possible()  # no such file
    setting.write_text("always madvise [never]\n")
    assert environment_with_huge_pages({}) is None
    setting.write_text("always [madvise] never\n")
    assert huge_pages.huge_pages_possible() == (sys.platform == "linux")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not huge_pages.huge_pages_possible()


def test_the_process_restarts_once_with_the_same_command_line():
    program = ("import os, sys; from fluxflow_jax.huge_pages import restart_with_huge_pages; "
               "print('start', sys.argv[1:], flush=True); restart_with_huge_pages(); "
               "print(os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLUXFLOW_JAX_RESTARTED", "FLUXFLOW_JAX_HUGE_PAGES")}
    env["GLIBC_TUNABLES"] = "glibc.malloc.check=0"
    out = subprocess.run([sys.executable, "-c", program, "a", "b c"], env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    if huge_pages.huge_pages_possible():
        assert out == ["start ['a', 'b c']"] * 2 + ["glibc.malloc.check=0:glibc.malloc.hugetlb=1"]
    else:
        assert out == ["start ['a', 'b c']", "glibc.malloc.check=0"]


@pytest.mark.parametrize("command,argv,restarts", [
    (["train", "--help"], None, True),
    (["validate", "--help"], None, False),
    (["train", "--help"], ["train", "--help"], False),  # called as a function, not a program
])
def test_only_the_train_program_restarts(monkeypatch, command, argv, restarts):
    calls = []
    monkeypatch.setattr(cli, "restart_with_huge_pages", lambda: calls.append(True))
    monkeypatch.setattr(sys, "argv", ["fluxflow-jax", *command])
    with pytest.raises(SystemExit):  # --help
        cli.main(argv)
    assert calls == ([True] if restarts else [])
