"""Modules of the installed ``fluxflow-training`` 0.8.1 trainer, for checks against its own
functions at test time.

Its package ``__init__`` files import the whole trainer, and ``fluxflow.utils``' import
torchvision, which never installs beside the CPU torch. A module is therefore imported
under stand-in parent packages that only point at the installed directories: relative
imports inside the trainer still find the real files, nothing else is run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path


def _package_directory(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} is not installed (see .ci/run)"
    return Path(spec.submodule_search_locations[0])


def _stand_in(name: str, directory: Path) -> types.ModuleType:
    package = types.ModuleType(name)
    package.__path__ = [str(directory)]
    return package


def trainer_module(name: str) -> types.ModuleType:
    """``fluxflow_training.training.<name>``, e.g. "vae_trainer" or "schedulers"."""
    full_name = f"fluxflow_training.training.{name}"
    if full_name in sys.modules:
        return sys.modules[full_name]
    utils_name = "fluxflow.utils"
    if not hasattr(sys.modules.get(utils_name), "get_logger"):
        utils = _stand_in(utils_name, _package_directory("fluxflow") / "utils")
        sys.modules[utils_name] = utils
        utils.get_logger = importlib.import_module(f"{utils_name}.logger").get_logger
    if "fluxflow_training.training" not in sys.modules:
        sys.modules["fluxflow_training.training"] = _stand_in(
            "fluxflow_training.training", _package_directory("fluxflow_training") / "training")
    return importlib.import_module(full_name)
