"""Readers for VQA, captioning and text benchmark formats; each returns a list of records.

Every reader returns ``list[VQASample]``, ``list[CaptionSample]`` or ``list[TextSample]`` (see
``records.py``) so that recipes and the evaluation harness never see a format. Design choices:

* Images are *referenced*, not opened, so reading even VQAv2 train takes seconds; a bad or missing
  image surfaces when :func:`mmprefix.core.images.load_image` opens it (and can be skipped there).
  A missing ``image_root`` folder is reported at once, and a warning is logged when the first sample's
  image does not exist (the usual sign of a wrong ``image_root`` or ``image_pattern``).
* Image paths are stored as absolute, normalised strings. Relative names in an annotation file are
  resolved against ``image_root`` when given, otherwise against the folder holding the annotation file
  (never against the process's current directory, which is what ``datasets`` does).
* A malformed record raises :class:`AnnotationError` naming the file, the place (``line 7`` for JSONL,
  ``questions[12]`` or ``["20968379"]`` for JSON, ``row 4`` for a ``datasets`` dataset) and the problem.
* Captions are stripped of surrounding whitespace (COCO captions carry stray spaces and newlines,
  which would otherwise become training targets); questions and answers are kept as written.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from .captions import (_coco, _karpathy, read_caption_imagefolder, read_caption_jsonl, read_coco_captions,
                       read_karpathy, read_nocaps)
from .common import AnnotationError, read_json
from .hf import read_hf_captions, read_hf_text, read_hf_vqa
from .text import read_text_jsonl
from .vqa import (COCO_IMAGE_PATTERN, OKVQA_QUESTION_TYPES, _gqa, _vqav2, read_gqa, read_okvqa, read_vqa_jsonl,
                  read_vqav2)

__all__ = [
    "AnnotationError",
    "COCO_IMAGE_PATTERN",
    "FORMATS",
    "OKVQA_QUESTION_TYPES",
    "read_caption_imagefolder",
    "read_caption_jsonl",
    "read_coco_captions",
    "read_gqa",
    "read_hf_captions",
    "read_hf_text",
    "read_hf_vqa",
    "read_karpathy",
    "read_nocaps",
    "read_okvqa",
    "read_samples",
    "read_text_jsonl",
    "read_vqa_jsonl",
    "read_vqav2",
]

_READERS: dict[str, dict[str, Callable[..., list]]] = {
    "vqa": {"vqav2": read_vqav2, "okvqa": read_okvqa, "gqa": read_gqa, "jsonl": read_vqa_jsonl, "hf": read_hf_vqa},
    "caption": {"coco": read_coco_captions, "karpathy": read_karpathy, "nocaps": read_nocaps,
                "jsonl": read_caption_jsonl, "imagefolder": read_caption_imagefolder, "hf": read_hf_captions},
    "text": {"jsonl": read_text_jsonl, "hf": read_hf_text},
}

FORMATS: dict[str, tuple[str, ...]] = {task: tuple(readers) for task, readers in _READERS.items()}
"""The formats :func:`read_samples` knows, per task."""

# The formats _detect_json recognises: (public reader, the function that reads its already parsed data).
_FROM_DATA = {"vqav2": (read_vqav2, _vqav2), "gqa": (read_gqa, _gqa), "coco": (read_coco_captions, _coco),
              "karpathy": (read_karpathy, _karpathy)}


def _detect_json(task: str, data: Any) -> str | None:
    """The format of a parsed JSON file when its layout says so unambiguously, else None."""
    if not isinstance(data, dict):
        return None
    if task == "vqa":
        if isinstance(data.get("questions"), list):
            return "vqav2"
        first = next(iter(data.values()), None)
        if isinstance(first, dict) and "imageId" in first and "question" in first:
            return "gqa"
    if task == "caption" and isinstance(data.get("images"), list) and data["images"]:
        first = data["images"][0]
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy"
        if isinstance(first, dict) and "file_name" in first:
            return "coco"
    return None


def read_samples(task: str, path_or_name: Any, format: str | None = None, **options: Any) -> list:
    """Read ``task`` samples (``"vqa"``, ``"caption"`` or ``"text"``) from a file, folder or dataset.

    ``format`` picks the reader (see :data:`FORMATS`); without it the format is inferred where that is
    unambiguous: a ``datasets`` object is ``hf``, a ``.jsonl`` file ``jsonl``, a folder with
    ``metadata.jsonl`` ``imagefolder``, and a ``.json`` file by its layout (VQAv2/OK-VQA questions →
    ``vqav2``, a dict of GQA questions → ``gqa``, COCO/NoCaps → ``coco``, Karpathy → ``karpathy``).
    A dataset name for ``load_dataset`` needs ``format="hf"``. ``options`` go to the reader, e.g.
    ``annotations=`` for VQAv2, ``split=``, ``image_root=``, ``columns=``.
    """
    if task not in _READERS:
        raise ValueError(f"unknown task {task!r}; tasks are {list(_READERS)}")
    readers = _READERS[task]
    if format is not None:
        if format not in readers:
            raise ValueError(f"unknown format {format!r} for task {task!r}; formats are {list(readers)}")
        return readers[format](path_or_name, **options)

    import datasets

    if isinstance(path_or_name, (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset,
                                 datasets.IterableDatasetDict)):
        return readers["hf"](path_or_name, **options)
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"expected a path or a datasets object, got {type(path_or_name).__name__}")
    path = os.fspath(path_or_name)
    if os.path.isdir(path):
        if task == "caption" and (os.path.isfile(os.path.join(path, "metadata.jsonl"))
                                  or os.path.isfile(os.path.join(path, options.get("split") or "", "metadata.jsonl"))):
            return read_caption_imagefolder(path, **options)
        raise ValueError(f"cannot tell the format of folder {path} for task {task!r}; "
                         f"pass format= one of {list(readers)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file or folder (for a Hugging Face dataset name pass format='hf')")
    if path.endswith(".jsonl"):
        return readers["jsonl"](path, **options)
    if path.endswith(".json"):
        data = read_json(path)
        detected = _detect_json(task, data)
        if detected is not None:  # the file is parsed once: its reader's data-level half reads the parsed data
            reader, from_data = _FROM_DATA[detected]
            arguments = inspect.signature(reader).bind(path, **options)
            arguments.apply_defaults()
            _, *rest = arguments.arguments.items()  # the first is the path
            return from_data(data, path, **dict(rest))
    raise ValueError(f"cannot tell the format of {path} for task {task!r}; pass format= one of {list(readers)}")
