"""Predictions, official scores and result files for any generative model, with or without prefixes.

* :func:`predict` generates answers, captions or text continuations in batches (``evaluation/decode.py``: the
  same formatting as training), routes every batch to one prefix, appends each finished batch to a JSONL file
  so that a killed run resumes where it stopped, and reports unreadable images instead of failing.
* :func:`score` computes the benchmarks' official metrics with ``evaluation/metrics.py``;
  :func:`official_results` gives the predictions in the official result formats.
* :func:`evaluate_runs` does all of that for several runs (prefixes on one frozen model, and the base model),
  and scores classification and retrieval runs through ``evaluation/contrastive.py``.

Units: accuracies, exact match and recalls are percentages; BLEU, METEOR, ROUGE-L and CIDEr are in [0, 1], as
the official scorers return them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..data import CaptionSample, ImageLoader, NoReadableImages, TextSample, VQASample
from ..core.files import write_json
from ..core.routing import ACTIVE
from . import decode, metrics
from .batching import chunks, needs_same_length, prefix_label, routed, same_length_batches
from .contrastive import classify, retrieve

logger = logging.getLogger(__name__)

GENERATIVE_TASKS = ("vqa", "caption", "text")


TASKS = (*GENERATIVE_TASKS, "classification", "retrieval")


PRIMARY_METRIC = {"vqa": "vqa_accuracy", "caption": "CIDEr", "text": "Bleu_4", "classification": "top1",
                  "retrieval": "i2t_R@1"}
"""The metric each task's tables lead with (VQA data with single answers, such as GQA, leads with exact_match)."""


_NO_TYPE = "\0untyped"  # stands for a missing answer or question type; never reported


_ID_FIELDS = {"vqa": ("question_id", "VQASample"), "caption": ("image_id", "CaptionSample"), "text": ("id", "TextSample")}


class ResumeError(ValueError):
    """A predictions file that cannot be continued: written with other settings, or malformed."""


def sample_id(task: str, sample: Any) -> Any:
    """The id a prediction is keyed by: VQA ``question_id``, caption ``image_id``, text ``id``."""
    _check_task(task, GENERATIVE_TASKS)
    field, record = _ID_FIELDS[task]
    try:
        return getattr(sample, field)
    except AttributeError:
        raise TypeError(f"{task} samples are {record} records (with {field}), got {type(sample).__name__}") from None


def _check_task(task: str, allowed: Sequence[str] = TASKS) -> None:
    if task not in allowed:
        raise ValueError(f"unknown task {task!r}; tasks are {list(allowed)}")


