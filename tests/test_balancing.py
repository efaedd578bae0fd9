"""EMA and adaptive loss balancing against direct numpy computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax.training.balancing import adaptive_weights, new_history, push
from fluxflow_jax.training.ema import ema_update


def test_ema_follows_its_formula():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "step": np.int32(7)}
    average = {"w": np.zeros((3, 4), np.float32), "step": np.int32(0)}
    expected = average["w"]
    update = jax.jit(ema_update)
    for _ in range(5):
        params = {"w": params["w"] + 0.1, "step": params["step"] + 1}
        average = update(average, params, 0.9)
        expected = 0.9 * expected + 0.1 * params["w"]
    np.testing.assert_allclose(average["w"], expected, rtol=1e-6)
    assert average["w"].dtype == np.float32
    assert int(average["step"]) == int(params["step"])  # non-float leaves follow the params


def reference_weights(histories, enabled, max_weight=5.0):
    """The rule written out in numpy over plain Python lists of the last 100 values."""
    averages = [abs(np.mean(h[-100:])) if h else 0.0 for h in histories]
    seen = [a for a in averages if a > 0]
    target = sum(seen) / len(seen) if seen else 0.0
    weights = [target / (a + 1e-8) if a > 0 else 1.0 for a in averages]
    return [min(max(w, 0.0), max_weight) if on else 0.0 for w, on in zip(weights, enabled)]


def test_adaptive_weights_over_a_long_run():
    """recon ~0.05, kl ~ 3e4 (summed), gan signed around 0: the reference's unbounded,
    sign-flipping weights become bounded, non-negative ones."""
    rng = np.random.default_rng(1)
    history = new_history(3)
    step = jax.jit(lambda h, v, a: push(h, v, a))
    python = [[], [], []]
    enabled = jnp.array([True, True, True])
    for k in range(250):
        values = np.array([0.05 + 0.01 * rng.random(), 3e4 * (1 + rng.random()),
                           -0.2 + 0.1 * rng.normal()], np.float32)
        active = np.array([True, True, k % 3 != 0])  # the GAN term is not always on
        history = step(history, jnp.asarray(values), jnp.asarray(active))
        for i in range(3):
            if active[i]:
                python[i].append(float(values[i]))
        if k in (0, 5, 99, 100, 249):
            np.testing.assert_allclose(adaptive_weights(history, enabled),
                                       reference_weights(python, [True] * 3), rtol=1e-4)
    weights = np.asarray(adaptive_weights(history, enabled))
    assert weights.min() >= 0 and weights.max() <= 5.0


def test_disabled_and_unseen_losses():
    history = push(new_history(3), jnp.array([2.0, 0.0, 0.0]), jnp.array([True, False, False]))
    weights = adaptive_weights(history, jnp.array([True, True, False]))
    np.testing.assert_allclose(weights, [1.0, 1.0, 0.0], rtol=1e-6)
