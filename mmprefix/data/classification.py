"""Classification data: ``(image path, class name)`` pairs from an ``{image, label}`` JSONL file or from a
folder with one subfolder of images per class."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, label = row["image"], row["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}, line {number}: expected a JSON object with image and label ({err!r})") from None
        samples.append((str((path.parent / image).resolve()), str(label)))
    if not samples:
        raise ValueError(f"{path} holds no records")
    return samples, sorted({label for _, label in samples})
