"""Learning-rate schedules against ``torch.optim.lr_scheduler`` over 100 updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler

from fluxflow_jax.training.schedules import (SchedulerConfigError, default_scheduler_config,
                                             make_schedule, reduce_on_plateau,
                                             resolve_scheduler_config)

BASE_LR, TOTAL, STEPS = 3e-4, 80, 100  # run past the schedule's span, as PyTorch allows


def torch_lrs(make_scheduler, metrics=None) -> np.ndarray:
    """The LR of each of STEPS updates: read before ``optimizer.step()``."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=BASE_LR)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for k in range(STEPS):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step() if metrics is None else scheduler.step(metrics[k])
    return np.array(lrs)


def jax_lrs(config) -> np.ndarray:
    with jax.enable_x64(True):
        schedule = jax.jit(make_schedule(config, BASE_LR, TOTAL))
        return np.array([float(schedule(jnp.asarray(k))) for k in range(STEPS)])


CASES = {
    "cosine": ({"type": "CosineAnnealingLR", "eta_min_factor": 0.05},
               lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL, eta_min=BASE_LR * 0.05)),
    "linear": ({"type": "LinearLR", "start_factor": 0.5, "end_factor": 0.1},
               lambda o: lr_scheduler.LinearLR(o, 0.5, 0.1, total_iters=TOTAL)),
    "linear_iters": ({"type": "LinearLR", "total_iters": 30},
                     lambda o: lr_scheduler.LinearLR(o, 1.0, 0.1, total_iters=30)),
    "exponential": ({"type": "ExponentialLR", "gamma": 0.97},
                    lambda o: lr_scheduler.ExponentialLR(o, 0.97)),
    "constant": ({"type": "ConstantLR", "factor": 0.25, "total_iters": 40},
                 lambda o: lr_scheduler.ConstantLR(o, 0.25, total_iters=40)),
    "step": ({"type": "StepLR", "gamma": 0.5},
             lambda o: lr_scheduler.StepLR(o, step_size=TOTAL // 10, gamma=0.5)),
    "multistep": ({"type": "MultiStepLR", "milestones": [10, 35, 36, 90], "gamma": 0.3},
                  lambda o: lr_scheduler.MultiStepLR(o, [10, 35, 36, 90], gamma=0.3)),
    "cosine_warmup": (
        {"type": "CosineAnnealingLR", "eta_min_factor": 0.1, "warmup_steps": 12},
        lambda o: lr_scheduler.SequentialLR(o, [
            lr_scheduler.LinearLR(o, 1 / 13, 1.0, total_iters=12),
            lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL - 12, eta_min=BASE_LR * 0.1)],
            milestones=[12])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_schedule_equals_pytorch(name):
    config, make_scheduler = CASES[name]
    np.testing.assert_allclose(jax_lrs(config), torch_lrs(make_scheduler), rtol=1e-9,
                               atol=1e-15)


def test_reference_defaults_equal_pytorch():
    """Per-model defaults: cosine to 10% (0.1% for the text encoder) over the run."""
    for model, floor in (("vae", 0.1), ("flow", 0.1), ("discriminator", 0.1),
                         ("text_encoder", 0.001)):
        expected = torch_lrs(lambda o: lr_scheduler.CosineAnnealingLR(
            o, T_max=TOTAL, eta_min=BASE_LR * floor))
        np.testing.assert_allclose(jax_lrs(default_scheduler_config(model)), expected,
                                   rtol=1e-9)


@pytest.mark.parametrize("settings", [{}, {"patience": 3, "factor": 0.5, "cooldown": 4},
                                      {"patience": 0, "factor": 0.2, "min_lr": 2e-5,
                                       "threshold": 0.05}])
def test_reduce_on_plateau_equals_pytorch(settings):
    rng = np.random.default_rng(0)
    # Improving, then a long noisy plateau, then improving again.
    metrics = np.concatenate([np.linspace(2, 1, 20), 1 + 0.01 * rng.random(60),
                              np.linspace(0.99, 0.5, 20)]).astype(np.float32)
    expected = torch_lrs(lambda o: lr_scheduler.ReduceLROnPlateau(o, mode="min", **{
        "factor": 0.1, "patience": 10, "threshold": 1e-4, **settings}), metrics)

    schedule = make_schedule({"type": "ReduceLROnPlateau", **settings}, BASE_LR, TOTAL)
    plateau = reduce_on_plateau(settings, BASE_LR)
    state = plateau.init(None)
    step = jax.jit(lambda u, s, v: plateau.update(u, s, value=v))
    actual = []
    for k in range(STEPS):
        scaled, state = step(jnp.ones(()), state, metrics[k])
        actual.append(float(schedule(k)) * float(scaled))
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
    assert expected.min() < BASE_LR  # the sequence really reduced the LR


def test_schedules_compile_once():
    schedule = jax.jit(make_schedule({"type": "StepLR", "step_size": 7}, BASE_LR, TOTAL))
    for k in range(20):
        schedule(jnp.asarray(k, jnp.int32))
    assert schedule._cache_size() == 1


@pytest.mark.parametrize("config,total,messages", [
    ({"type": "Cosine"}, 10, ["Unsupported scheduler: Cosine. Supported schedulers:"]),
    ({"type": "CosineAnnealingLR", "eta_min_factr": 0.1}, 10,
     ["unknown key 'eta_min_factr' for CosineAnnealingLR (did you mean 'eta_min_factor'?)"]),
    ({"type": "cosineannealinglr", "eta_min_factor": 0}, 0,
     ["total_steps must be > 0", "eta_min_factor must be in (0, 1]"]),
    ({"type": "StepLR", "gamma": 1.0}, 5, ["gamma must be in (0, 1)", "step_size must be > 0"]),
    ({"type": "LinearLR", "start_factor": 0}, 10, ["start_factor and end_factor must be > 0"]),
    ({"type": "ReduceLROnPlateau", "factor": 1.0, "patience": -1}, 10,
     ["factor must be in (0, 1)", "patience must be >= 0"]),
    ({"type": "MultiStepLR", "milestones": [5, 3]}, 10, ["milestones must be a non-empty"]),
    ({"type": "ExponentialLR", "warmup_steps": 10}, 10, ["warmup_steps (10) must be below"]),
])
def test_invalid_configs_report_every_problem(config, total, messages):
    with pytest.raises(SchedulerConfigError) as raised:
        resolve_scheduler_config(config, total)
    for message in messages:
        assert message in str(raised.value)


def test_unknown_model_has_no_default():
    with pytest.raises(SchedulerConfigError, match="valid models"):
        default_scheduler_config("decoder")
