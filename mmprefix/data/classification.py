"""Classification data: ``(image path, class name)`` pairs from an ``{image, label}`` JSONL file or from a
folder with one subfolder of images per class."""

from __future__ import annotations

import os
from pathlib import Path

from .readers.common import AnnotationError, Record, read_jsonl

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_classification(path: str | os.PathLike) -> tuple[list[tuple[str, str]], list[str]]:
    """Classification data: ``([(image path, class name), ...], sorted class names)``.

    ``path`` is a JSONL file of ``{"image": ..., "label": ...}`` records (relative image paths are resolved
    against the file's folder) or a folder with one subfolder of images per class.
    """
    path = Path(path)
    if path.is_dir():
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        samples = [(str(f.resolve()), name) for name in classes for f in sorted((path / name).iterdir())
                   if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not samples:
            raise ValueError(f"{path}: no images in class subfolders")
        return samples, classes
    if not path.is_file():
        raise FileNotFoundError(f"{path} is neither a JSONL file nor a folder of class subfolders")
    samples = []
    for _, where, row in read_jsonl(path):
        record = Record(row, path, where)
        image, label = record.get("image", "str"), record.get("label", "id")  # an integer label names its class too
        if not image.strip() or not str(label).strip():
            record.fail("'image' and 'label' must not be empty")
        samples.append((str((path.parent / image).resolve()), str(label)))
    if not samples:
        raise AnnotationError(path, "the whole file", "holds no records")
    return samples, sorted({label for _, label in samples})
