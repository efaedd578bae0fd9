"""Training core: optimizers, learning-rate schedules, losses and pure train steps."""

from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.lpips import LPIPS
from fluxflow_jax.training.state import PackedState, TrainState
from fluxflow_jax.training.train_step import StageConfig, StageConfigError, TrainStep
from fluxflow_jax.training.vae_step import VAEOptions

__all__ = ["LPIPS", "FlowOptions", "PackedState", "StageConfig", "StageConfigError",
           "TrainState", "TrainStep", "VAEOptions"]
