"""Hugging Face ``datasets`` objects (or names for ``load_dataset``) as VQA, caption or text records."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from PIL import Image

from ...core.images import UnreadableImage
from ..records import CaptionSample, TextSample, VQASample
from .common import AnnotationError, PathLike, Record, UniqueIds, image_root_of, join, short


def _hf_dataset(dataset: Any, split: str | None, load_kwargs: Mapping[str, Any]) -> tuple[Any, str]:
    """A single ``datasets.Dataset``/``IterableDataset`` and a name for messages."""
    import datasets

    name = None
    if isinstance(dataset, (str, os.PathLike)):
        name = os.fspath(dataset)
        try:
            dataset = datasets.load_dataset(name, split=split, **load_kwargs)
        except datasets.exceptions.DatasetGenerationError as error:  # says neither which file nor where
            cause = error.__cause__ or error
            files = load_kwargs.get("data_files") or name
            raise AnnotationError(files if isinstance(files, (str, os.PathLike)) else f"one of {files}", "reading",
                                  f"{type(cause).__name__}: {cause}") from None
    elif load_kwargs:
        raise TypeError(f"load_dataset arguments {sorted(load_kwargs)} given with a dataset object")
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None and len(dataset) == 1:
            split = next(iter(dataset))
        if split not in dataset:
            raise ValueError(f"pass split= one of {sorted(dataset)}" if split is None
                             else f"split {split!r} not in the dataset's splits {sorted(dataset)}")
        name = f"{name or 'dataset'}[{split!r}]"
        dataset = dataset[split]
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"expected a datasets.Dataset, DatasetDict or a name for load_dataset, "
                        f"got {type(dataset).__name__}")
    if name is None:
        files = getattr(dataset, "cache_files", None) or []
        name = files[0]["filename"] if files else f"<datasets.{type(dataset).__name__}>"
    return dataset, name


def _hf_rows(dataset: Any, columns: Mapping[str, str] | None, fields: Sequence[str], required: Sequence[str],
             name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row, {field: value})`` with images left undecoded (``{"bytes", "path"}``)."""
    import datasets

    columns = dict(columns or {})
    unknown = set(columns) - set(fields)
    if unknown:
        raise ValueError(f"columns maps unknown fields {sorted(unknown)}; fields are {list(fields)}")
    available = list(dataset.column_names or dataset.features or [])
    for field_name, column in columns.items():
        if column not in available:
            raise ValueError(f"{name}: column {column!r} (for {field_name!r}) not in the dataset's columns {available}")
    mapping = {field_name: columns.get(field_name, field_name) for field_name in fields
               if columns.get(field_name, field_name) in available}
    missing = [field_name for field_name in required if field_name not in mapping]
    if missing:
        raise ValueError(f"{name}: no column for {missing}; the dataset has {available}: "
                         f"pass columns={{{', '.join(f'{m!r}: ...' for m in missing)}}}")
    image_column = mapping.get("image")
    features = dataset.features or {}
    if image_column is not None and isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # no decoding while reading
    dataset = dataset.select_columns(sorted(set(mapping.values())))
    if isinstance(dataset, datasets.Dataset):
        dataset = dataset.with_format(None)
        row = 0
        for batch in dataset.iter(batch_size=1000):
            for values in zip(*(batch[column] for column in mapping.values())):
                yield row, dict(zip(mapping, values))
                row += 1
    else:
        for row, example in enumerate(dataset):
            yield row, {field_name: example[column] for field_name, column in mapping.items()}


def _hf_image(value: Any, root: str | None, name: str, where: str) -> Any:
    """A path when the image is a file on disk, else a lazily opened PIL image of the stored bytes."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        return join(root or os.getcwd(), value)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        path = join(root or os.getcwd(), value["path"]) if value.get("path") else None
        if path is not None and (not value.get("bytes") or os.path.isfile(path)):
            return path  # a file on disk: keep the path, hold no bytes in memory
        if value.get("bytes"):
            try:
                return Image.open(io.BytesIO(value["bytes"]))  # reads the header only; pixels on load
            except Exception as error:  # decided where the image is loaded, under its on_bad_image policy
                return UnreadableImage(f"{name} {where}", f"{type(error).__name__}: {error}")
    raise AnnotationError(name, where, f"'image' must be a path, an image or image bytes, got {short(value)}")


def _hf_value(value: Any, kind: str, name: str, where: str, field_name: str, default: Any = ...) -> Any:
    record = Record({field_name: value}, name, where)
    return record.get(field_name, kind, default)


def _hf_answers(value: Any, name: str, where: str) -> list[str]:
    """Answers as a list of strings, a string, ``[{"answer": ...}]`` or ``{"answer": [...]}``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get("answer"), list):
        value = value["answer"]
    if isinstance(value, list):
        answers = [item.get("answer") if isinstance(item, dict) else item for item in value]
        if all(isinstance(answer, str) for answer in answers):
            return answers
    raise AnnotationError(name, where, f"answers must be a string, a list of strings or of {{'answer': ...}}, "
                                       f"got {short(value)}")


