"""Caption formats: COCO, NoCaps, Karpathy splits, JSONL and image folders."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


from ..records import CaptionSample
from .common import PathLike, Record, UniqueIds, image_root_of, join, read_json, read_jsonl, top, warn_if_first_image_missing


def _coco(data: Any, path: PathLike, *, image_root: PathLike | None, domain: str | None = None) -> list[CaptionSample]:
    images = top(data, path, "images", "a COCO-style captions file")
    annotations = top(data, path, "annotations", "a COCO-style captions file", required=False) or []
    root = image_root_of(path, image_root)
    samples: dict[Any, CaptionSample] = {}
    for index, raw in enumerate(images):
        record = Record(raw, path, f"images[{index}]")
        image_id = record.get("id", "id")
        if image_id in samples:
            record.fail(f"duplicate image id {image_id!r}")
        if domain is not None and record.get("domain", "str") != domain:
            continue
        samples[image_id] = CaptionSample(image_id=image_id, image=join(root, record.get("file_name", "str")))
    known = {record["id"] for record in images} if domain is not None else samples
    for index, raw in enumerate(annotations):
        record = Record(raw, path, f"annotations[{index}]")
        image_id = record.get("image_id", "id")
        caption = record.get("caption", "str")
        if image_id not in known:
            record.fail(f"image_id {image_id!r} is not in 'images'")
        if image_id in samples:
            samples[image_id].captions.append(caption.strip())
    result = list(samples.values())
    warn_if_first_image_missing(result, path)
    return result


def read_coco_captions(path: PathLike, *, image_root: PathLike | None = None) -> list[CaptionSample]:
    """Read COCO captions JSON (``{"images": [{id, file_name}], "annotations": [{image_id, caption}]}``).

    One sample per image, in ``images`` order, with its captions in file order; an image without
    annotations (or a file with no ``annotations`` at all, like COCO/NoCaps test image info) gets
    ``captions == []``. ``image_id`` is the COCO id, so results can go straight to COCO evaluation.
    """
    return _coco(read_json(path), path, image_root=image_root)


def read_nocaps(path: PathLike, *, image_root: PathLike | None = None,
                domain: str | None = None) -> list[CaptionSample]:
    """Read NoCaps (``nocaps_val_4500_captions.json`` or the test image info, which has no annotations).

    Same layout as COCO; ``domain`` (``"in-domain"``, ``"near-domain"``, ``"out-domain"``) keeps only
    the images of that domain, as NoCaps reports scores per domain.
    """
    return _coco(read_json(path), path, image_root=image_root, domain=domain)


def _karpathy(data: Any, path: PathLike, *, split: str | Sequence[str] | None,
              image_root: PathLike | None) -> list[CaptionSample]:
    images = top(data, path, "images", "a Karpathy split file (dataset_coco.json / dataset_flickr30k.json)")
    wanted = {split} if isinstance(split, str) else (set(split) if split is not None else None)
    root = image_root_of(path, image_root)
    samples, present = [], set()
    ids = UniqueIds(path, "image id")
    for index, raw in enumerate(images):
        record = Record(raw, path, f"images[{index}]")
        image_split = record.get("split", "str")
        present.add(image_split)
        if wanted is not None and image_split not in wanted:
            continue
        filename = record.get("filename", "str")
        folder = record.get("filepath", "str", "")
        image_id = record.get("cocoid", "id", None)
        if image_id is None:
            image_id = record.get("imgid", "id", filename)
        ids.add(image_id, record.where)
        captions = []
        for k, sentence in enumerate(record.get("sentences", "list")):
            captions.append(Record(sentence, path, f"images[{index}].sentences[{k}]").get("raw", "str").strip())
        samples.append(CaptionSample(image_id=image_id, image=join(root, folder, filename), captions=captions))
    if wanted is not None and not samples:
        raise ValueError(f"{os.fspath(path)}: no images in split {split!r}; the file has splits {sorted(present)}")
    warn_if_first_image_missing(samples, path)
    return samples


def read_karpathy(path: PathLike, *, split: str | Sequence[str] | None = "test",
                  image_root: PathLike | None = None) -> list[CaptionSample]:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...).

    ``split`` is one name, several (``("train", "restval")`` is the usual 113k COCO training set: the
    file keeps ``restval`` apart) or None for all. Captions are the ``raw`` sentences. The image is
    ``image_root / filepath / filename`` (Flickr30k has no ``filepath``). ``image_id`` is ``cocoid`` when
    present (COCO), else ``imgid`` (Karpathy's index, Flickr), else the file name.
    """
    return _karpathy(read_json(path), path, split=split, image_root=image_root)


def _captions(record: Record) -> list[str]:
    if record.has("captions"):
        return [caption.strip() for caption in record.get("captions", "str_list")]
    for key in ("caption", "text"):
        if record.has(key):
            return [record.get(key, "str").strip()]
    return []


def read_caption_jsonl(path: PathLike, *, image_root: PathLike | None = None) -> list[CaptionSample]:
    """Read JSONL lines ``{"image", "captions": [...]}`` (or ``"caption": "..."``); one sample per line.

    ``image_id`` is the record's ``image_id`` (or ``id``), else the ``image`` value as written. Two lines with the
    same image id are an error (captions are predicted and scored per image id): put all of an image's
    captions on one line.
    """
    return _caption_lines(path, image_root_of(path, image_root), "image")


def _caption_lines(path: str, root: str, image_field: str) -> list[CaptionSample]:
    """One sample per JSONL line of ``path``: its image (``image_field``, relative to ``root``), its id (``image_id``,
    ``id``, else the image as written; unique) and its captions."""
    samples = []
    ids = UniqueIds(path, "image id")
    for _, where, raw in read_jsonl(path):
        record = Record(raw, path, where)
        image = record.get(image_field, "str")
        image_id = record.first(("image_id", "id"), "id", image)
        ids.add(image_id, where)
        samples.append(CaptionSample(image_id=image_id, image=join(root, image), captions=_captions(record)))
    warn_if_first_image_missing(samples, path)
    return samples


def _metadata_file(folder: PathLike, split: str | None) -> str:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    base = os.path.join(folder, split) if split is not None else folder
    metadata = os.path.join(base, "metadata.jsonl")
    if not os.path.isfile(metadata):
        raise FileNotFoundError(f"no metadata.jsonl in {base} (an image folder needs one line "
                                "{\"file_name\": ..., \"text\": ...} per image)")
    return metadata


def read_caption_imagefolder(folder: PathLike, *, split: str | None = None) -> list[CaptionSample]:
    """Read a ``datasets``-style image folder: images plus ``metadata.jsonl`` lines
    ``{"file_name", "text"}`` (or ``"captions": [...]``/``"caption"``), in ``folder`` or ``folder/split``.

    ``file_name`` is relative to the metadata file's folder. ``image_id`` is the record's ``image_id``
    (or ``id``), else ``file_name``. Parsed directly (no ``datasets`` cache, exact error lines); use
    :func:`read_hf_captions` on ``load_dataset("imagefolder", ...)`` for the other layouts it accepts.
    """
    metadata = _metadata_file(folder, split)
    return _caption_lines(metadata, os.path.dirname(os.path.abspath(metadata)), "file_name")


