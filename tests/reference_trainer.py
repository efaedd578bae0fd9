"""Modules of the installed ``fluxflow-training`` 0.8.1 trainer, for checks against its own
functions at test time.

Its package ``__init__`` files import the whole trainer, and ``fluxflow.utils``' import
torchvision, which never installs beside the CPU torch. A module is therefore imported
under stand-in parent packages that only point at the installed directories: relative
imports inside the trainer still find the real files, nothing else is run, and the
stand-ins are gone once it is imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path


def _package_directory(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} is not installed (see .ci/run)"
    return Path(spec.submodule_search_locations[0])


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    """``fluxflow.utils`` (with its ``get_logger``) and ``fluxflow_training.training`` as
    bare packages over the installed directories, while a trainer module imports; the
    previous entries of ``sys.modules`` are put back afterwards."""
    names = ("fluxflow.utils", "fluxflow_training.training")
    previous = {name: sys.modules.get(name) for name in names}
    for name, directory in zip(names, (_package_directory("fluxflow") / "utils",
                                       _package_directory("fluxflow_training") / "training")):
        package = types.ModuleType(name)
        package.__path__ = [str(directory)]
        sys.modules[name] = package
    sys.modules[names[0]].get_logger = importlib.import_module(
        f"{names[0]}.logger").get_logger
    try:
        yield
    finally:
        for name, module in previous.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


@functools.cache
def trainer_module(name: str) -> types.ModuleType:
    """``fluxflow_training.training.<name>``, e.g. "vae_trainer" or "schedulers"."""
    with _stand_ins():
        return importlib.import_module(f"fluxflow_training.training.{name}")
