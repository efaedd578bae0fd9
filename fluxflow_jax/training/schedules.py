"""Learning-rate schedules equal to ``torch.optim.lr_scheduler``'s, plus linear warm-up.

A config is the reference's per-model dict, e.g. ``{"type": "CosineAnnealingLR",
"eta_min_factor": 0.1}``. Every schedule except ReduceLROnPlateau is a pure function of the
update count (``optax.Schedule``): the update with count k uses the LR PyTorch uses after k
``scheduler.step()`` calls. ReduceLROnPlateau depends on a metric, so it is an optax
transformation (``reduce_on_plateau``) chained after the optimizer; its state lives in the
optimizer state, so skipped steps and checkpoints treat it like everything else.

Warm-up (any type): with ``warmup_steps: W`` the LR rises linearly, factor (k + 1)/(W + 1)
for k < W, and the main schedule then runs over the remaining ``total_steps - W`` updates.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fluxflow_jax.suggest import did_you_mean

_COMMON = {"type", "warmup_steps"}


class SchedulerConfigError(ValueError):
    """An invalid scheduler config; the message lists every problem."""


def _cosine(base_lr: float, total: int, cfg: Mapping[str, Any]) -> optax.Schedule:
    eta_min = base_lr * cfg["eta_min_factor"]
    # The closed form of PyTorch's recursive update; it keeps following the cosine
    # (periodically) past T_max, as PyTorch does.
    return lambda k: eta_min + (base_lr - eta_min) * (1 + jnp.cos(jnp.pi * k / total)) / 2


def _linear(base_lr: float, total: int, cfg: Mapping[str, Any]) -> optax.Schedule:
    start, end = cfg["start_factor"], cfg["end_factor"]
    iters = cfg["total_iters"] or total
    return lambda k: base_lr * (start + (end - start) * jnp.minimum(k, iters) / iters)


def _exponential(base_lr: float, total: int, cfg: Mapping[str, Any]) -> optax.Schedule:
    return lambda k: base_lr * cfg["gamma"] ** k


def _constant(base_lr: float, total: int, cfg: Mapping[str, Any]) -> optax.Schedule:
    iters = cfg["total_iters"] or total
    return lambda k: base_lr * jnp.where(k < iters, cfg["factor"], 1.0)


def _step(base_lr: float, total: int, cfg: Mapping[str, Any]) -> optax.Schedule:
    size = cfg["step_size"] or total // 10
    return lambda k: base_lr * cfg["gamma"] ** (k // size)


def _multi_step(base_lr: float, total: int, cfg: Mapping[str, Any]) -> optax.Schedule:
    milestones = jnp.asarray(sorted(cfg["milestones"]))
    return lambda k: base_lr * cfg["gamma"] ** jnp.sum(milestones <= k)


def _flat(base_lr: float, total: int, cfg: Mapping[str, Any]) -> optax.Schedule:
    return lambda k: jnp.asarray(base_lr, jnp.float32) + 0.0 * k


class _Spec(NamedTuple):
    build: Callable[[float, int, Mapping[str, Any]], optax.Schedule]
    defaults: Mapping[str, Any]


# Defaults are the reference's (fluxflow-training 0.2.1), not always PyTorch's own: e.g.
# ConstantLR factor 1.0 and StepLR step_size total_steps // 10 (0 here means "derive it").
SCHEDULERS: dict[str, _Spec] = {
    "CosineAnnealingLR": _Spec(_cosine, {"eta_min_factor": 0.1}),
    "LinearLR": _Spec(_linear, {"start_factor": 1.0, "end_factor": 0.1, "total_iters": 0}),
    "ExponentialLR": _Spec(_exponential, {"gamma": 0.95}),
    "ConstantLR": _Spec(_constant, {"factor": 1.0, "total_iters": 0}),
    "StepLR": _Spec(_step, {"step_size": 0, "gamma": 0.1}),
    "MultiStepLR": _Spec(_multi_step, {"milestones": None, "gamma": 0.1}),
    "ReduceLROnPlateau": _Spec(_flat, {"factor": 0.1, "patience": 10, "threshold": 1e-4,
                                       "cooldown": 0, "min_lr": 0.0, "eps": 1e-8}),
}

# Per-model defaults of the reference: cosine everywhere, a deeper floor for the text encoder.
_MODEL_DEFAULTS = {
    "flow": {"type": "CosineAnnealingLR", "eta_min_factor": 0.1},
    "vae": {"type": "CosineAnnealingLR", "eta_min_factor": 0.1},
    "text_encoder": {"type": "CosineAnnealingLR", "eta_min_factor": 0.001},
    "discriminator": {"type": "CosineAnnealingLR", "eta_min_factor": 0.1},
}


def default_scheduler_config(model: str) -> dict[str, Any]:
    if model not in _MODEL_DEFAULTS:
        raise SchedulerConfigError(f"no default scheduler for model '{model}'; valid models: "
                                   f"{sorted(_MODEL_DEFAULTS)}")
    return dict(_MODEL_DEFAULTS[model])


def _canonical_type(name: Any) -> str | None:
    by_lower = {t.lower(): t for t in SCHEDULERS}
    return by_lower.get(str(name).lower())


def _completed(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config with its type's defaults filled in (None for an unsupported type)."""
    kind = _canonical_type(config.get("type", "CosineAnnealingLR"))
    if kind is None:
        return None
    allowed = _COMMON | set(SCHEDULERS[kind].defaults)
    return {"warmup_steps": 0, **SCHEDULERS[kind].defaults,
            **{k: v for k, v in config.items() if k in allowed}, "type": kind}


