"""The training loop's random keys: one program folds them, with the bits of the eager
folding that checkpoints and resumed runs rely on."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fluxflow_jax.pipeline.loop import call_keys


@pytest.mark.parametrize("global_step", [0, 1, 4097, 2**31 - 1])
def test_call_keys_are_the_seed_folded_with_the_step_then_the_call(global_step):
    base = jax.random.PRNGKey(7)
    step_key = jax.random.fold_in(base, global_step)
    keys = call_keys(base, global_step, 3)
    assert len(keys) == 3
    for call, key in enumerate(keys):
        np.testing.assert_array_equal(np.asarray(key),
                                      np.asarray(jax.random.fold_in(step_key, call)))
    assert not np.array_equal(np.asarray(keys[0]), np.asarray(keys[1]))
