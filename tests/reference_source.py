"""Single files of the installed PyTorch packages, run without their packages' __init__
(fluxflow.utils' imports torchvision, which never installs beside the CPU torch;
fluxflow_training's pulls in the whole trainer)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path


def source_file(package: str, path: str, name: str) -> types.ModuleType:
    """Run ``path`` of installed ``package`` as module ``name``."""
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"{package} is not installed (see .ci/run)"
    location = Path(spec.submodule_search_locations[0]) / path
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location(name, location))
    module.__spec__.loader.exec_module(module)
    return module


@contextlib.contextmanager
def fluxflow_utils() -> Iterator[types.ModuleType]:
    """fluxflow.utils' io and logging functions, the real files, without its visualisation
    module; installed as ``fluxflow.utils`` while the context lasts."""
    utils = types.ModuleType("fluxflow.utils")
    for part in ("io", "logger"):
        vars(utils).update(vars(source_file("fluxflow", f"utils/{part}.py",
                                            f"fluxflow.utils.{part}")))
    previous = sys.modules.get("fluxflow.utils")
    sys.modules["fluxflow.utils"] = utils
    try:
        yield utils
    finally:
        if previous is None:
            del sys.modules["fluxflow.utils"]
        else:
            sys.modules["fluxflow.utils"] = previous
