"""Pieces of the ``fluxflow-jax train`` loop around the jitted step: run checkpoints, metrics
log, console line and training graphs (``graphs`` is imported on its own: it loads
matplotlib)."""

from fluxflow_jax.pipeline.checkpoints import RunCheckpointError, RunCheckpoints
from fluxflow_jax.pipeline.console import (RunningAverage, averaging_window, format_duration,
                                           progress_line)
from fluxflow_jax.pipeline.metrics_log import MetricsFileError, MetricsLog, read_metrics

__all__ = ["MetricsFileError", "MetricsLog", "RunCheckpointError", "RunCheckpoints",
           "RunningAverage", "averaging_window", "format_duration", "progress_line",
           "read_metrics"]