def _batches(task: str, model: Any, processor: Any, samples: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Generation batches; batched by token length where padding would change answers (`needs_same_length`)."""
    if needs_same_length(task, model):
        tokenizer = getattr(processor, "tokenizer", processor)
        lengths = [len(tokenizer(s.question)["input_ids"]) for s in samples]
        return same_length_batches(samples, lengths, size)
    return list(chunks(samples, size))


def _unique(task: str, samples: Sequence[Any]) -> list[Any]:
    """The samples with each id once (the first wins): predictions are keyed by id."""
    seen, out = set(), []
    for sample in samples:
        key = sample_id(task, sample)
        if key not in seen:
            seen.add(key)
            out.append(sample)
    if len(out) < len(samples):
        logger.warning("%d samples repeat an earlier id and are evaluated once", len(samples) - len(out))
    return out


def _read_predictions(path: Path, meta: dict) -> dict[Any, str]:
    """Predictions already in ``path``; an unfinished last line (a killed write) is cut off the file.

    The first line records the task, prefix and decoding settings; a file written with other ones is refused,
    so that a resumed run never mixes two settings."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        logger.warning("%s: dropping an unfinished last line (interrupted write)", path)
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    done: dict[Any, str] = {}
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ResumeError(f"{path}, line {number}: not JSON ({err})") from None
        if "meta" in row:
            if row["meta"] != meta:
                raise ResumeError(f"{path} holds predictions made with {row['meta']}, not {meta}; "
                                 "use another output folder or delete the file")
        elif "id" in row and "prediction" in row:
            done[row["id"]] = row["prediction"]
        else:
            raise ResumeError(f"{path}, line {number}: expected {{'id', 'prediction'}}, got {sorted(row)}")
    return done


class _Appender:
    """Appends predictions to a JSONL file, one flushed write per batch (no-op without a path)."""

    def __init__(self, path: Path | None, meta: dict) -> None:
        self.handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not path.exists() or path.stat().st_size == 0
            self.handle = open(path, "a", encoding="utf-8")
            if fresh:
                self._write([{"meta": meta}])

    def add(self, predictions: Mapping[Any, str]) -> None:
        if self.handle is not None:
            self._write([{"id": key, "prediction": text} for key, text in predictions.items()])

    def _write(self, rows: list[dict]) -> None:
        self.handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _generation_settings(generation: Mapping[str, Any] | None) -> dict[str, Any]:
    """Decoding settings for ``generate``: always deterministic (no sampling)."""
    settings = dict(generation or {})
    if settings.get("do_sample"):
        raise ValueError("evaluation decodes deterministically: do_sample must be False")
    settings["do_sample"] = False
    return settings


def _load_images(samples: Sequence[Any], loader: ImageLoader) -> tuple[list, list, list[dict]]:
    """(readable samples, their RGB images, one error row per unreadable image)."""
    kept, images, errors = [], [], []
    for sample in samples:
        image = loader.load(sample.image)
        if image is None:
            skipped = loader.skipped[-1]
            errors.append({"id": _id_of(sample), "image": skipped.path, "reason": skipped.reason})
        else:
            kept.append(sample)
            images.append(image)
    return kept, images, errors


def _id_of(sample: Any) -> Any:
    for field in ("question_id", "image_id", "id"):
        if hasattr(sample, field):
            return getattr(sample, field)
    return None


def _generate(task: str, model: Any, processor: Any, samples: Sequence[Any], images: list, settings: dict) -> list[str]:
    if task == "vqa":
        return decode.answer_questions(model, processor, images, [s.question for s in samples], **settings)
    if task == "caption":
        return decode.caption_images(model, processor, images, **settings)
    tokenizer = getattr(processor, "tokenizer", processor)
    return decode.complete_texts(model, tokenizer, [s.prompt for s in samples], **settings)


def predict(
    task: str,
    model: Any,
    processor: Any,
    samples: Sequence[VQASample | CaptionSample | TextSample],
    *,
    prefix: Any = ACTIVE,
    batch_size: int = 16,
    generation: Mapping[str, Any] | None = None,
    predictions_path: str | os.PathLike | None = None,
    on_bad_image: str = "skip",
    progress: bool = True,
    description: str | None = None,
) -> tuple[dict[Any, str], list[dict]]:
    """Generate one prediction per sample, in batches, with deterministic decoding.

    Args:
        task: ``"vqa"`` (answers keyed by ``question_id``), ``"caption"`` (by ``image_id``) or ``"text"`` (by
            ``id``: the continuation of ``prompt``).
        model, processor: a model of a family ``data/formatting.py`` formats for (BLIP, BLIP-2/InstructBLIP, causal
            LM), possibly a :class:`PrefixModel`; its processor (for ``"text"``: a tokenizer).
        samples: records from ``mmprefix.data.read_samples``; a repeated id is predicted once.
        prefix: with a PrefixModel, every batch is routed to this prefix name (``None``: the base model);
            ``ACTIVE`` leaves the active prefix.
        batch_size: samples per ``generate`` call.
        generation: ``generate`` settings such as ``num_beams`` and ``max_new_tokens`` (the defaults of
            ``evaluation/decode.py`` otherwise); sampling is refused.
        predictions_path: a JSONL file. Ids already in it are not predicted again, and each batch's predictions
            are appended (flushed) as soon as it finishes, so that a killed run resumes where it stopped.
        on_bad_image: ``"skip"``: an unreadable image becomes an error row and its sample gets no prediction;
            ``"error"``: raise :class:`mmprefix.data.BadImageError`.
        progress: show a tqdm progress bar (``description`` labels it).

    Returns:
        ``(predictions, errors)``: ``{id: text}`` in sample order for every sample with a prediction (resumed ones
        included), and one ``{"id", "image", "reason"}`` row per sample whose image could not be read.
    """
    _check_task(task, GENERATIVE_TASKS)
    settings = _generation_settings(generation)
    samples = _unique(task, samples)
    meta = {"task": task, "prefix": prefix_label(model, prefix), "generation": settings}
    path = Path(predictions_path) if predictions_path is not None else None
    done = _read_predictions(path, meta) if path is not None else {}
    todo = [s for s in samples if sample_id(task, s) not in done]
    loader = ImageLoader(on_bad_image=on_bad_image)
    errors: list[dict] = []
    appender = _Appender(path, meta)
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=description or task, disable=not progress)
    try:
        with routed(model, prefix):
            for chunk in _batches(task, model, processor, todo, batch_size):
                batch, images = chunk, []
                if task != "text":
                    batch, images, bad = _load_images(chunk, loader)
                    errors += bad
                if batch:
                    outputs = _generate(task, model, processor, batch, images, settings)
                    new = {sample_id(task, s): text for s, text in zip(batch, outputs)}
                    appender.add(new)
                    done.update(new)
                bar.update(len(chunk))
    finally:
        bar.close()
        appender.close()
    if todo and not done and len(errors) == len(todo):  # skipping every image would score nothing
        raise NoReadableImages(len(todo), str(errors[0]["image"]), str(errors[0]["reason"]))
    ordered = {sample_id(task, s): done[sample_id(task, s)] for s in samples if sample_id(task, s) in done}
    return ordered, errors


