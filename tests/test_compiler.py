"""The XLA options train steps are compiled with."""

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax.training.compiler import compiler_options


def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.nn.relu(jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))


def test_cpu_options_take_convolutions_from_ynnpack_with_the_same_result():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 32)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 32, 64)) * 0.05, jnp.float32)
    lowered = jax.jit(conv).lower(x, kernel)
    default = lowered.compile()  # XLA's default sends this conv to YNNPACK
    tuned = lowered.compile(compiler_options=compiler_options("cpu"))
    assert "__ynn_fusion" in default.as_text()
    assert "__ynn_fusion" not in tuned.as_text()
    np.testing.assert_allclose(tuned(x, kernel), default(x, kernel), rtol=1e-5, atol=1e-5)
    assert compiler_options("gpu") == {} and compiler_options("tpu") == {}
