"""Held-out evaluation: reconstruction quality, the fixed-timestep flow loss, and whether
generated images show what their captions say."""

from fluxflow_jax.evaluation.evaluate import available_parts, evaluate, metric_names
from fluxflow_jax.evaluation.held_out import HeldOut, HeldOutError, held_out

__all__ = ["HeldOut", "HeldOutError", "available_parts", "evaluate", "held_out",
           "metric_names"]
