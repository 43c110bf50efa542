"""Training: ``engine.py`` (the loop every recipe uses, on accelerate), ``checkpoints.py`` (training checkpoints
that resume exactly) and ``config.py`` (its settings, which import nothing heavy). The engine's names load on
first use, so that reading settings does not import torch."""

import importlib
from typing import Any

from .config import TrainConfig, TrainingError, TrainingInterrupted, TrainSettings

_LAZY = {"plot_curves": ".engine", "save_trained": ".engine", "saved_name": ".engine", "train": ".engine"}

__all__ = ["TrainConfig", "TrainSettings", "TrainingError", "TrainingInterrupted", "plot_curves", "save_trained",
           "saved_name", "train"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
