"""fluxflow-jax: FluxFlow text-to-image training in JAX, checkpoint-compatible with PyTorch."""

__version__ = "0.1.0"
