"""Test session setup (before jax loads): 8 virtual CPU devices for multi-device tests, and
an on-disk cache of compiled programs, which many tests share (the same tiny train steps,
compiled in several tests, test workers and training subprocesses)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "fluxflow-jax-test-xla-cache"))
