"""Sampling: DPM-Solver++ / Euler for the v-prediction flow, and text-to-image generation."""

from fluxflow_jax.sampling.dpm_solver import (SolverSchedule, dpm_solver_timesteps,
                                              euler_sample, sample, solver_schedule,
                                              trajectory)
from fluxflow_jax.sampling.generate import (generate, latent_grid, needed_networks,
                                            starting_noise, to_uint8)

__all__ = ["SolverSchedule", "dpm_solver_timesteps", "euler_sample", "generate", "latent_grid",
           "needed_networks", "sample", "solver_schedule", "starting_noise", "to_uint8",
           "trajectory"]
