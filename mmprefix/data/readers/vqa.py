"""VQA formats: VQAv2, OK-VQA, GQA and JSONL."""

from __future__ import annotations

import os
from typing import Any


from ..records import VQASample
from .common import AnnotationError, PathLike, Record, UniqueIds, image_root_of, join, read_json, read_jsonl, top, warn_if_first_image_missing


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
    questions = top(questions_data, questions_path, "questions", "a VQAv2/OK-VQA questions file")
    if split is None:
        split = questions_data.get("data_subtype")
    root = image_root_of(questions_path, image_root)

    by_question: dict[Any, tuple[str, Record]] = {}
    if annotations is not None:
        annotation_data = read_json(annotations)
        annotation_list = top(annotation_data, annotations, "annotations", "a VQAv2/OK-VQA annotations file")
        subtypes = (questions_data.get("data_subtype"), annotation_data.get("data_subtype"))
        if None not in subtypes and subtypes[0] != subtypes[1]:
            raise AnnotationError(annotations, "top level", f"data_subtype {subtypes[1]!r} differs from the questions' "
                                                            f"{subtypes[0]!r} ({os.fspath(questions_path)}): the two "
                                                            "files are from different splits")
        annotated = UniqueIds(annotations, "question_id")
        for index, raw in enumerate(annotation_list):
            record = Record(raw, annotations, f"annotations[{index}]")
            annotated.add(record.get("question_id", "id"), record.where)
            by_question[record.record["question_id"]] = (f"annotations[{index}]", record)
        unanswered = [q.get("question_id") for q in questions if isinstance(q, dict)
                      and q.get("question_id") not in by_question]
        if questions and len(unanswered) == len(questions):
            raise AnnotationError(annotations, "top level", f"none of the {len(questions)} questions of "
                                                            f"{os.fspath(questions_path)} has an annotation here: the "
                                                            "two files do not belong together")

    samples = []
    asked = UniqueIds(questions_path, "question_id")
    for index, raw in enumerate(questions):
        question = Record(raw, questions_path, f"questions[{index}]")
        question_id = question.get("question_id", "id")
        asked.add(question_id, question.where)
        image_id = question.get("image_id", "id")
        fields = {"split": split, "image_id": image_id} if split is not None else {"image_id": image_id}
        image = join(root, _format_image(image_pattern, questions_path, question.where, **fields))
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
                answers.append(Record(item, annotations, f"{where}.answers[{k}]").get(answer_field, "str"))
            sample.answers = answers
            sample.answer_type = annotation.get("answer_type", "str", None)
            sample.question_type = annotation.get("question_type", "str", None)
        samples.append(sample)
    warn_if_first_image_missing(samples, questions_path)
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
    return _vqav2(read_json(questions), questions, annotations, image_root=image_root, split=split,
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
    root = image_root_of(path, image_root)
    samples = []
    for question_id, raw in data.items():
        record = Record(raw, path, f"[{question_id!r}]")
        image_id = record.get("imageId", "id")
        types = record.get("types", "dict", {})
        answer = record.get("answer", "str", None)
        image = join(root, _format_image(image_pattern, path, record.where, imageId=image_id, image_id=image_id))
        samples.append(VQASample(question_id=question_id, image=image, question=record.get("question", "str"),
                                 answers=[answer] if answer is not None else [], image_id=image_id,
                                 answer_type=types.get("structural"), question_type=types.get("detailed")))
    warn_if_first_image_missing(samples, path)
    return samples


def read_gqa(path: PathLike, *, image_root: PathLike | None = None,
             image_pattern: str = "{imageId}.jpg") -> list[VQASample]:
    """Read a GQA questions file: ``{question_id: {"imageId", "question", "answer", "types", ...}}``.

    GQA has one answer per question, so ``answers == [answer]`` (``[]`` for test/challenge files, which
    have none): score it by exact match, not with the ten-answer VQA formula. ``question_id`` is the
    string key, ``image_id`` the ``imageId``; ``answer_type``/``question_type`` are the ``structural``
    and ``detailed`` entries of ``types``. ``fullAnswer`` is not kept.
    """
    return _gqa(read_json(path), path, image_root=image_root, image_pattern=image_pattern)


def read_vqa_jsonl(path: PathLike, *, image_root: PathLike | None = None) -> list[VQASample]:
    """Read JSONL lines ``{"image", "question", "answers": [...]}`` (or ``"answer": "..."``).

    Optional keys: ``question_id`` (or ``id``; default: the record's 0-based index), ``image_id``,
    ``answer_type``, ``question_type``. No answers means ``answers == []``.
    """
    root = image_root_of(path, image_root)
    samples = []
    ids = UniqueIds(path, "question_id")
    for index, where, raw in read_jsonl(path):
        record = Record(raw, path, where)
        ids.add(record.first(("question_id", "id"), "id", index), where)
        samples.append(VQASample(
            question_id=record.first(("question_id", "id"), "id", index),
            image=join(root, record.get("image", "str")),
            question=record.get("question", "str"),
            answers=_record_answers(record),
            image_id=record.get("image_id", "id", None),
            answer_type=record.get("answer_type", "str", None),
            question_type=record.get("question_type", "str", None)))
    warn_if_first_image_missing(samples, path)
    return samples


def _record_answers(record: Record) -> list[str]:
    if record.has("answers"):
        return list(record.get("answers", "str_list"))
    answer = record.get("answer", "str", None)
    return [answer] if answer is not None else []


