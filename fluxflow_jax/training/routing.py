"""One forward pass whose output feeds two losses with different gradient routes.

The VAE-GAN generator step needs the decoder's output twice: the reconstruction loss sends
its gradient to the decoder *and* back into the encoder, while the adversarial loss must
reach the decoder only (the encoder learns from reconstruction and KL alone). The reference
decodes twice, once from a detached latent. ``fork`` decodes once and routes cotangents
instead: both outputs are the same array, and the backward pass propagates the sum of both
cotangents into the parameters but only the first output's cotangent into the input.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def fork(fn: Callable[[Any, jax.Array], jax.Array]
         ) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """``fork(fn)(params, x) -> (y, y_params_only)`` with ``y = fn(params, x)`` computed once.

    Gradients through ``y`` reach ``params`` and ``x``; gradients through ``y_params_only``
    reach ``params`` only (as if ``x`` were ``stop_gradient(x)`` for that output). ``fn``
    must close over nothing traced: pass every array it reads through ``params``.
    """

    @jax.custom_vjp
    def forked(params, x):
        y = fn(params, x)
        return y, y

    def forward(params, x):
        y, pullback = jax.vjp(fn, params, x)
        return (y, y), pullback

    def backward(pullback, cotangents):
        through_both, params_only = cotangents
        params_grad, _ = pullback(jax.tree.map(lambda a, b: a + b, through_both, params_only))
        _, input_grad = pullback(through_both)  # under jit, its unused params half is pruned
        return params_grad, input_grad

    forked.defvjp(forward, backward)
    return forked
