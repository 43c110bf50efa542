"""Data for training and evaluation: sample records, readers for benchmark formats, images, the synthetic world."""

from .records import CaptionSample, TextSample, VQASample

__all__ = ["CaptionSample", "TextSample", "VQASample"]
