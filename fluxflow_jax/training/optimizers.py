"""Optax optimizers that follow the PyTorch reference's `create_optimizer` step for step.

A config is the reference's per-model dict, e.g.
``{"type": "AdamW", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.01}``.
`make_optimizer` validates it (every problem reported at once) and returns an
`optax.GradientTransformation` whose parameter trajectory equals that of `torch.optim.<type>`
(`lion_pytorch.Lion` for Lion) with the same settings.

Where optax has an exactly equivalent building block we use it. Three torch behaviours have
no optax equivalent, so they are small transforms here:
- SGD momentum: torch's first step sets the buffer to the gradient (no dampening) and later
  steps use ``momentum * buf + (1 - dampening) * grad``; `optax.trace` has no dampening.
- AdamW amsgrad: torch keeps the running max of the *raw* second moment and divides by
  ``sqrt(1 - beta2**t)`` afterwards; `optax.scale_by_amsgrad` maxes the bias-corrected one.
- Adagrad: torch adds eps *outside* the square root (`optax.scale_by_rss` puts it inside).

The learning rate always enters last through `optax.scale_by_learning_rate`, so a schedule
(a function of the update count, starting at 0) works for every type.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fluxflow_jax.checks import check_bool, check_real, in_interval, is_real
from fluxflow_jax.suggest import did_you_mean

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_TYPE",
    "OPTIMIZERS",
    "OptimizerConfigError",
    "canonical_optimizer_name",
    "default_optimizer_config",
    "make_optimizer",
    "optimizer_config_problems",
]

DEFAULT_LR = 1e-4
DEFAULT_TYPE = "AdamW"


class OptimizerConfigError(ValueError):
    """Every problem found in an optimizer config, reported together."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("Invalid optimizer config:\n  - " + "\n  - ".join(self.problems))


# --------------------------------------------------------------------------------------
# Torch-exact transforms that optax lacks
# --------------------------------------------------------------------------------------


class TorchMomentumState(NamedTuple):
    count: jax.Array  # int32 scalar: updates seen so far
    buf: optax.Updates


def scale_by_torch_momentum(
    momentum: float, dampening: float = 0.0, nesterov: bool = False
) -> optax.GradientTransformation:
    """`torch.optim.SGD` momentum: first buf = grad, then buf = m*buf + (1-dampening)*grad."""

    def init_fn(params: optax.Params) -> TorchMomentumState:
        return TorchMomentumState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0
        buf = jax.tree.map(
            lambda g, b: jnp.where(first, g, momentum * b + (1 - dampening) * g),
            updates,
            state.buf,
        )
        if nesterov:
            updates = jax.tree.map(lambda g, b: g + momentum * b, updates, buf)
        else:
            updates = buf
        return updates, TorchMomentumState(optax.safe_increment(state.count), buf)

    return optax.GradientTransformation(init_fn, update_fn)


class TorchAmsgradState(NamedTuple):
    count: jax.Array  # int32 scalar: updates seen so far
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates  # running max of the raw (not bias-corrected) nu