def scheduler_config_problems(config: Mapping[str, Any],
                              total_steps: int | None = None) -> list[str]:
    """Every problem in a scheduler config, as messages ([] if valid). Without
    ``total_steps`` the checks that depend on the run's length are left out."""
    if not isinstance(config, Mapping):
        return [f"scheduler config must be a mapping, got {type(config).__name__}"]
    cfg = _completed(config)
    if cfg is None:
        return [f"Unsupported scheduler: {config.get('type')}. "
                f"Supported schedulers: {list(SCHEDULERS)}"]
    allowed = _COMMON | set(SCHEDULERS[cfg["type"]].defaults)
    return ([f"unknown key '{key}' for {cfg['type']}{did_you_mean(key, sorted(allowed))}"
             for key in sorted(set(config) - allowed)] + _problems(cfg, total_steps))


def resolve_scheduler_config(config: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    """The config completed with defaults, or ``SchedulerConfigError`` listing every problem."""
    problems = scheduler_config_problems(config, total_steps)
    if problems:
        kind = _canonical_type(config.get("type", "CosineAnnealingLR")) or "scheduler"
        raise SchedulerConfigError(f"invalid {kind} config: " + "; ".join(problems))
    return _completed(config)


def _problems(cfg: Mapping[str, Any], total_steps: int | None) -> list[str]:
    kind, out = cfg["type"], []
    known_length = total_steps is not None
    if known_length and (not isinstance(total_steps, int) or total_steps <= 0):
        out.append(f"total_steps must be > 0, got {total_steps}")
    if not (isinstance(cfg["warmup_steps"], int) and 0 <= cfg["warmup_steps"]):
        out.append(f"warmup_steps must be an integer >= 0, got {cfg['warmup_steps']}")
    elif isinstance(total_steps, int) and cfg["warmup_steps"] >= max(total_steps, 1):
        out.append(f"warmup_steps ({cfg['warmup_steps']}) must be below total_steps "
                   f"({total_steps})")
    check = lambda ok, message: ok or out.append(message)
    if kind == "CosineAnnealingLR":
        check(0 < cfg["eta_min_factor"] <= 1,
              f"eta_min_factor must be in (0, 1], got {cfg['eta_min_factor']}")
    if kind in ("ExponentialLR", "StepLR", "MultiStepLR"):
        check(0 < cfg["gamma"] < 1, f"gamma must be in (0, 1), got {cfg['gamma']}")
    if kind == "StepLR" and (known_length or cfg["step_size"]):
        size = cfg["step_size"] or (total_steps // 10 if isinstance(total_steps, int) else 0)
        check(size > 0, f"step_size must be > 0, got {size} (the default is total_steps // "
                        "10: set step_size for runs shorter than 10 steps)")
    if kind == "LinearLR":
        check(cfg["start_factor"] > 0 and cfg["end_factor"] > 0,
              f"start_factor and end_factor must be > 0, got {cfg['start_factor']} and "
              f"{cfg['end_factor']}")
    if kind in ("LinearLR", "ConstantLR"):
        check(cfg["total_iters"] >= 0, f"total_iters must be >= 0, got {cfg['total_iters']}")
    if kind == "ConstantLR":
        check(cfg["factor"] > 0, f"factor must be > 0, got {cfg['factor']}")
    if kind == "MultiStepLR":
        milestones = cfg["milestones"]
        check(isinstance(milestones, (list, tuple)) and len(milestones) > 0
              and all(isinstance(m, int) and m > 0 for m in milestones)
              and list(milestones) == sorted(set(milestones)),
              f"milestones must be a non-empty increasing list of positive step counts, "
              f"got {milestones}")
    if kind == "ReduceLROnPlateau":
        check(0 < cfg["factor"] < 1, f"factor must be in (0, 1), got {cfg['factor']}")
        check(cfg["patience"] >= 0, f"patience must be >= 0, got {cfg['patience']}")
        check(cfg["threshold"] >= 0, f"threshold must be >= 0, got {cfg['threshold']}")
        check(cfg["cooldown"] >= 0, f"cooldown must be >= 0, got {cfg['cooldown']}")
        check(cfg["min_lr"] >= 0, f"min_lr must be >= 0, got {cfg['min_lr']}")
    return out


def make_schedule(config: Mapping[str, Any], base_lr: float, total_steps: int
                  ) -> optax.Schedule:
    """The LR as a function of the update count (before any plateau reduction)."""
    cfg = resolve_scheduler_config(config, total_steps)
    warmup = cfg["warmup_steps"]
    main = SCHEDULERS[cfg["type"]].build(base_lr, total_steps - warmup, cfg)
    if not warmup:
        return main
    return lambda k: jnp.where(k < warmup, base_lr * (k + 1) / (warmup + 1),
                               main(jnp.maximum(k - warmup, 0)))


class PlateauState(NamedTuple):
    scale: jax.Array  # current LR / base LR
    best: jax.Array
    bad_steps: jax.Array
    cooldown: jax.Array


def reduce_on_plateau(config: Mapping[str, Any], base_lr: float
                      ) -> optax.GradientTransformationExtraArgs:
    """PyTorch's ``ReduceLROnPlateau`` (mode "min", relative threshold) as an optax transform.

    ``update(updates, state, params, value=metric)`` scales the updates by the current LR
    factor, then records ``value``: as in PyTorch, where ``scheduler.step(metric)`` follows
    ``optimizer.step()``, a metric first affects the next update.
    """
    cfg = resolve_scheduler_config({**config, "type": "ReduceLROnPlateau"}, 1)

    def init(params) -> PlateauState:
        del params
        return PlateauState(jnp.ones([], jnp.float32), jnp.full([], jnp.inf, jnp.float32),
                            jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

    def update(updates, state: PlateauState, params=None, *, value, **extra):
        del params, extra
        scaled = jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates)
        value = jnp.asarray(value, jnp.float32)
        improved = value < state.best * (1 - cfg["threshold"])
        best = jnp.where(improved, value, state.best)
        in_cooldown = state.cooldown > 0
        bad = jnp.where(improved | in_cooldown, 0, state.bad_steps + 1)
        cooldown = jnp.where(in_cooldown, state.cooldown - 1, state.cooldown)
        lr = base_lr * state.scale
        new_lr = jnp.maximum(lr * cfg["factor"], cfg["min_lr"])
        plateaued = bad > cfg["patience"]
        reduce = plateaued & (lr - new_lr > cfg["eps"])  # PyTorch skips negligible changes
        return scaled, PlateauState(
            scale=jnp.where(reduce, new_lr / base_lr, state.scale).astype(jnp.float32),
            best=best,
            bad_steps=jnp.where(plateaued, 0, bad),
            cooldown=jnp.where(plateaued, cfg["cooldown"], cooldown))

    return optax.GradientTransformationExtraArgs(init, update)

