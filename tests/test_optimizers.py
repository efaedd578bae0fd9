"""Optimizer factory: torch-exact trajectories, validation messages, per-model defaults."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from lion_pytorch import Lion as ReferenceLion  # the Lion the reference trains its flow with

from fluxflow_jax.training.optimizers import (
    OPTIMIZERS,
    OptimizerConfigError,
    default_optimizer_config,
    make_optimizer,
    optimizer_config_problems,
)

# Spec §5.1 defaults (torch's own for Adagrad/Adadelta), written out independently of the
# module so that the torch side always gets every keyword explicitly.
SPEC_DEFAULTS = {
    "Adam": {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8},
    "AdamW": {
        "lr": 1e-4,
        "betas": (0.9, 0.999),
        "weight_decay": 0.0,
        "eps": 1e-8,
        "amsgrad": False,
    },
    "Lion": {
        "lr": 1e-4,
        "betas": (0.9, 0.95),
        "weight_decay": 0.01,
        "decoupled_weight_decay": True,
    },
    "SGD": {"lr": 1e-4, "momentum": 0.0, "weight_decay": 0.0, "dampening": 0.0, "nesterov": False},
    "RMSprop": {
        "lr": 1e-4,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
    },
    "Adagrad": {
        "lr": 1e-4,
        "lr_decay": 0.0,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "eps": 1e-10,
    },
    "Adadelta": {"lr": 1e-4, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
}

STEPS = 20
TOLERANCE = 1e-10
SHAPES = {"w": (4, 3), "b": (3,), "block": {"k": (2, 2, 2), "scale": ()}}


def torch_optimizer(params, config):
    kwargs = {**SPEC_DEFAULTS[config["type"]], **{k: v for k, v in config.items() if k != "type"}}
    if config["type"] == "Lion":
        return ReferenceLion(params, **kwargs)
    return getattr(torch.optim, config["type"])(params, **kwargs, foreach=False)


def random_problem(seed: int):
    """Float64 initial params and STEPS gradients whose scale varies from step to step
    (so AMSGrad's running max and Adagrad/Adadelta accumulators actually matter)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: rng.normal(size=s), SHAPES, is_leaf=lambda x: isinstance(x, tuple)
    )
    grads = [
        jax.tree.map(lambda p: rng.normal(size=p.shape) * np.exp(rng.normal()), params)
        for _ in range(STEPS)
    ]
    return params, grads


def optax_trajectory(opt: optax.GradientTransformation, params, grads):
    @jax.jit
    def step(params, state, g):
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    trajectory = []
    for g in grads:
        params, state = step(params, state, g)
        trajectory.append([np.asarray(leaf) for leaf in jax.tree.leaves(params)])
    return trajectory


