"""Readers for VQA, captioning and text benchmark formats; each returns a list of records.

Every reader returns ``list[VQASample]``, ``list[CaptionSample]`` or ``list[TextSample]`` (see
``records.py``) so that recipes and the evaluation harness never see a format. Design choices:

* Images are *referenced*, not opened, so reading even VQAv2 train takes seconds; a bad or missing
  image surfaces when :func:`mmprefix.data.images.load_image` opens it (and can be skipped there).
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

import io
import json
import logging
import os
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, Union

from PIL import Image

from .images import UnreadableImage
from .records import CaptionSample, TextSample, VQASample

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

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

COCO_IMAGE_PATTERN = "COCO_{split}_{image_id:012d}.jpg"
"""File names of COCO 2014/2015 images, e.g. ``COCO_val2014_000000000042.jpg``."""

OKVQA_QUESTION_TYPES = {
    "one": "Vehicles and Transportation",
    "two": "Brands, Companies and Products",
    "three": "Objects, Material and Clothing",
    "four": "Sports and Recreation",
    "five": "Cooking and Food",
    "six": "Geography, History, Language and Culture",
    "seven": "People and Everyday life",
    "eight": "Plants and Animals",
    "nine": "Science and Technology",
    "ten": "Weather and Climate",
    "other": "Other",
}
"""OK-VQA's ``question_type`` codes (kept as codes in the samples) and the knowledge categories they name."""


class AnnotationError(ValueError):
    """A malformed annotation record: ``path`` (file or dataset), ``where`` (line, index or key), ``reason``."""

    def __init__(self, path: Any, where: str, reason: str):
        self.path = str(path)
        self.where = where
        self.reason = reason
        super().__init__(f"{self.path}: {where}: {reason}")


# ---------------------------------------------------------------------------------------------------
# Small helpers: files, fields, image paths


