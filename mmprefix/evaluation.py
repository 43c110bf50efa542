"""Evaluation: predictions, official scores and result files for any model, with or without prefixes.

The pieces, each usable on its own (the recipes and ``eval/evaluate.py`` use them all):

* :func:`predict` generates answers, captions or text continuations in batches through ``mmprefix.tasks``
  (the same formatting as training), routes every batch to one prefix, appends each finished batch to a JSONL
  file so that a killed run resumes where it stopped, and reports unreadable images instead of failing.
* :func:`score` computes the benchmarks' official metrics with ``mmprefix.metrics``;
  :func:`official_results` gives the predictions in the official result formats.
* :func:`evaluate_runs` does all of that for several runs (prefixes on one frozen model, and the base model).
* :func:`classify` and :func:`retrieve`: zero-shot classification and image-text retrieval for CLIP-like models
  (transformers ``CLIPModel`` and open_clip models); :func:`read_classification` reads their data.

Units: accuracies, exact match and recalls are percentages; BLEU, METEOR, ROUGE-L and CIDEr are in [0, 1], as
the official scorers return them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import metrics, tasks
from .data import CaptionSample, ImageLoader, TextSample, VQASample
from .model import PrefixModel

__all__ = [
    "GENERATIVE_TASKS",
    "KEEP",
    "PRIMARY_METRIC",
    "ResumeError",
    "TASKS",
    "classify",
    "evaluate_runs",
    "official_results",
    "predict",
    "read_classification",
    "retrieve",
    "sample_id",
    "score",
]

logger = logging.getLogger(__name__)

GENERATIVE_TASKS = ("vqa", "caption", "text")
TASKS = (*GENERATIVE_TASKS, "classification", "retrieval")
PRIMARY_METRIC = {"vqa": "vqa_accuracy", "caption": "CIDEr", "text": "Bleu_4", "classification": "top1",
                  "retrieval": "i2t_R@1"}
"""The metric each task's tables lead with (VQA data with single answers, such as GQA, leads with exact_match)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_NO_TYPE = "\0untyped"  # stands for a missing answer or question type; never reported
_ID_FIELDS = {"vqa": ("question_id", "VQASample"), "caption": ("image_id", "CaptionSample"), "text": ("id", "TextSample")}


class ResumeError(ValueError):
    """A predictions file that cannot be continued: written with other settings, or malformed."""


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()
"""``prefix=KEEP``: leave the model's active prefix as it is (the default)."""


# -- samples and routing ---------------------------------------------------------------------------------------


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


def _routed(model: Any, prefix: Any) -> contextlib.AbstractContextManager:
    """Route every call inside to ``prefix`` on a PrefixModel; ``KEEP`` changes nothing, ``None`` on a plain
    model is the model itself."""
    if prefix is KEEP or (prefix is None and not isinstance(model, PrefixModel)):
        return contextlib.nullcontext()
    if not isinstance(model, PrefixModel):
        raise ValueError(f"prefix={prefix!r} needs a PrefixModel; {type(model).__name__} carries no prefixes")
    return model.using(prefix)


def _prefix_label(model: Any, prefix: Any) -> Any:
    if prefix is KEEP:
        return model.active_prefix if isinstance(model, PrefixModel) else None
    return prefix


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _same_length_batches(items: Sequence[Any], lengths: Sequence[int], size: int) -> list[list[Any]]:
    """Batches of at most ``size`` items that all have the same token length: no padding inside a batch."""
    groups: dict[int, list[Any]] = {}
    for item, length in zip(items, lengths):
        groups.setdefault(length, []).append(item)
    return [list(chunk) for group in groups.values() for chunk in _chunks(group, size)]


def _batches(task: str, model: Any, processor: Any, samples: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Generation batches. BLIP-VQA questions are batched by token length: transformers'
    ``BlipForQuestionAnswering.generate`` lets the answer decoder attend to the question's padding (its mask is all
    ones), so a padded question's answer would depend on the rest of its batch."""
    if task == "vqa" and tasks.family(model) == "blip":
        tokenizer = getattr(processor, "tokenizer", processor)
        lengths = [len(tokenizer(s.question)["input_ids"]) for s in samples]
        return _same_length_batches(samples, lengths, size)
    return list(_chunks(samples, size))


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


# -- the predictions file (JSONL, resumable) -------------------------------------------------------------------


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


