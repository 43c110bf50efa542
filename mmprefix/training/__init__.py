"""Training: ``engine.py`` (the loop every recipe uses, on accelerate) and ``checkpoints.py`` (training
checkpoints that resume exactly)."""

from .engine import TrainConfig, TrainingError, plot_curves, save_trained, train

__all__ = ["TrainConfig", "TrainingError", "plot_curves", "save_trained", "train"]
