"""Evaluation: predictions with the official metrics for any model, with or without prefixes.

``predict.py`` (generate, score, several runs), ``decode.py`` (outputs as text), ``contrastive.py`` (CLIP-like
models: classification and retrieval), ``metrics.py`` (the official metrics), ``report.py`` (tables and HTML).
"""

from .contrastive import classify, retrieve
from .predict import (GENERATIVE_TASKS, PRIMARY_METRIC, TASKS, ResumeError, evaluate_runs, official_results, predict,
                      sample_id, score)

__all__ = [
    "GENERATIVE_TASKS",
    "PRIMARY_METRIC",
    "ResumeError",
    "TASKS",
    "classify",
    "evaluate_runs",
    "official_results",
    "predict",
    "retrieve",
    "sample_id",
    "score",
]