def _hf_captions(value: Any, name: str, where: str) -> list[str]:
    """Captions as a string, a list of strings, or dicts with ``raw``/``caption``/``text``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, dict):
        value = next((value[key] for key in ("raw", "caption", "text") if isinstance(value.get(key), list)), value)
    if isinstance(value, list):
        captions = [next((item.get(key) for key in ("raw", "caption", "text") if key in item), None)
                    if isinstance(item, dict) else item for item in value]
        if all(isinstance(caption, str) for caption in captions):
            return [caption.strip() for caption in captions]
    raise AnnotationError(name, where, f"captions must be a string or a list of strings, got {short(value)}")


_VQA_FIELDS = ("question_id", "image", "question", "answers", "answer", "image_id", "answer_type", "question_type")
_CAPTION_FIELDS = ("image_id", "image", "captions", "caption")
_TEXT_FIELDS = ("id", "prompt", "target")


def read_hf_vqa(dataset: Any, *, columns: Mapping[str, str] | None = None, split: str | None = None,
                image_root: PathLike | None = None, **load_kwargs: Any) -> list[VQASample]:
    """Read VQA samples from a ``datasets`` dataset (object, ``DatasetDict`` + ``split``, or a name/path
    with ``load_dataset`` keyword arguments such as ``data_files`` and ``cache_dir``).

    ``columns`` maps record fields to column names, e.g. ``{"question": "q", "answers": "labels"}``;
    unmapped fields use the column of the same name when there is one (``answers`` falls back to an
    ``answer`` column). Answers may be strings, lists of strings or VQAv2-style ``[{"answer": ...}]``.
    ``question_id`` defaults to the row number. Images: see :func:`read_hf_captions`.
    """
    dataset, name = _hf_dataset(dataset, split, load_kwargs)
    root = image_root_of(None, image_root) if image_root is not None else None
    samples = []
    ids = UniqueIds(name, "question_id")
    for row, values in _hf_rows(dataset, columns, _VQA_FIELDS, ("image", "question"), name):
        where = f"row {row}"
        answers = values.get("answers", values.get("answer"))
        question_id = ids.add(_hf_value(values.get("question_id"), "id", name, where, "question_id", row), where)
        samples.append(VQASample(
            question_id=question_id,
            image=_hf_image(values["image"], root, name, where),
            question=_hf_value(values["question"], "str", name, where, "question"),
            answers=_hf_answers(answers, name, where),
            image_id=_hf_value(values.get("image_id"), "id", name, where, "image_id", None),
            answer_type=_hf_value(values.get("answer_type"), "str", name, where, "answer_type", None),
            question_type=_hf_value(values.get("question_type"), "str", name, where, "question_type", None)))
    return samples


def read_hf_captions(dataset: Any, *, columns: Mapping[str, str] | None = None, split: str | None = None,
                     image_root: PathLike | None = None, **load_kwargs: Any) -> list[CaptionSample]:
    """Read captioning samples from a ``datasets`` dataset; arguments as for :func:`read_hf_vqa`.

    Fields: ``image_id`` (default: the row number), ``image``, ``captions`` (or ``caption``): a string, a
    list of strings, or dicts with ``raw``/``caption``/``text``. One sample per row.

    Images are never decoded while reading: an ``Image`` column whose file exists on disk becomes its
    path; embedded bytes become a lazily opened PIL image (header read only; a file that cannot even
    be opened becomes an :class:`~mmprefix.core.images.UnreadableImage` naming the row, which loading treats
    as any bad image: skipped or an error, per ``on_bad_image``). Path strings and
    stored relative paths resolve against ``image_root`` if given, else the current directory, which is
    what ``datasets`` itself does.
    """
    dataset, name = _hf_dataset(dataset, split, load_kwargs)
    root = image_root_of(None, image_root) if image_root is not None else None
    samples = []
    ids = UniqueIds(name, "image id")
    for row, values in _hf_rows(dataset, columns, _CAPTION_FIELDS, ("image",), name):
        where = f"row {row}"
        captions = values.get("captions", values.get("caption"))
        image_id = ids.add(_hf_value(values.get("image_id"), "id", name, where, "image_id", row), where)
        samples.append(CaptionSample(
            image_id=image_id,
            image=_hf_image(values["image"], root, name, where),
            captions=_hf_captions(captions, name, where)))
    return samples


def read_hf_text(dataset: Any, *, columns: Mapping[str, str] | None = None, split: str | None = None,
                 **load_kwargs: Any) -> list[TextSample]:
    """Read prompt/target samples from a ``datasets`` dataset; ``columns`` maps ``id``, ``prompt`` and
    ``target`` to column names (``id`` defaults to the row number, ``target`` to ``""``)."""
    dataset, name = _hf_dataset(dataset, split, load_kwargs)
    samples = []
    ids = UniqueIds(name, "id")
    for row, values in _hf_rows(dataset, columns, _TEXT_FIELDS, ("prompt",), name):
        where = f"row {row}"
        ids.add(_hf_value(values.get("id"), "id", name, where, "id", row), where)
        samples.append(TextSample(id=_hf_value(values.get("id"), "id", name, where, "id", row),
                                  prompt=_hf_value(values["prompt"], "str", name, where, "prompt"),
                                  target=_hf_value(values.get("target"), "str", name, where, "target", "")))
    return samples


