"""The per-model optimizer/scheduler file and how it merges with the run's learning rate.

Format (the reference trainer's):
``{"optimizers": {"vae": {...}, "flow": {...}, ...}, "schedulers": {"vae": {...}, ...}}``,
each entry a config for ``make_optimizer`` / ``make_schedule``. A model the file leaves
out gets the reference's per-model default with the run's learning rate (the text encoder
gets a tenth of it); an entry without ``lr`` gets the same share of the run's learning
rate, and a cosine scheduler without ``eta_min_factor`` gets ``lr_min`` when one is given.

Unlike the reference, which warns and falls back to defaults, a missing file, invalid JSON,
an unknown model or section, and any invalid entry are errors, all reported together.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from fluxflow_jax.suggest import did_you_mean
from fluxflow_jax.training.optimizers import default_optimizer_config, optimizer_config_problems
from fluxflow_jax.training.schedules import default_scheduler_config, scheduler_config_problems

MODELS = ("vae", "flow", "text_encoder", "discriminator")
SECTIONS = ("optimizers", "schedulers")
# The share of the run's learning rate each model trains with when none is given.
_LR_SHARE = {"vae": 1.0, "flow": 1.0, "text_encoder": 0.1, "discriminator": 1.0}


class OptimSchedFileError(ValueError):
    """A per-model optimizer/scheduler file that cannot be used; names file and entries."""


class ModelOptimization(NamedTuple):
    optimizers: dict[str, dict[str, Any]]  # model -> optimizer config
    schedulers: dict[str, dict[str, Any]]  # model -> scheduler config


def read_optim_sched_file(path: str | os.PathLike) -> dict[str, dict[str, dict[str, Any]]]:
    """The file's sections, validated; ``OptimSchedFileError`` lists every problem."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise OptimSchedFileError(f"{path}: file not found") from None
    except OSError as err:
        raise OptimSchedFileError(f"{path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise OptimSchedFileError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from None
    problems = optim_sched_problems(content)
    if problems:
        raise OptimSchedFileError(f"{path}:\n  - " + "\n  - ".join(problems))
    return {section: dict(content.get(section, {})) for section in SECTIONS}


def optim_sched_problems(content: Any) -> list[str]:
    """Every problem in the parsed file content, each naming its entry."""
    if not isinstance(content, Mapping):
        return [f"the file must hold a JSON object with {list(SECTIONS)}, got "
                f"{type(content).__name__}"]
    problems = [f"unknown section '{key}'{did_you_mean(key, SECTIONS)}; valid: {list(SECTIONS)}"
                for key in content if key not in SECTIONS]
    check = {"optimizers": optimizer_config_problems, "schedulers": scheduler_config_problems}
    for section in SECTIONS:
        entries = content.get(section, {})
        if not isinstance(entries, Mapping):
            problems.append(f"'{section}' must be an object keyed by model")
            continue
        for model, config in entries.items():
            if model not in MODELS:
                problems.append(f"{section}: unknown model '{model}'"
                                f"{did_you_mean(model, MODELS)}; valid: {list(MODELS)}")
                continue
            problems += [f"{section}.{model}: {p}" for p in check[section](config)]
    return problems


def per_model_optimization(file_content: Mapping[str, Mapping[str, Any]] | None, lr: float,
                           lr_min: float | None = None) -> ModelOptimization:
    """Optimizer and scheduler configs for every model, merged as the reference does."""
    file_content = file_content or {}
    optimizers, schedulers = {}, {}
    for model in MODELS:
        model_lr = lr * _LR_SHARE[model]
        given = file_content.get("optimizers", {}).get(model)
        optimizers[model] = ({**default_optimizer_config(model), "lr": model_lr}
                             if given is None else {"lr": model_lr, **given})
        scheduler = file_content.get("schedulers", {}).get(model)
        if scheduler is None:
            schedulers[model] = default_scheduler_config(model)
        else:
            extra = ({"eta_min_factor": lr_min} if lr_min is not None
                     and scheduler.get("type", "CosineAnnealingLR") == "CosineAnnealingLR"
                     else {})
            schedulers[model] = {**extra, **scheduler}
    return ModelOptimization(optimizers, schedulers)
