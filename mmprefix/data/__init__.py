"""Data for training and evaluation: sample records, readers for benchmark formats, images, the synthetic world."""

from ..core.images import BadImageError, ImageLoader, NoReadableImages, UnreadableImage, load_image
from .readers import AnnotationError, read_samples
from .records import CaptionSample, TextSample, VQASample

__all__ = [
    "AnnotationError",
    "BadImageError",
    "CaptionSample",
    "ImageLoader",
    "NoReadableImages",
    "TextSample",
    "UnreadableImage",
    "VQASample",
    "load_image",
    "read_samples",
]
