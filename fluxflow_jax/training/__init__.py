"""Training core: optimizers, learning-rate schedules, losses and pure train steps."""