def torch_trajectory(config, params, grads, lr_lambda=None):
    tensors = [torch.tensor(leaf, dtype=torch.float64) for leaf in jax.tree.leaves(params)]
    opt = torch_optimizer(tensors, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    trajectory = []
    for g in grads:
        for t, leaf in zip(tensors, jax.tree.leaves(g)):
            t.grad = torch.tensor(leaf, dtype=torch.float64)
        opt.step()
        if sched is not None:
            sched.step()
        trajectory.append([t.detach().numpy().copy() for t in tensors])
    return trajectory


def max_relative_difference(ours, theirs) -> float:
    worst = 0.0
    for step_ours, step_theirs in zip(ours, theirs, strict=True):
        a = np.concatenate([x.ravel() for x in step_ours])
        b = np.concatenate([x.ravel() for x in step_theirs])
        worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
    return worst


def assert_matches_torch(config, learning_rate=None, lr_lambda=None, seed=0):
    params, grads = random_problem(seed)
    with jax.enable_x64(True):
        ours = optax_trajectory(make_optimizer(config, learning_rate), params, grads)
    theirs = torch_trajectory(config, params, grads, lr_lambda)
    diff = max_relative_difference(ours, theirs)
    # the trajectory must actually move, or the comparison proves nothing
    assert max_relative_difference(theirs[-1:], [jax.tree.leaves(params)]) > 1e-4
    print(f"{config}: max relative trajectory difference {diff:.2e}")
    assert diff <= TOLERANCE, diff


TRAJECTORY_CASES = [
    {"type": "Adam", "lr": 1e-2},
    {"type": "Adam", "lr": 1e-2, "betas": [0.8, 0.9], "weight_decay": 0.1, "eps": 1e-6},
    {"type": "AdamW", "lr": 1e-2},
    {"type": "AdamW", "lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.05},
    {"type": "AdamW", "lr": 1e-2, "betas": [0.0, 0.9], "weight_decay": 0.001, "amsgrad": True},
    {"type": "AdamW", "lr": 1e-2, "betas": [0.9, 0.999], "weight_decay": 0.1, "amsgrad": True},
    {"type": "Lion", "lr": 1e-3},
    {"type": "Lion", "lr": 1e-3, "weight_decay": 0.2, "decoupled_weight_decay": True},
    {
        "type": "Lion",
        "lr": 1e-3,
        "betas": [0.95, 0.98],
        "weight_decay": 0.5,
        "decoupled_weight_decay": False,
    },
    {"type": "SGD", "lr": 0.1},
    {"type": "SGD", "lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01},
    {"type": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.001},
    {"type": "RMSprop", "lr": 1e-2},
    {"type": "RMSprop", "lr": 1e-2, "momentum": 0.7},
    {
        "type": "RMSprop",
        "lr": 1e-2,
        "alpha": 0.9,
        "eps": 1e-6,
        "centered": True,
        "momentum": 0.5,
        "weight_decay": 0.01,
    },
    {"type": "Adagrad", "lr": 0.1},
    {
        "type": "Adagrad",
        "lr": 0.1,
        "lr_decay": 0.1,
        "initial_accumulator_value": 0.5,
        "eps": 1e-8,
        "weight_decay": 0.01,
    },
    {"type": "Adadelta", "lr": 1.0},
    {"type": "Adadelta", "lr": 0.5, "rho": 0.5, "eps": 1e-4, "weight_decay": 0.1},
]


@pytest.mark.parametrize(
    "config",
    TRAJECTORY_CASES,
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k not in ("lr",)),
)
def test_trajectory_matches_torch(config):
    assert_matches_torch(config)


def test_every_type_has_a_trajectory_case():
    assert {c["type"] for c in TRAJECTORY_CASES} == set(OPTIMIZERS)


SCHEDULE_CASES = [
    {"type": "Adam", "weight_decay": 0.1},
    {"type": "AdamW", "weight_decay": 0.05, "amsgrad": True},
    {"type": "Lion", "weight_decay": 0.2, "decoupled_weight_decay": True},
    {"type": "Lion", "weight_decay": 0.2, "decoupled_weight_decay": False},
    {"type": "SGD", "momentum": 0.9, "nesterov": True},
    {"type": "RMSprop", "centered": True, "momentum": 0.5},
    {"type": "Adagrad", "lr_decay": 0.1},
    {"type": "Adadelta", "weight_decay": 0.1},
]


@pytest.mark.parametrize("config", SCHEDULE_CASES, ids=lambda c: c["type"])
def test_schedule_matches_torch_lambda_lr(config):
    """A schedule of the update count (from 0) equals torch's LambdaLR stepped per step;
    Lion's decoupled decay still divides by the constructor lr (config["lr"])."""
    config = {**config, "lr": 0.1}
    assert_matches_torch(
        config,
        learning_rate=lambda count: 0.1 * 0.9**count,
        lr_lambda=lambda epoch: 0.9**epoch,
        seed=1,
    )


def test_float_learning_rate_overrides_config_lr():
    params, grads = random_problem(2)
    with jax.enable_x64(True):
        ours = optax_trajectory(
            make_optimizer({"type": "Lion", "lr": 1.0}, learning_rate=1e-3), params, grads
        )
    theirs = torch_trajectory({"type": "Lion", "lr": 1e-3}, params, grads)
    assert max_relative_difference(ours, theirs) <= TOLERANCE


def test_defaults_without_type_or_lr_are_adamw_1e_4():
    params, grads = random_problem(3)
    with jax.enable_x64(True):
        ours = optax_trajectory(make_optimizer({}), params, grads)
    theirs = torch_trajectory({"type": "AdamW"}, params, grads)
    assert max_relative_difference(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float32_pytree_under_jit(name):
    """Any pytree of float32 params; state stays float32 arrays; works with a schedule."""
    params = {"a": jnp.ones((3, 2), jnp.float32), "nested": [jnp.full((4,), 2.0, jnp.float32)]}
    opt = make_optimizer(
        {"type": name.lower()}, learning_rate=optax.cosine_decay_schedule(1e-2, 10)
    )
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(lambda p: jnp.sin(p) + 0.5, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array)
        assert leaf.dtype in (jnp.float32, jnp.int32)
    assert not np.allclose(np.asarray(params["a"]), 1.0)


# ------------------------------------------------------------------------------ validation


def test_all_problems_are_reported_at_once():
    bad = {
        "type": "AdamW",
        "lr": -1,
        "betas": [0.9],
        "eps": 0,
        "weight_decay": -0.1,
        "amsgrad": "yes",
    }
    with pytest.raises(OptimizerConfigError) as info:
        make_optimizer(bad)
    problems = info.value.problems
    assert len(problems) == 5
    text = str(info.value)
    assert "'lr': Learning rate must be positive, got -1" in text
    assert "'betas': Betas must have exactly 2 values" in text
    assert "'eps' must be a number in (0, inf), got 0" in text
    assert "'weight_decay' must be a number in [0, inf), got -0.1" in text
    assert "'amsgrad' must be true or false" in text
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"type": "Adam", "betas": [0.9, 1.0]}, "Beta2 must be in [0, 1), got 1.0"),
        ({"type": "Lion", "betas": [-0.1, 0.5]}, "Beta1 must be in [0, 1), got -0.1"),
        ({"type": "SGD", "momentum": 1.0}, "'momentum' must be a number in [0, 1), got 1.0"),
        ({"type": "RMSprop", "momentum": -0.5}, "'momentum' must be a number in [0, 1)"),
        ({"type": "RMSprop", "alpha": 0.0}, "'alpha' must be a number in (0, 1], got 0.0"),
        ({"type": "RMSprop", "eps": -1e-8}, "'eps' must be a number in (0, inf)"),
        ({"type": "Adadelta", "rho": 1.5}, "'rho' must be a number in [0, 1], got 1.5"),
        ({"type": "Adagrad", "eps": 0.0}, "'eps' must be a number in (0, inf)"),
        ({"type": "Adagrad", "lr_decay": -1}, "'lr_decay' must be a number in [0, inf)"),
        ({"type": "Adam", "lr": 0}, "Learning rate must be positive, got 0"),
        ({"type": "SGD", "nesterov": True}, "Nesterov momentum requires a momentum and zero"),
        (
            {"type": "SGD", "nesterov": True, "momentum": 0.9, "dampening": 0.1},
            "Nesterov momentum requires",
        ),
    ],
)
def test_single_rule_messages(config, expected):
    with pytest.raises(OptimizerConfigError) as info:
        make_optimizer(config)
    assert expected in str(info.value)


