"""Optimizer groups (freezing by label, schedules, plateau, EMA) and gradient routing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fluxflow_jax.training.groups import OptimizerGroup, clip_by_measured_norm, global_norm
from fluxflow_jax.training.routing import fork
from fluxflow_jax.training.schedules import make_schedule


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.used = nnx.Linear(3, 4, rngs=rngs)
        self.unused = nnx.Linear(4, 2, rngs=rngs)


def tiny_params(seed: int = 0) -> dict[str, nnx.State]:
    return {"a": nnx.state(Tiny(nnx.Rngs(seed)), nnx.Param),
            "b": nnx.state(Tiny(nnx.Rngs(seed + 1)), nnx.Param)}


def random_like(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


ADAMW = {"type": "AdamW", "lr": 0.01, "betas": [0.9, 0.99], "weight_decay": 0.1}
COSINE = {"type": "CosineAnnealingLR", "eta_min_factor": 0.1}


def test_group_equals_plain_optax_on_trainable_leaves_and_leaves_frozen_ones_alone():
    frozen_leaf = lambda component, path: component == "b" or path[0] == "unused"
    group = OptimizerGroup.build("vae", ("a", "b"), ADAMW, COSINE, total_steps=5,
                                 clip_norm=None, frozen_leaf=frozen_leaf)
    params = tiny_params()
    opt_state = group.init(params)
    reference_tx = optax.adamw(make_schedule(COSINE, 0.01, 5), b1=0.9, b2=0.99,
                               weight_decay=0.1)
    reference = params["a"]["used"]
    reference_state = reference_tx.init(reference)
    for k in range(4):
        trainable = group.trainable(params)
        assert set(trainable) == {"a", "b"} and not jax.tree.leaves(trainable["b"])
        assert set(trainable["a"]) == {"used"}
        grads = random_like(trainable, k)
        new, opt_state = group.apply(grads, opt_state, params, jnp.zeros([]))
        updates, reference_state = reference_tx.update(grads["a"]["used"], reference_state,
                                                       reference)
        reference = optax.apply_updates(reference, updates)
        for name in ("b",):
            jax.tree.map(np.testing.assert_array_equal, new[name], params[name])
        jax.tree.map(np.testing.assert_array_equal, new["a"]["unused"], params["a"]["unused"])
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
                     new["a"]["used"], reference)
        params = new
    # Frozen leaves hold no optimizer moments.
    moments = optax.tree_utils.tree_get_all_with_path(opt_state, "mu")
    assert sum(len(jax.tree.leaves(v)) for _, v in moments) == len(
        jax.tree.leaves(params["a"]["used"]))


def test_a_scaled_component_trains_as_at_a_scaled_learning_rate_weight_decay_included():
    """Component "a" at 0.5: AdamW at half the group's scheduled rate (decay included, as a
    PyTorch parameter group with its own lr); "b" at the group's rate; no extra state."""
    group = OptimizerGroup.build("vae", ("a", "b"), ADAMW, COSINE, total_steps=5,
                                 clip_norm=None, scales={"a": 0.5, "c": 3.0})
    plain = OptimizerGroup.build("vae", ("a", "b"), ADAMW, COSINE, total_steps=5,
                                 clip_norm=None)
    params = tiny_params()
    opt_state = group.init(params)
    assert jax.tree.structure(opt_state) == jax.tree.structure(plain.init(params))
    references = {name: (optax.adamw(make_schedule(COSINE, lr, 5), b1=0.9, b2=0.99,
                                     weight_decay=0.1), params[name])
                  for name, lr in (("a", 0.005), ("b", 0.01))}
    references = {name: (tx, p, tx.init(p)) for name, (tx, p) in references.items()}
    for k in range(3):
        grads = random_like(group.trainable(params), k)
        assert float(group.learning_rate(opt_state)) == pytest.approx(
            float(make_schedule(COSINE, 0.01, 5)(k)))  # the group's, not the scaled one
        params, opt_state = group.apply(grads, opt_state, params, jnp.zeros([]))
        for name, (tx, reference, state) in references.items():
            updates, state = tx.update(grads[name], state, reference)
            reference = optax.apply_updates(reference, updates)
            references[name] = (tx, reference, state)
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
                         params[name], reference)