# -- prediction ------------------------------------------------------------------------------------------------


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
        return tasks.answer_questions(model, processor, images, [s.question for s in samples], **settings)
    if task == "caption":
        return tasks.caption_images(model, processor, images, **settings)
    tokenizer = getattr(processor, "tokenizer", processor)
    return tasks.complete_texts(model, tokenizer, [s.prompt for s in samples], **settings)


def predict(
    task: str,
    model: Any,
    processor: Any,
    samples: Sequence[VQASample | CaptionSample | TextSample],
    *,
    prefix: Any = KEEP,
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
        model, processor: a model of a family ``mmprefix.tasks`` formats for (BLIP, BLIP-2/InstructBLIP, causal
            LM), possibly a :class:`PrefixModel`; its processor (for ``"text"``: a tokenizer).
        samples: records from ``mmprefix.data.read_samples``; a repeated id is predicted once.
        prefix: with a PrefixModel, every batch is routed to this prefix name (``None``: the base model);
            ``KEEP`` leaves the active prefix.
        batch_size: samples per ``generate`` call.
        generation: ``generate`` settings such as ``num_beams`` and ``max_new_tokens`` (the defaults of
            ``mmprefix.tasks`` otherwise); sampling is refused.
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
    meta = {"task": task, "prefix": _prefix_label(model, prefix), "generation": settings}
    path = Path(predictions_path) if predictions_path is not None else None
    done = _read_predictions(path, meta) if path is not None else {}
    todo = [s for s in samples if sample_id(task, s) not in done]
    loader = ImageLoader(on_bad_image=on_bad_image)
    errors: list[dict] = []
    appender = _Appender(path, meta)
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=description or task, disable=not progress)
    try:
        with _routed(model, prefix):
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
    ordered = {sample_id(task, s): done[sample_id(task, s)] for s in samples if sample_id(task, s) in done}
    return ordered, errors


# -- scores ----------------------------------------------------------------------------------------------------


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