def _read_json(path: PathLike) -> Any:
    """Parse a JSON file; a syntax error becomes an :class:`AnnotationError` with its line and column."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8-sig") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            where = f"line {error.lineno}, column {error.colno}"
            raise AnnotationError(path, where, f"invalid JSON: {error.msg}") from None
        except UnicodeDecodeError as error:
            raise AnnotationError(path, f"byte {error.start}", "not UTF-8 text") from None


def _read_jsonl(path: PathLike) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(index, "line N", record)`` for each non-blank line; N is 1-based, index counts records."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    index = 0
    with open(path, "rb") as file:
        for number, data in enumerate(file, start=1):
            try:
                line = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise AnnotationError(path, f"line {number}", "not UTF-8 text") from None
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise AnnotationError(path, where, f"invalid JSON: {error.msg} (column {error.colno})") from None
            if not isinstance(record, dict):
                raise AnnotationError(path, where, f"expected a JSON object, got {type(record).__name__}")
            yield index, where, record
            index += 1


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda value: isinstance(value, str), "a string"),
    "id": (_is_id, "an integer or a string"),
    "list": (lambda value: isinstance(value, list), "a list"),
    "dict": (lambda value: isinstance(value, dict), "an object"),
    "str_list": (_is_str_list, "a list of strings"),
}


class _Record:
    """One annotation record with the file and place it came from, for typed field access."""

    def __init__(self, record: Any, path: Any, where: str):
        self.path, self.where = path, where
        if not isinstance(record, dict):
            self.fail(f"expected an object, got {type(record).__name__}")
        self.record = record

    def fail(self, reason: str) -> NoReturn:
        raise AnnotationError(self.path, self.where, reason)

    def has(self, key: str) -> bool:
        return self.record.get(key) is not None

    def first(self, keys: Sequence[str], kind: str, default: Any) -> Any:
        """The first of ``keys`` that is present (checked against ``kind``), else ``default``."""
        for key in keys:
            if self.has(key):
                return self.get(key, kind)
        return default

    def get(self, key: str, kind: str, default: Any = ...) -> Any:
        """``record[key]`` checked against ``kind``; missing/null is an error unless a default is given."""
        value = self.record.get(key)
        if value is None:
            if default is not ...:
                return default
            self.fail(f"{key!r} is null" if key in self.record else f"missing key {key!r}")
        check, description = _CHECKS[kind]
        if not check(value):
            self.fail(f"{key!r} must be {description}, got {type(value).__name__} {_short(value)}")
        return value


class _UniqueIds:
    """The ids of one file, each with where it was first seen: a repeated id is an error naming both places (a
    second question with the same id would silently get the first one's answers, and predictions, keyed by id,
    would overwrite each other)."""

    def __init__(self, path: Any, what: str):
        self.path, self.what, self.seen = path, what, {}

    def add(self, value: Any, where: str) -> None:
        if value in self.seen:
            raise AnnotationError(self.path, where, f"{self.what} {value!r} repeats the one at {self.seen[value]}; "
                                                    f"each record needs its own {self.what}")
        self.seen[value] = where


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _top(data: Any, path: PathLike, key: str, what: str, *, required: bool = True) -> list | None:
    """``data[key]`` as a list, or an :class:`AnnotationError` explaining the expected layout."""
    if not isinstance(data, dict) or (required and key not in data):
        raise AnnotationError(path, "top level", f"expected an object with a {key!r} list ({what})")
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list):
        raise AnnotationError(path, f"[{key!r}]", f"expected a list, got {type(value).__name__}")
    return value


def _image_root(annotation_path: PathLike | None, image_root: PathLike | None) -> str:
    """The folder that relative image names are joined to; an explicit one must exist."""
    if image_root is None:
        if annotation_path is None:
            return os.getcwd()
        return os.path.dirname(os.path.abspath(os.fspath(annotation_path)))
    root = os.path.abspath(os.path.expanduser(os.fspath(image_root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root} (image_root={os.fspath(image_root)!r})")
    return root


def _join(root: str, *names: str) -> str:
    """Absolute, normalised path of ``names`` under ``root`` (an absolute name stays as it is)."""
    return os.path.normpath(os.path.join(root, *(os.path.expanduser(name) for name in names)))


def _warn_if_first_image_missing(samples: Sequence[VQASample | CaptionSample], source: Any) -> None:
    """One cheap existence check: a wrong image_root/pattern shows up now, not hours into a run."""
    if samples and isinstance(samples[0].image, str) and not os.path.exists(samples[0].image):
        logger.warning("%s: the first sample's image %s does not exist; check image_root / image_pattern",
                       source, samples[0].image)


# ---------------------------------------------------------------------------------------------------
# VQA


def _format_image(pattern: str, path: PathLike, where: str, **fields: Any) -> str:
    try:
        return pattern.format(**fields)
    except KeyError as error:
        raise ValueError(f"image_pattern {pattern!r} uses {{{error.args[0]}}}, which is not one of "
                         f"{sorted(fields)}" + (" (pass split=, e.g. 'val2014')" if error.args[0] == "split" else ""))
    except (ValueError, TypeError) as error:
        raise AnnotationError(path, where, f"cannot build the image name from {pattern!r}: {error}") from None


def _vqav2(questions_data: Any, questions_path: PathLike, annotations: PathLike | None, *,
           image_root: PathLike | None, split: str | None, image_pattern: str, answer_field: str) -> list[VQASample]:
    questions = _top(questions_data, questions_path, "questions", "a VQAv2/OK-VQA questions file")
    if split is None:
        split = questions_data.get("data_subtype")
    root = _image_root(questions_path, image_root)

    by_question: dict[Any, tuple[str, _Record]] = {}
    if annotations is not None:
        annotation_data = _read_json(annotations)
        annotation_list = _top(annotation_data, annotations, "annotations", "a VQAv2/OK-VQA annotations file")
        subtypes = (questions_data.get("data_subtype"), annotation_data.get("data_subtype"))
        if None not in subtypes and subtypes[0] != subtypes[1]:
            raise AnnotationError(annotations, "top level", f"data_subtype {subtypes[1]!r} differs from the questions' "
                                                            f"{subtypes[0]!r} ({os.fspath(questions_path)}): the two "
                                                            "files are from different splits")
        annotated = _UniqueIds(annotations, "question_id")
        for index, raw in enumerate(annotation_list):
            record = _Record(raw, annotations, f"annotations[{index}]")
            annotated.add(record.get("question_id", "id"), record.where)
            by_question[record.record["question_id"]] = (f"annotations[{index}]", record)
        unanswered = [q.get("question_id") for q in questions if isinstance(q, dict)
                      and q.get("question_id") not in by_question]
        if questions and len(unanswered) == len(questions):
            raise AnnotationError(annotations, "top level", f"none of the {len(questions)} questions of "
                                                            f"{os.fspath(questions_path)} has an annotation here: the "
                                                            "two files do not belong together")

    samples = []
    asked = _UniqueIds(questions_path, "question_id")
    for index, raw in enumerate(questions):
        question = _Record(raw, questions_path, f"questions[{index}]")
        question_id = question.get("question_id", "id")
        asked.add(question_id, question.where)
        image_id = question.get("image_id", "id")
        fields = {"split": split, "image_id": image_id} if split is not None else {"image_id": image_id}
        image = _join(root, _format_image(image_pattern, questions_path, question.where, **fields))
        sample = VQASample(question_id=question_id, image=image, question=question.get("question", "str"),
                           image_id=image_id)
        if annotations is not None:
            if question_id not in by_question:
                question.fail(f"question_id {question_id!r} has no annotation in {os.fspath(annotations)}")
            where, annotation = by_question[question_id]
            if annotation.get("image_id", "id", None) not in (None, image_id):
                annotation.fail(f"image_id {annotation.record['image_id']!r} differs from the question's {image_id!r}")
            answers = []
            for k, item in enumerate(annotation.get("answers", "list")):
                answers.append(_Record(item, annotations, f"{where}.answers[{k}]").get(answer_field, "str"))
            sample.answers = answers
            sample.answer_type = annotation.get("answer_type", "str", None)
            sample.question_type = annotation.get("question_type", "str", None)
        samples.append(sample)
    _warn_if_first_image_missing(samples, questions_path)
    return samples


def read_vqav2(questions: PathLike, annotations: PathLike | None = None, *, image_root: PathLike | None = None,
               split: str | None = None, image_pattern: str = COCO_IMAGE_PATTERN,
               answer_field: str = "answer") -> list[VQASample]:
    """Read the official VQAv2 pair: a questions file and, except for test splits, an annotations file.

    ``answers`` holds all ten human answers in file order, duplicates included, because VQA accuracy
    counts matches among them; ``multiple_choice_answer`` is not used. Without ``annotations``
    (test-dev/test) every sample has ``answers == []``. The image is ``image_root / image_pattern``
    formatted with ``split`` and ``image_id``; ``split`` defaults to the file's ``data_subtype``
    (``"val2014"``), ``image_root`` to the questions file's folder. A question with no annotation, or
    whose annotation names another image, is an :class:`AnnotationError`; extra annotations are ignored.
    """
    return _vqav2(_read_json(questions), questions, annotations, image_root=image_root, split=split,
                  image_pattern=image_pattern, answer_field=answer_field)


def read_okvqa(questions: PathLike, annotations: PathLike | None = None, *, image_root: PathLike | None = None,
               split: str | None = None, image_pattern: str = COCO_IMAGE_PATTERN,
               answer_field: str = "answer") -> list[VQASample]:
    """Read OK-VQA, which uses the VQAv2 layout (``OpenEnded_mscoco_val2014_questions.json`` +
    ``mscoco_val2014_annotations.json``, COCO 2014 images) with these quirks:

    * five answers were collected per question and each appears twice, so there are ten; keep all ten
      for the VQA accuracy formula;
    * in v1.1 ``answer`` is the stemmed answer that the official evaluation compares against and
      ``raw_answer`` the original text: pass ``answer_field="raw_answer"`` for the latter (e.g. as
      training targets);
    * ``question_type`` is a knowledge-category code (``"one"`` ... ``"ten"``, ``"other"``), kept as is;
      :data:`OKVQA_QUESTION_TYPES` names them; ``answer_type`` is always ``"other"``.
    """
    return read_vqav2(questions, annotations, image_root=image_root, split=split, image_pattern=image_pattern,
                      answer_field=answer_field)


def _gqa(data: Any, path: PathLike, *, image_root: PathLike | None, image_pattern: str) -> list[VQASample]:
    if not isinstance(data, dict):
        raise AnnotationError(path, "top level", "expected an object mapping question ids to questions (GQA)")
    root = _image_root(path, image_root)
    samples = []
    for question_id, raw in data.items():
        record = _Record(raw, path, f"[{question_id!r}]")
        image_id = record.get("imageId", "id")
        types = record.get("types", "dict", {})
        answer = record.get("answer", "str", None)
        image = _join(root, _format_image(image_pattern, path, record.where, imageId=image_id, image_id=image_id))
        samples.append(VQASample(question_id=question_id, image=image, question=record.get("question", "str"),
                                 answers=[answer] if answer is not None else [], image_id=image_id,
                                 answer_type=types.get("structural"), question_type=types.get("detailed")))
    _warn_if_first_image_missing(samples, path)
    return samples


def read_gqa(path: PathLike, *, image_root: PathLike | None = None,
             image_pattern: str = "{imageId}.jpg") -> list[VQASample]:
    """Read a GQA questions file: ``{question_id: {"imageId", "question", "answer", "types", ...}}``.

    GQA has one answer per question, so ``answers == [answer]`` (``[]`` for test/challenge files, which
    have none): score it by exact match, not with the ten-answer VQA formula. ``question_id`` is the
    string key, ``image_id`` the ``imageId``; ``answer_type``/``question_type`` are the ``structural``
    and ``detailed`` entries of ``types``. ``fullAnswer`` is not kept.
    """
    return _gqa(_read_json(path), path, image_root=image_root, image_pattern=image_pattern)


def read_vqa_jsonl(path: PathLike, *, image_root: PathLike | None = None) -> list[VQASample]:
    """Read JSONL lines ``{"image", "question", "answers": [...]}`` (or ``"answer": "..."``).

    Optional keys: ``question_id`` (or ``id``; default: the record's 0-based index), ``image_id``,
    ``answer_type``, ``question_type``. No answers means ``answers == []``.
    """
    root = _image_root(path, image_root)
    samples = []
    ids = _UniqueIds(path, "question_id")
    for index, where, raw in _read_jsonl(path):
        record = _Record(raw, path, where)
        ids.add(record.first(("question_id", "id"), "id", index), where)
        samples.append(VQASample(
            question_id=record.first(("question_id", "id"), "id", index),
            image=_join(root, record.get("image", "str")),
            question=record.get("question", "str"),
            answers=_record_answers(record),
            image_id=record.get("image_id", "id", None),
            answer_type=record.get("answer_type", "str", None),
            question_type=record.get("question_type", "str", None)))
    _warn_if_first_image_missing(samples, path)
    return samples


def _record_answers(record: _Record) -> list[str]:
    if record.has("answers"):
        return list(record.get("answers", "str_list"))
    answer = record.get("answer", "str", None)
    return [answer] if answer is not None else []


# ---------------------------------------------------------------------------------------------------
# Captioning


def _coco(data: Any, path: PathLike, *, image_root: PathLike | None, domain: str | None = None) -> list[CaptionSample]:
    images = _top(data, path, "images", "a COCO-style captions file")
    annotations = _top(data, path, "annotations", "a COCO-style captions file", required=False) or []
    root = _image_root(path, image_root)
    samples: dict[Any, CaptionSample] = {}
    for index, raw in enumerate(images):
        record = _Record(raw, path, f"images[{index}]")
        image_id = record.get("id", "id")
        if image_id in samples:
            record.fail(f"duplicate image id {image_id!r}")
        if domain is not None and record.get("domain", "str") != domain:
            continue
        samples[image_id] = CaptionSample(image_id=image_id, image=_join(root, record.get("file_name", "str")))
    known = {record["id"] for record in images} if domain is not None else samples
    for index, raw in enumerate(annotations):
        record = _Record(raw, path, f"annotations[{index}]")
        image_id = record.get("image_id", "id")
        caption = record.get("caption", "str")
        if image_id not in known:
            record.fail(f"image_id {image_id!r} is not in 'images'")
        if image_id in samples:
            samples[image_id].captions.append(caption.strip())
    result = list(samples.values())
    _warn_if_first_image_missing(result, path)
    return result


def read_coco_captions(path: PathLike, *, image_root: PathLike | None = None) -> list[CaptionSample]:
    """Read COCO captions JSON (``{"images": [{id, file_name}], "annotations": [{image_id, caption}]}``).

    One sample per image, in ``images`` order, with its captions in file order; an image without
    annotations (or a file with no ``annotations`` at all, like COCO/NoCaps test image info) gets
    ``captions == []``. ``image_id`` is the COCO id, so results can go straight to COCO evaluation.
    """
    return _coco(_read_json(path), path, image_root=image_root)


def read_nocaps(path: PathLike, *, image_root: PathLike | None = None,
                domain: str | None = None) -> list[CaptionSample]:
    """Read NoCaps (``nocaps_val_4500_captions.json`` or the test image info, which has no annotations).

    Same layout as COCO; ``domain`` (``"in-domain"``, ``"near-domain"``, ``"out-domain"``) keeps only
    the images of that domain, as NoCaps reports scores per domain.
    """
    return _coco(_read_json(path), path, image_root=image_root, domain=domain)


def _karpathy(data: Any, path: PathLike, *, split: str | Sequence[str] | None,
              image_root: PathLike | None) -> list[CaptionSample]:
    images = _top(data, path, "images", "a Karpathy split file (dataset_coco.json / dataset_flickr30k.json)")
    wanted = {split} if isinstance(split, str) else (set(split) if split is not None else None)
    root = _image_root(path, image_root)
    samples, present = [], set()
    ids = _UniqueIds(path, "image id")
    for index, raw in enumerate(images):
        record = _Record(raw, path, f"images[{index}]")
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
            captions.append(_Record(sentence, path, f"images[{index}].sentences[{k}]").get("raw", "str").strip())
        samples.append(CaptionSample(image_id=image_id, image=_join(root, folder, filename), captions=captions))
    if wanted is not None and not samples:
        raise ValueError(f"{os.fspath(path)}: no images in split {split!r}; the file has splits {sorted(present)}")
    _warn_if_first_image_missing(samples, path)
    return samples


def read_karpathy(path: PathLike, *, split: str | Sequence[str] | None = "test",
                  image_root: PathLike | None = None) -> list[CaptionSample]:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...).

    ``split`` is one name, several (``("train", "restval")`` is the usual 113k COCO training set: the
    file keeps ``restval`` apart) or None for all. Captions are the ``raw`` sentences. The image is
    ``image_root / filepath / filename`` (Flickr30k has no ``filepath``). ``image_id`` is ``cocoid`` when
    present (COCO), else ``imgid`` (Karpathy's index, Flickr), else the file name.
    """
    return _karpathy(_read_json(path), path, split=split, image_root=image_root)


def _captions(record: _Record) -> list[str]:
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
    root = _image_root(path, image_root)
    samples = []
    ids = _UniqueIds(path, "image id")
    for _, where, raw in _read_jsonl(path):
        record = _Record(raw, path, where)
        image = record.get("image", "str")
        image_id = record.first(("image_id", "id"), "id", image)
        ids.add(image_id, where)
        samples.append(CaptionSample(image_id=image_id, image=_join(root, image), captions=_captions(record)))
    _warn_if_first_image_missing(samples, path)
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
    root = os.path.dirname(os.path.abspath(metadata))
    samples = []
    ids = _UniqueIds(metadata, "image id")
    for _, where, raw in _read_jsonl(metadata):
        record = _Record(raw, metadata, where)
        file_name = record.get("file_name", "str")
        image_id = record.first(("image_id", "id"), "id", file_name)
        ids.add(image_id, where)
        samples.append(CaptionSample(image_id=image_id, image=_join(root, file_name), captions=_captions(record)))
    _warn_if_first_image_missing(samples, metadata)
    return samples


# ---------------------------------------------------------------------------------------------------
# Text generation


def read_text_jsonl(path: PathLike) -> list[TextSample]:
    """Read JSONL lines ``{"prompt", "target"}``; ``id`` is optional (default: the 0-based record index)
    and so is ``target`` (``""``, for prompts to complete only)."""
    samples = []
    ids = _UniqueIds(path, "id")
    for index, where, raw in _read_jsonl(path):
        record = _Record(raw, path, where)
        ids.add(record.get("id", "id", index), where)
        samples.append(TextSample(id=record.get("id", "id", index), prompt=record.get("prompt", "str"),
                                  target=record.get("target", "str", "")))
    return samples


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets


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
        return _join(root or os.getcwd(), value)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        path = _join(root or os.getcwd(), value["path"]) if value.get("path") else None
        if path is not None and (not value.get("bytes") or os.path.isfile(path)):
            return path  # a file on disk: keep the path, hold no bytes in memory
        if value.get("bytes"):
            try:
                return Image.open(io.BytesIO(value["bytes"]))  # reads the header only; pixels on load
            except Exception as error:  # decided where the image is loaded, under its on_bad_image policy
                return UnreadableImage(f"{name} {where}", f"{type(error).__name__}: {error}")
    raise AnnotationError(name, where, f"'image' must be a path, an image or image bytes, got {_short(value)}")


def _hf_value(value: Any, kind: str, name: str, where: str, field_name: str, default: Any = ...) -> Any:
    record = _Record({field_name: value}, name, where)
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
                                       f"got {_short(value)}")


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
    raise AnnotationError(name, where, f"captions must be a string or a list of strings, got {_short(value)}")


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
    root = _image_root(None, image_root) if image_root is not None else None
    samples = []
    ids = _UniqueIds(name, "question_id")
    for row, values in _hf_rows(dataset, columns, _VQA_FIELDS, ("image", "question"), name):
        where = f"row {row}"
        answers = values.get("answers", values.get("answer"))
        ids.add(_hf_value(values.get("question_id"), "id", name, where, "question_id", row), where)
        samples.append(VQASample(
            question_id=_hf_value(values.get("question_id"), "id", name, where, "question_id", row),
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
    be opened becomes an :class:`~mmprefix.data.images.UnreadableImage` naming the row, which loading treats
    as any bad image: skipped or an error, per ``on_bad_image``). Path strings and
    stored relative paths resolve against ``image_root`` if given, else the current directory, which is
    what ``datasets`` itself does.
    """
    dataset, name = _hf_dataset(dataset, split, load_kwargs)
    root = _image_root(None, image_root) if image_root is not None else None
    samples = []
    ids = _UniqueIds(name, "image id")
    for row, values in _hf_rows(dataset, columns, _CAPTION_FIELDS, ("image",), name):
        where = f"row {row}"
        captions = values.get("captions", values.get("caption"))
        ids.add(_hf_value(values.get("image_id"), "id", name, where, "image_id", row), where)
        samples.append(CaptionSample(
            image_id=_hf_value(values.get("image_id"), "id", name, where, "image_id", row),
            image=_hf_image(values["image"], root, name, where),
            captions=_hf_captions(captions, name, where)))
    return samples


def read_hf_text(dataset: Any, *, columns: Mapping[str, str] | None = None, split: str | None = None,
                 **load_kwargs: Any) -> list[TextSample]:
    """Read prompt/target samples from a ``datasets`` dataset; ``columns`` maps ``id``, ``prompt`` and
    ``target`` to column names (``id`` defaults to the row number, ``target`` to ``""``)."""
    dataset, name = _hf_dataset(dataset, split, load_kwargs)
    samples = []
    ids = _UniqueIds(name, "id")
    for row, values in _hf_rows(dataset, columns, _TEXT_FIELDS, ("prompt",), name):
        where = f"row {row}"
        ids.add(_hf_value(values.get("id"), "id", name, where, "id", row), where)
        samples.append(TextSample(id=_hf_value(values.get("id"), "id", name, where, "id", row),
                                  prompt=_hf_value(values["prompt"], "str", name, where, "prompt"),
                                  target=_hf_value(values.get("target"), "str", name, where, "target", "")))
    return samples


# ---------------------------------------------------------------------------------------------------
# One entry point

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
        data = _read_json(path)
        detected = _detect_json(task, data)
        if detected is not None:  # the file is parsed once: its reader's data-level half reads the parsed data
            reader, from_data = _FROM_DATA[detected]
            arguments = inspect.signature(reader).bind(path, **options)
            arguments.apply_defaults()
            _, *rest = arguments.arguments.items()  # the first is the path
            return from_data(data, path, **dict(rest))
    raise ValueError(f"cannot tell the format of {path} for task {task!r}; pass format= one of {list(readers)}")