def test_a_scaled_component_gets_exactly_the_scaled_update_and_scale_1_changes_nothing():
    params = tiny_params()
    grads = random_like(params, 3)
    unscaled = OptimizerGroup.build("vae", ("a", "b"), ADAMW, COSINE, total_steps=5)
    at_one = OptimizerGroup.build("vae", ("a", "b"), ADAMW, COSINE, total_steps=5,
                                  scales={"a": 1.0, "b": 1.0})
    halved = OptimizerGroup.build("vae", ("a", "b"), ADAMW, COSINE, total_steps=5,
                                  scales={"a": 0.5})
    assert jax.tree.structure(at_one.transform.init(params)) == jax.tree.structure(
        unscaled.transform.init(params))
    updates = {name: group.transform.update(grads, group.transform.init(params), params,
                                            value=jnp.zeros([]))[0]
               for name, group in (("unscaled", unscaled), ("at_one", at_one),
                                   ("halved", halved))}
    for a, b in zip(jax.tree.leaves(updates["at_one"]), jax.tree.leaves(updates["unscaled"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    jax.tree.map(lambda h, u: np.testing.assert_array_equal(h, 0.5 * u),
                 updates["halved"]["a"], updates["unscaled"]["a"])
    jax.tree.map(np.testing.assert_array_equal, updates["halved"]["b"],
                 updates["unscaled"]["b"])


def test_learning_rate_follows_schedule_and_plateau():
    plateau = {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 0}
    group = OptimizerGroup.build("flow", ("a",), {"type": "SGD", "lr": 0.1}, plateau,
                                 total_steps=10)
    params = tiny_params()
    opt_state = group.init(params)
    lrs = []
    for loss in (1.0, 2.0, 3.0):  # no improvement after the first: halve each time
        lrs.append(float(group.learning_rate(opt_state)))
        grads = random_like(group.trainable(params), 0)
        params, opt_state = group.apply(grads, opt_state, params, jnp.asarray(loss))
    assert lrs == pytest.approx([0.1, 0.1, 0.05])
    cosine = OptimizerGroup.build("flow", ("a",), {"type": "SGD", "lr": 0.1}, COSINE,
                                  total_steps=4)
    opt_state = cosine.init(params)
    schedule = make_schedule(COSINE, 0.1, 4)
    for k in range(3):
        assert float(cosine.learning_rate(opt_state)) == pytest.approx(float(schedule(k)))
        params, opt_state = cosine.apply(random_like(cosine.trainable(params), k), opt_state,
                                         params, jnp.zeros([]))


def test_clipping_bounds_the_group_update():
    sgd = {"type": "SGD", "lr": 1.0}
    constant = {"type": "ConstantLR", "factor": 1.0}
    group = OptimizerGroup.build("vae", ("a",), sgd, constant, total_steps=1, clip_norm=1.0)
    params = tiny_params()
    grads = jax.tree.map(lambda g: 100 * g, random_like(group.trainable(params), 0))
    new, _ = group.apply(grads, group.init(params), params, jnp.zeros([]))
    delta = jax.tree.map(lambda n, o: n - o, new["a"], params["a"])
    assert float(optax.tree.norm(delta)) == pytest.approx(1.0, rel=1e-5)


def test_global_norm_is_the_l2_norm_of_all_leaves():
    """Block sums (the embedding-sized leaf, on CPU) and plain sums (the small leaves, bf16
    ones widened) together give the norm of all leaves, in float32."""
    rng = np.random.default_rng(0)
    tree = {"embedding": jnp.asarray(rng.normal(size=(30522, 64)), jnp.float32),
            "odd": [jnp.asarray(rng.normal(size=(17,)), jnp.float32), jnp.float32(3.0)],
            "narrow": jnp.asarray(rng.normal(size=(5, 33)), jnp.bfloat16)}
    wide = jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    expected = np.sqrt(sum(np.sum(x * x) for x in jax.tree.leaves(wide)))
    for norm in (global_norm(tree), jax.jit(global_norm)(tree)):
        assert norm.dtype == jnp.float32
        assert float(norm) == pytest.approx(expected, rel=1e-6)
    assert float(global_norm({})) == 0.0


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_clip_by_measured_norm_is_optax_clip_by_global_norm(scale):
    """Same updates as optax's, whether the norm is passed in or measured, and the same
    (empty) state, so optimizer states saved before keep restoring."""
    grads = jax.tree.map(lambda x: x * scale, random_like(tiny_params(), 1))
    ours, theirs = clip_by_measured_norm(1.0), optax.clip_by_global_norm(1.0)
    assert ours.init(grads) == theirs.init(grads)
    expected, _ = theirs.update(grads, theirs.init(grads))
    for extra in ({}, {"grad_norm": global_norm(grads)}):
        clipped, state = ours.update(grads, ours.init(grads), **extra)
        assert state == theirs.init(grads)
        for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_ema_averages_trainable_leaves_only():
    """An average holds the leaves the group trains (a frozen leaf's average is the leaf)."""
    group = OptimizerGroup.build("vae", ("a",), ADAMW, COSINE, total_steps=2,
                                 frozen_leaf=lambda c, path: path[0] == "unused",
                                 ema_decay=0.9)
    start = tiny_params(0)
    ema = {"a": group.averaged("a", start["a"])}
    assert set(ema["a"]) == {"used"}
    params = {"a": random_like(start["a"], 5)}
    averaged = group.update_ema(ema, params)
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, start["a"]["used"],
                            params["a"]["used"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
                 averaged["a"]["used"], expected)
    assert set(averaged["a"]) == {"used"}


def test_fork_routes_the_second_output_to_params_only():
    fn = lambda w, x: jnp.tanh(w * x)
    w, x = jnp.array([0.3, -1.2]), jnp.array([0.7, 0.4])

    def loss(w, x, a, b):
        y_both, y_params = fork(fn)(w, x)
        return a * jnp.sum(y_both**2) + b * jnp.sum(y_params**3)

    dw, dx = jax.grad(loss, argnums=(0, 1))(w, x, 1.0, 2.0)
    ref_dw = jax.grad(lambda w: jnp.sum(fn(w, x) ** 2) + 2 * jnp.sum(fn(w, x) ** 3))(w)
    ref_dx = jax.grad(lambda x: jnp.sum(fn(w, x) ** 2))(x)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-6)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-6)
    _, dx_params_only = jax.grad(loss, argnums=(0, 1))(w, x, 0.0, 1.0)
    assert np.all(np.asarray(dx_params_only) == 0)