# -- several runs ----------------------------------------------------------------------------------------------


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
            _write_json(folder / "results.json", official_results(task, predictions))
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
        _write_json(folder / "metrics.json", {"prefix": prefix, "metrics": scores, "errors": errors,
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


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# -- CLIP-like models: zero-shot classification and retrieval --------------------------------------------------


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


class _ClipEncoder:
    """Unit-length image and text embeddings from a transformers CLIP-like model (``get_image_features`` /
    ``get_text_features`` with its processor) or an open_clip model (``encode_image`` / ``encode_text``, with the
    processor ``(tokenizer, preprocess)``)."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model, self.processor = model, processor
        self.open_clip = not hasattr(model, "get_image_features")
        if self.open_clip and not (isinstance(processor, (tuple, list)) and len(processor) == 2):
            raise ValueError("an open_clip model needs processor=(tokenizer, preprocess)")
        parameter = next(iter(model.parameters()), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    @torch.no_grad()
    def images(self, images: Sequence[Any]) -> torch.Tensor:
        if self.open_clip:
            pixels = torch.stack([self.processor[1](image) for image in images]).to(self.device)
            features = self.model.encode_image(pixels)
        else:
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
            features = self.model.get_image_features(pixel_values=pixels)
        return _unit(features)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.open_clip:
            features = self.model.encode_text(self.processor[0](list(texts)).to(self.device))
        else:
            inputs = self.processor(text=list(texts), return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            features = self.model.get_text_features(**inputs)
        return _unit(features)


def _unit(features: Any) -> torch.Tensor:
    """transformers 5 returns an output object whose ``pooler_output`` holds the projected features."""
    if not torch.is_tensor(features):
        features = features.pooler_output
    return F.normalize(features.float(), dim=-1)


def _encode_texts(encoder: _ClipEncoder, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Text embeddings in the order of ``texts``. transformers processors pad per batch (a left-padding tokenizer
    would shift a text's positions with its batch), so texts are batched by token length; open_clip tokenizers
    pad to a fixed length."""
    if encoder.open_clip:
        batches = list(_chunks(list(range(len(texts))), batch_size))
    else:
        tokenizer = getattr(encoder.processor, "tokenizer", encoder.processor)
        lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
        batches = _same_length_batches(range(len(texts)), lengths, batch_size)
    features = [encoder.texts([texts[i] for i in batch]) for batch in batches]
    order = torch.tensor([i for batch in batches for i in batch])
    return torch.cat(features)[torch.argsort(order)]


def _encode_images(encoder: _ClipEncoder, sources: Sequence[Any], batch_size: int, loader: ImageLoader,
                   progress: bool, description: str) -> tuple[torch.Tensor | None, list[int], list[dict]]:
    """(embeddings of the readable images, their indices in ``sources``, error rows)."""
    features, kept, errors = [], [], []
    indices = list(range(len(sources)))
    for chunk in tqdm(list(_chunks(indices, batch_size)), desc=description, disable=not progress):
        images = []
        for index in chunk:
            image = loader.load(sources[index])
            if image is None:
                skipped = loader.skipped[-1]
                errors.append({"id": index, "image": skipped.path, "reason": skipped.reason})
            else:
                images.append(image)
                kept.append(index)
        if images:
            features.append(encoder.images(images))
    return (torch.cat(features) if features else None), kept, errors


def classify(
    model: Any,
    processor: Any,
    samples: Sequence[tuple[Any, str | int]],
    classnames: Sequence[str],
    templates: Sequence[str] = ("a photo of a {}.",),
    *,
    prefix: Any = KEEP,
    batch_size: int = 64,
    on_bad_image: str = "error",
    errors: list | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot classification accuracy (percent) of a CLIP-like model: ``{"top1", "top5"}``.

    Each class is the normalised mean of its ``templates``' unit text embeddings (CLIP's prompt ensembling);
    an image's scores are cosine similarities. ``samples`` are ``(image path or PIL image, label)`` with the
    label a class name or an index into ``classnames``. ``processor``: the transformers processor, or
    ``(tokenizer, preprocess)`` for open_clip. ``prefix`` routes both towers (see :func:`predict`).
    With ``on_bad_image="skip"`` unreadable images are left out and appended to ``errors``.
    """
    if not samples:
        raise ValueError("classify needs at least one sample")
    index = {name: i for i, name in enumerate(classnames)}
    unknown = sorted({str(label) for _, label in samples if not isinstance(label, int) and label not in index})
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in classnames")
    labels = [label if isinstance(label, int) else index[label] for _, label in samples]
    encoder = _ClipEncoder(model, processor)
    loader = ImageLoader(on_bad_image=on_bad_image)
    with _routed(model, prefix):
        prompts = tasks.class_prompts(classnames, templates)
        text = _encode_texts(encoder, prompts, batch_size).view(len(classnames), len(templates), -1)
        classes = F.normalize(text.mean(dim=1), dim=-1)
        images, kept, bad = _encode_images(encoder, [s[0] for s in samples], batch_size, loader, progress, "classify")
    if errors is not None:
        errors += bad
    if images is None:
        raise ValueError("no readable image to classify")
    accuracy = metrics.topk_accuracy(images @ classes.T, [labels[i] for i in kept], k=(1, 5))
    return {name: round(100 * value, 2) for name, value in accuracy.items()}


def retrieve(
    model: Any,
    processor: Any,
    caption_samples: Sequence[CaptionSample],
    *,
    prefix: Any = KEEP,
    batch_size: int = 64,
    on_bad_image: str = "error",
    errors: list | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Image-text retrieval recall (percent) of a CLIP-like model: ``i2t_R@1/5/10`` and ``t2i_R@1/5/10``.

    Every caption of a sample is a text whose image is that sample's image (``metrics.retrieval_recall``).
    Samples without captions are left out; with ``on_bad_image="skip"`` so are unreadable images (and their
    captions), which are appended to ``errors``.
    """
    samples = [s for s in caption_samples if s.captions]
    if not samples:
        raise ValueError("retrieve needs samples with captions")
    encoder = _ClipEncoder(model, processor)
    loader = ImageLoader(on_bad_image=on_bad_image)
    with _routed(model, prefix):
        images, kept, bad = _encode_images(encoder, [s.image for s in samples], batch_size, loader, progress,
                                           "retrieve")
        if images is None:
            raise ValueError("no readable image to retrieve")
        texts = [caption for index in kept for caption in samples[index].captions]
        owner = [row for row, index in enumerate(kept) for _ in samples[index].captions]
        text = _encode_texts(encoder, texts, batch_size)
    if errors is not None:
        errors += [dict(row, id=samples[row["id"]].image_id) for row in bad]
    recall = metrics.retrieval_recall(images @ text.T, owner)
    return {name: round(100 * value, 2) for name, value in recall.items()}