def score(
    task: str,
    predictions: Mapping[Any, str],
    samples: Sequence[VQASample | CaptionSample | TextSample],
    *,
    meteor: bool = True,
    spice: bool = False,
) -> dict[str, float]:
    """Official metrics of ``predictions`` (``{id: text}``) against the samples' references.

    Only samples with a prediction and references are scored (unreadable images and unannotated test
    questions are left out; the counts are in :func:`evaluate_runs`' results).

    * ``"vqa"``: samples with several answers (VQAv2, OK-VQA) get the official VQA accuracy
      (``metrics.vqa_corpus_accuracy``, percent): ``vqa_accuracy``, ``vqa_accuracy/<answer type>`` and
      ``vqa_accuracy_by_question/<question type>``. Samples with one answer (GQA) get ``exact_match`` (percent):
      the official VQA accuracy of a single-answer question is always 0, so it is not computed for them.
    * ``"caption"``: ``metrics.caption_metrics``: ``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``
      (and ``SPICE`` with ``spice=True`` when it can run offline; otherwise it is left out with a log line).
      ``meteor=False`` skips METEOR (its JVM start costs seconds).
    * ``"text"``: ``Bleu_1``..``Bleu_4`` (``metrics.bleu``) and ``exact_match`` (percent,
      ``metrics.exact_match``: case, spacing and surrounding punctuation forgiven).
    """
    return _score(task, predictions, samples, meteor=meteor, spice=spice)[0]