def scale_by_torch_amsgrad(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """`torch.optim.AdamW(amsgrad=True)`: max of raw nu, then divide by sqrt(1 - b2**t)."""

    def init_fn(params: optax.Params) -> TorchAmsgradState:
        zeros = optax.tree.zeros_like(params)
        return TorchAmsgradState(jnp.zeros([], jnp.int32), zeros, zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)

        def scale(m: jax.Array, v: jax.Array) -> jax.Array:
            bc2_sqrt = jnp.sqrt(1 - jnp.asarray(b2, v.dtype) ** count)
            return m / (jnp.sqrt(v) / bc2_sqrt + eps)

        updates = jax.tree.map(scale, mu_hat, nu_max)
        return updates, TorchAmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


class TorchAdagradState(NamedTuple):
    sum_of_squares: optax.Updates


def scale_by_torch_adagrad(
    initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> optax.GradientTransformation:
    """`torch.optim.Adagrad` without lr: grad / (sqrt(sum of grad²) + eps), eps outside."""

    def init_fn(params: optax.Params) -> TorchAdagradState:
        return TorchAdagradState(optax.tree.full_like(params, initial_accumulator_value))

    def update_fn(updates, state, params=None):
        del params
        sums = jax.tree.map(lambda s, g: s + g * g, state.sum_of_squares, updates)
        updates = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, sums)
        return updates, TorchAdagradState(sums)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------
# One builder per type
# --------------------------------------------------------------------------------------


Betas = tuple[float, float]


class LearningRate(NamedTuple):
    """The rate that scales each update, and the constructor lr torch would have been given.

    Only Lion's decoupled weight decay reads `initial` (it divides the decay by it).
    """

    rate: optax.ScalarOrSchedule
    initial: float


def _weight_decay(weight_decay: float) -> optax.GradientTransformation:
    """Adds weight_decay * param to the update (torch skips the term when it is 0)."""
    return optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity()


def _with_lr(
    lr: LearningRate, *transforms: optax.GradientTransformation
) -> optax.GradientTransformation:
    """The transforms, then the (scheduled) learning rate, which torch applies last too."""
    return optax.chain(*transforms, optax.scale_by_learning_rate(lr.rate))


def _adam(
    lr: LearningRate, *, betas: Betas, weight_decay: float, eps: float
) -> optax.GradientTransformation:
    """torch Adam: weight decay is L2, added to the gradient before the moments."""
    return _with_lr(lr, _weight_decay(weight_decay), optax.scale_by_adam(*betas, eps=eps))


def _adamw(
    lr: LearningRate, *, betas: Betas, weight_decay: float, eps: float, amsgrad: bool
) -> optax.GradientTransformation:
    """torch AdamW: decay p *= 1 - lr*wd, i.e. lr * wd * p added to the scaled update."""
    scale = scale_by_torch_amsgrad if amsgrad else optax.scale_by_adam
    return _with_lr(lr, scale(*betas, eps=eps), _weight_decay(weight_decay))


def _lion(
    lr: LearningRate, *, betas: Betas, weight_decay: float, decoupled_weight_decay: bool
) -> optax.GradientTransformation:
    """lion_pytorch 0.2.5: p *= 1 - lr_t * wd, with wd first divided by the constructor lr
    when decoupled_weight_decay. The per-step shrink is then wd * lr_t / lr_0: with a constant
    lr, wd itself (1% a step for the flow default), however small the lr."""
    if decoupled_weight_decay:
        weight_decay = weight_decay / lr.initial
    return _with_lr(lr, optax.scale_by_lion(*betas), _weight_decay(weight_decay))


def _sgd(
    lr: LearningRate, *, momentum: float, weight_decay: float, dampening: float, nesterov: bool
) -> optax.GradientTransformation:
    """torch SGD: L2 decay, then (optionally) torch-style momentum."""
    return _with_lr(
        lr,
        _weight_decay(weight_decay),
        scale_by_torch_momentum(momentum, dampening, nesterov) if momentum else optax.identity(),
    )


def _rmsprop(
    lr: LearningRate,
    *,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
) -> optax.GradientTransformation:
    """torch RMSprop: eps outside the sqrt, momentum buffer of grad/avg (starts at zero)."""
    scale = optax.scale_by_stddev if centered else optax.scale_by_rms
    return _with_lr(
        lr,
        _weight_decay(weight_decay),
        scale(decay=alpha, eps=eps, eps_in_sqrt=False),
        optax.trace(decay=momentum) if momentum > 0 else optax.identity(),
    )


def _adagrad(
    lr: LearningRate,
    *,
    lr_decay: float,
    weight_decay: float,
    initial_accumulator_value: float,
    eps: float,
) -> optax.GradientTransformation:
    """torch Adagrad: step t uses lr_t / (1 + (t-1) * lr_decay)."""
    decay = (
        optax.scale_by_schedule(lambda count: 1 / (1 + count * lr_decay))
        if lr_decay
        else optax.identity()
    )
    return _with_lr(
        lr,
        _weight_decay(weight_decay),
        scale_by_torch_adagrad(initial_accumulator_value, eps),
        decay,
    )


def _adadelta(
    lr: LearningRate, *, rho: float, eps: float, weight_decay: float
) -> optax.GradientTransformation:
    """torch Adadelta (optax's scale_by_adadelta is the same algorithm, eps inside both sqrts).

    Note torch's own default lr for Adadelta is 1.0; like every type here, ours is DEFAULT_LR.
    """
    return _with_lr(lr, _weight_decay(weight_decay), optax.scale_by_adadelta(rho, eps))


class _Spec(NamedTuple):
    build: Callable[..., optax.GradientTransformation]
    defaults: Mapping[str, Any]  # every option the type accepts besides "type" and "lr"


# Defaults: spec §5.1 for the five reference types, torch's own for Adagrad and Adadelta.
_SPECS: dict[str, _Spec] = {
    "Adam": _Spec(_adam, {"betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8}),
    "AdamW": _Spec(
        _adamw,
        {"betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8, "amsgrad": False},
    ),
    "Lion": _Spec(
        _lion,
        {"betas": (0.9, 0.95), "weight_decay": 0.01, "decoupled_weight_decay": True},
    ),
    "SGD": _Spec(
        _sgd,
        {"momentum": 0.0, "weight_decay": 0.0, "dampening": 0.0, "nesterov": False},
    ),
    "RMSprop": _Spec(
        _rmsprop,
        {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False},
    ),
    "Adagrad": _Spec(
        _adagrad,
        {"lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10},
    ),
    "Adadelta": _Spec(_adadelta, {"rho": 0.9, "eps": 1e-6, "weight_decay": 0.0}),
}

OPTIMIZERS: tuple[str, ...] = tuple(_SPECS)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_lr(key: str, value: Any) -> str | None:
    if not is_real(value) or not value > 0:
        return (
            f"'{key}': Learning rate must be positive, got {value!r}; "
            f"set it to a number > 0, e.g. {DEFAULT_LR}"
        )
    return None


def _check_betas(key: str, value: Any) -> str | None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        return f"'{key}': Betas must have exactly 2 values, got {value!r}; e.g. [0.9, 0.999]"
    problems = [
        f"Beta{i} must be in [0, 1), got {b!r}"
        for i, b in enumerate(value, start=1)
        if not (is_real(b) and 0 <= b < 1)
    ]
    if problems:
        return f"'{key}': " + "; ".join(problems) + "; e.g. [0.9, 0.999]"
    return None


_CHECKS: dict[str, Callable[[str, Any], str | None]] = {
    "lr": _check_lr,
    "betas": _check_betas,
    "weight_decay": in_interval("[0, inf)", 0.01),
    "eps": in_interval("(0, inf)", 1e-8),
    "momentum": in_interval("[0, 1)", 0.9),
    "alpha": in_interval("(0, 1]", 0.99),
    "rho": in_interval("[0, 1]", 0.9),
    "lr_decay": in_interval("[0, inf)", 0.0),
    "initial_accumulator_value": in_interval("[0, inf)", 0.0),
    "dampening": check_real,
    "amsgrad": check_bool,
    "nesterov": check_bool,
    "centered": check_bool,
    "decoupled_weight_decay": check_bool,
}


def canonical_optimizer_name(name: Any) -> str | None:
    """'adamw' -> 'AdamW'; None when `name` is not a supported type."""
    if not isinstance(name, str):
        return None
    return {n.lower(): n for n in OPTIMIZERS}.get(name.lower())


def optimizer_config_problems(
    config: Mapping[str, Any], learning_rate: float | optax.Schedule | None = None
) -> list[str]:
    """Every problem in `config` (and an explicit `learning_rate`), as messages; [] if valid."""
    if not isinstance(config, Mapping):
        return [f"optimizer config must be a mapping, got {type(config).__name__}"]
    problems: list[str | None] = []
    name = config.get("type", DEFAULT_TYPE)
    canonical = canonical_optimizer_name(name)
    if canonical is None:
        problems.append(f"Unsupported optimizer: {name}. Supported optimizers: {list(OPTIMIZERS)}")

    if learning_rate is not None and not callable(learning_rate):
        problems.append(_check_lr("learning_rate", learning_rate))

    allowed = {"type", "lr", *(_SPECS[canonical].defaults if canonical else ())}
    for key, value in config.items():
        if key == "type":
            continue
        if canonical is not None and key not in allowed:
            problems.append(
                f"unknown key '{key}' for optimizer {canonical}"
                f"{did_you_mean(key, allowed)}; valid keys: {sorted(allowed)}"
            )
        elif key in _CHECKS:
            problems.append(_CHECKS[key](key, value))

    if canonical == "SGD":
        nesterov = config.get("nesterov", False)
        momentum = config.get("momentum", 0.0)
        dampening = config.get("dampening", 0.0)
        numbers_ok = is_real(momentum) and is_real(dampening)
        if nesterov is True and numbers_ok and (momentum <= 0 or dampening != 0):
            problems.append(
                "'nesterov': Nesterov momentum requires a momentum and zero dampening; "
                "set 'momentum' > 0 and 'dampening' to 0, or 'nesterov' to false"
            )
    return [problem for problem in problems if problem]


# --------------------------------------------------------------------------------------
# Public factory
# --------------------------------------------------------------------------------------


def make_optimizer(
    config: Mapping[str, Any], learning_rate: float | optax.Schedule | None = None
) -> optax.GradientTransformation:
    """The optax equivalent of the reference's `create_optimizer(params, config)`.

    The rate is `learning_rate` when given (a float, or a schedule of the update count
    starting at 0), else ``config["lr"]`` (default DEFAULT_LR). The "constructor lr" that
    Lion's decoupled weight decay divides by is the float rate, or ``config["lr"]`` when the
    rate is a schedule (torch schedulers scale from the constructor lr).
    """
    problems = optimizer_config_problems(config, learning_rate)
    if problems:
        raise OptimizerConfigError(problems)
    spec = _SPECS[canonical_optimizer_name(config.get("type", DEFAULT_TYPE))]
    options = {**spec.defaults, **{k: v for k, v in config.items() if k in spec.defaults}}
    config_lr = float(config.get("lr", DEFAULT_LR))
    if learning_rate is None:
        lr = LearningRate(config_lr, config_lr)
    elif callable(learning_rate):
        lr = LearningRate(learning_rate, config_lr)
    else:
        lr = LearningRate(float(learning_rate), float(learning_rate))
    if "betas" in options:
        options["betas"] = tuple(float(b) for b in options["betas"])
    return spec.build(lr, **options)


# Per-model defaults: the reference's (spec §5.1 `get_default_optimizer_config`) except the
# flow's. The reference's flow default, Lion with decoupled weight decay 0.01, shrinks every
# flow weight by 1% per update whatever the learning rate (equilibrium |w| ~ lr / 0.01); it
# stays one setting away: {"type": "Lion", "betas": [0.9, 0.95], "weight_decay": 0.01,
# "decoupled_weight_decay": true} (docs/learning.md).
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "flow": {"type": "AdamW", "lr": 5e-7, "betas": [0.9, 0.999], "weight_decay": 0.0},
    "vae": {"type": "AdamW", "lr": 5e-7, "betas": [0.9, 0.95], "weight_decay": 0.01},
    "text_encoder": {"type": "AdamW", "lr": 5e-8, "betas": [0.9, 0.99], "weight_decay": 0.01},
    "discriminator": {
        "type": "AdamW",
        "lr": 5e-7,
        "betas": [0.0, 0.9],
        "weight_decay": 0.001,
        "amsgrad": True,
    },
}


def default_optimizer_config(model: str) -> dict[str, Any]:
    """A fresh copy of the reference's default optimizer config for `model`.

    Unlike the reference (which silently falls back to the vae defaults), an unknown model
    name is an error.
    """
    if model not in _MODEL_DEFAULTS:
        raise OptimizerConfigError(
            [
                f"unknown model '{model}' for default optimizer config"
                f"{did_you_mean(model, _MODEL_DEFAULTS)}; valid models: {list(_MODEL_DEFAULTS)}"
            ]
        )
    return copy.deepcopy(_MODEL_DEFAULTS[model])
