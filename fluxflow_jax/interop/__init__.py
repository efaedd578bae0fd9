"""PyTorch ``fluxflow`` checkpoints <-> fluxflow-jax modules, through one explicit key table."""

from fluxflow_jax.interop.checkpoint import (TorchIncompatibilityWarning, component_from_tensors,
                                             infer_config, load_fluxflow, save_fluxflow,
                                             save_step_files)
from fluxflow_jax.interop.keymap import COMPONENT_TABLES
from fluxflow_jax.interop.state import CheckpointError, export_tensors, import_tensors
from fluxflow_jax.models.bundle import FluxFlowModels

__all__ = ["COMPONENT_TABLES", "CheckpointError", "FluxFlowModels", "component_from_tensors",
           "export_tensors", "import_tensors", "infer_config", "load_fluxflow", "save_fluxflow",
           "save_step_files", "TorchIncompatibilityWarning"]