def test_unknown_type_lists_canonical_names():
    with pytest.raises(OptimizerConfigError) as info:
        make_optimizer({"type": "Adamax", "lr": 1e-3})
    assert str(info.value.problems[0]) == (
        "Unsupported optimizer: Adamax. Supported optimizers: "
        "['Adam', 'AdamW', 'Lion', 'SGD', 'RMSprop', 'Adagrad', 'Adadelta']"
    )


def test_unknown_key_suggests_closest():
    with pytest.raises(OptimizerConfigError) as info:
        make_optimizer({"type": "AdamW", "beta": [0.9, 0.99], "weight_decy": 0.1})
    text = str(info.value)
    assert "unknown key 'beta' for optimizer AdamW (did you mean 'betas'?); valid keys" in text
    assert ("unknown key 'weight_decy' for optimizer AdamW (did you mean 'weight_decay'?)"
            in text)
    # a key valid for another type is still unknown for this one
    problems = optimizer_config_problems({"type": "Adam", "momentum": 0.9})
    assert problems[0].startswith("unknown key 'momentum' for optimizer Adam; valid keys: [")


def test_type_is_case_insensitive():
    assert optimizer_config_problems({"type": "adamw", "amsgrad": True}) == []
    assert optimizer_config_problems({"type": "LION"}) == []
    assert optimizer_config_problems({"type": "sgd", "nesterov": True, "momentum": 0.9}) == []


def test_bad_learning_rate_argument():
    with pytest.raises(OptimizerConfigError, match="'learning_rate': Learning rate must be"):
        make_optimizer({"type": "SGD"}, learning_rate=-0.1)
    assert optimizer_config_problems("AdamW") == ["optimizer config must be a mapping, got str"]


# --------------------------------------------------------------------------- model defaults


def test_per_model_defaults():
    assert default_optimizer_config("flow") == {
        "type": "AdamW", "lr": 5e-7, "betas": [0.9, 0.999], "weight_decay": 0.0}
    assert default_optimizer_config("vae") == {
        "type": "AdamW",
        "lr": 5e-7,
        "betas": [0.9, 0.95],
        "weight_decay": 0.01,
    }
    assert default_optimizer_config("text_encoder") == {
        "type": "AdamW",
        "lr": 5e-8,
        "betas": [0.9, 0.99],
        "weight_decay": 0.01,
    }
    assert default_optimizer_config("discriminator") == {
        "type": "AdamW",
        "lr": 5e-7,
        "betas": [0.0, 0.9],
        "weight_decay": 0.001,
        "amsgrad": True,
    }
    for model in ("flow", "vae", "text_encoder", "discriminator"):
        make_optimizer(default_optimizer_config(model))


def test_per_model_defaults_are_fresh_copies():
    config = default_optimizer_config("vae")
    config["betas"].append(0.5)
    assert default_optimizer_config("vae")["betas"] == [0.9, 0.95]


def test_unknown_model_is_an_error():
    with pytest.raises(OptimizerConfigError) as info:
        default_optimizer_config("flwo")
    text = str(info.value)
    assert "did you mean 'flow'?" in text
    assert "['flow', 'vae', 'text_encoder', 'discriminator']" in text