def _score(task: str, predictions: Mapping[Any, str], samples: Sequence[Any], *, meteor: bool,
           spice: bool) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, {metric: why it is unavailable})."""
    _check_task(task, GENERATIVE_TASKS)
    if task == "vqa":
        return _vqa_scores(predictions, samples), {}
    if task == "caption":
        return _caption_scores(predictions, samples, meteor=meteor, spice=spice)
    return _text_scores(predictions, samples), {}


def _percent(values: Sequence[float]) -> float:
    return round(100 * sum(values) / len(values), 2)


def _vqa_scores(predictions: Mapping[Any, str], samples: Sequence[VQASample]) -> dict[str, float]:
    scored = [s for s in samples if s.question_id in predictions]
    several = [s for s in scored if len(s.answers) > 1]
    single = [s for s in scored if len(s.answers) == 1]
    out: dict[str, float] = {}
    if several:
        annotations = {s.question_id: {"answers": s.answers, "answer_type": s.answer_type or _NO_TYPE,
                                       "question_type": s.question_type or _NO_TYPE} for s in several}
        result = metrics.vqa_corpus_accuracy(predictions, annotations)
        out["vqa_accuracy"] = result["overall"]
        out.update({f"vqa_accuracy/{k}": v for k, v in result["perAnswerType"].items() if k != _NO_TYPE})
        out.update({f"vqa_accuracy_by_question/{k}": v for k, v in result["perQuestionType"].items() if k != _NO_TYPE})
    if single:
        out["exact_match"] = _percent([metrics.exact_match(predictions[s.question_id], s.answers[0]) for s in single])
    return out


def _caption_scores(predictions: Mapping[Any, str], samples: Sequence[CaptionSample], *, meteor: bool,
                    spice: bool) -> tuple[dict[str, float], dict[str, str]]:
    references = {s.image_id: s.captions for s in samples if s.captions and s.image_id in predictions}
    if not references:
        return {}, {}
    mine = {key: predictions[key] for key in references}
    result = metrics.caption_metrics(mine, references, spice=spice and meteor, meteor=meteor)
    unavailable = result.pop("unavailable", {})
    if not meteor:
        unavailable["METEOR"] = "skipped (meteor=False)"
    for name, reason in unavailable.items():
        logger.warning("%s unavailable: %s", name, reason)
    return {k: float(v) for k, v in result.items()}, unavailable


def _text_scores(predictions: Mapping[Any, str], samples: Sequence[TextSample]) -> dict[str, float]:
    scored = [s for s in samples if s.id in predictions and s.target]
    if not scored:
        return {}
    texts = [predictions[s.id] for s in scored]
    out = metrics.bleu(texts, [s.target for s in scored])
    out["exact_match"] = _percent([metrics.exact_match(t, s.target) for t, s in zip(texts, scored)])
    return out


def official_results(task: str, predictions: Mapping[Any, str]) -> list[dict]:
    """Predictions in the official result format: VQA ``[{question_id, answer}]``, COCO captions
    ``[{image_id, caption}]``, text ``[{id, text}]``."""
    _check_task(task, GENERATIVE_TASKS)
    key, value = {"vqa": ("question_id", "answer"), "caption": ("image_id", "caption"), "text": ("id", "text")}[task]
    return [{key: k, value: v} for k, v in predictions.items()]


def evaluate_runs(
    task: str,
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    runs: Mapping[str, str | None],
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    generation: Mapping[str, Any] | None = None,
    on_bad_image: str = "skip",
    meteor: bool = True,
    spice: bool = False,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] = ("a photo of a {}.",),
    progress: bool = True,
) -> dict[str, dict]:
    """Evaluate several runs of one model: each run label names a prefix (``None``: the base model).

    Generative tasks (``"vqa"``, ``"caption"``, ``"text"``) write ``<output_dir>/<label>/predictions.jsonl``
    (resumable, see :func:`predict`) and ``<label>/results.json`` in the official format; every task writes
    ``<label>/metrics.json``. ``"classification"`` takes ``(image, label)`` samples and ``classnames`` (see
    :func:`classify`); ``"retrieval"`` takes caption samples (see :func:`retrieve`).

    Returns:
        ``{label: {"metrics": {...}, "predictions": {id: text}, "errors": [bad rows], "unavailable":
        {metric: reason}, "num_samples": int}}``, in the order of ``runs``.
    """
    _check_task(task)
    if not runs:
        raise ValueError("evaluate_runs needs at least one run")
    folders = [_safe_label(label) for label in runs]
    if len(set(folders)) < len(folders):
        raise ValueError(f"run labels {list(runs)} would share output folders {folders}")
    output = Path(output_dir)
    results = {}
    for label, prefix in runs.items():
        folder = output / _safe_label(label)
        folder.mkdir(parents=True, exist_ok=True)
        if task in GENERATIVE_TASKS:
            predictions, errors = predict(task, model, processor, samples, prefix=prefix, batch_size=batch_size,
                                          generation=generation, predictions_path=folder / "predictions.jsonl",
                                          on_bad_image=on_bad_image, progress=progress, description=label)
            scores, unavailable = _score(task, predictions, samples, meteor=meteor, spice=spice)
            write_json(folder / "results.json", official_results(task, predictions))
        else:
            predictions, errors, unavailable = {}, [], {}
            if task == "classification":
                if classnames is None:
                    raise ValueError("classification needs classnames")
                scores = classify(model, processor, samples, classnames, templates, prefix=prefix,
                                  batch_size=batch_size, on_bad_image=on_bad_image, errors=errors)
            else:
                scores = retrieve(model, processor, samples, prefix=prefix, batch_size=batch_size,
                                  on_bad_image=on_bad_image, errors=errors)
        write_json(folder / "metrics.json", {"prefix": prefix, "metrics": scores, "errors": errors,
                                              "unavailable": unavailable})
        results[label] = {"metrics": scores, "predictions": predictions, "errors": errors,
                          "unavailable": unavailable, "num_samples": len(samples)}
    return results


def _safe_label(label: str) -> str:
    """A run label as a folder name."""
    safe = "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in str(label)).strip(".")
    if not safe:
        raise ValueError(f"run label {label!r} cannot name a folder")
    return safe
