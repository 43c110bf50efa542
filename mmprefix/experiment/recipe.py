"""What the recipes share, so that each recipe reads top to bottom in one sitting: reading the data its settings
name, a dataset of samples whose images load (or are replaced) as rows are drawn, scoring and reporting. The
settings themselves (YAML, flags, overrides) are `mmprefix.experiment.settings`."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from torch import nn

from .. import evaluation
from ..data import ImageLoader, NoReadableImages, read_samples
from ..data.classification import read_classification
from ..evaluation.contrastive import classify
from ..evaluation.report import write_report
from ..core.model import PrefixModel, load_prefix
from ..training import distributed, lock
from ..models import loading
from ..models.methods import for_generation
from .settings import DataSettings, EvalSection, RecipeSettings

def is_main_process() -> bool:
    """Whether this is the process that evaluates and reports. Asked before training starts, so it must set
    up the process group as the training engine does: on a machine without GPU, accelerate joins launched
    processes only when told to use the CPU (asked otherwise, every process runs alone and all of them write
    the same files)."""
    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SampleDataset(torch.utils.data.Dataset):
    """Samples with their images loaded when drawn. With ``on_bad_image="skip"`` a row whose image cannot be read
    is replaced by the next row whose image can, so batches keep their size (and processes stay in step); the
    unreadable images are marked in a shared table, so that DataLoader workers' finds are counted too
    (`summary`). A dataset whose every image is unreadable is a ``ValueError``."""

    def __init__(self, samples: list, on_bad_image: str = "error") -> None:
        self.samples = samples
        self.images = ImageLoader(on_bad_image=on_bad_image)
        self.unreadable = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        for offset in range(len(self.samples)):
            row = (index + offset) % len(self.samples)
            if self.unreadable[row]:
                continue
            sample = self.samples[row]
            if _image_of(sample) is None:
                return sample, None
            image = self.images.load(_image_of(sample))
            if image is not None:
                return sample, image
            self.unreadable[row] = True
        skipped = self.images.skipped[-1] if self.images.skipped else None
        raise NoReadableImages(len(self.samples), skipped.path if skipped else str(_image_of(self.samples[0])),
                               skipped.reason if skipped else "unreadable")

    def summary(self) -> str | None:
        """One line on the unreadable images that training skipped, or None."""
        rows = self.unreadable.nonzero().flatten().tolist()
        if not rows:
            return None
        examples = ", ".join(str(_image_of(self.samples[row])) for row in rows[:3])
        return (f"{len(rows)} of {len(self.samples)} training images could not be read and were skipped "
                f"(e.g. {examples})")


def _image_of(sample: Any) -> Any:
    """A sample's image: the ``image`` field, or the first item of a classification ``(image, label)`` pair."""
    return sample[0] if isinstance(sample, tuple) else getattr(sample, "image", None)


def load_splits(task: str, data: DataSettings) -> dict[str, list]:
    """Samples of each split in ``data`` (``train``, ``val``, ``test``); paths may be ``world:NAME`` (the synthetic
    world) and hold ``~`` or ``$VARIABLES``. Classification samples are ``(image path, label)`` pairs from a
    ``{image, label}`` JSONL file or a folder per class."""
    splits = {}
    for split, spec in data.splits().items():
        path = loading.data_path(spec.path)
        if not Path(path).exists():
            raise loading.LoadError(f"the {split} data {spec.path!r} ({path}) does not exist; "
                                    f"download it or fix data.{split}.path")
        options = {k: _expand(v) for k, v in spec.options.items()}
        if task == "classification":  # settings refused a format or options for it
            samples, _ = read_classification(path)
        else:
            samples = read_samples(task, path, format=spec.format, **options)
        if not samples:  # else training ends in the sampler and scoring in a division by zero, with other words
            raise loading.LoadError(f"the {split} data {spec.path!r} ({path}) holds no samples; fix data.{split}.path")
        splits[split] = samples[: spec.limit] if spec.limit else samples
    return splits


def name_classes(splits: dict[str, list], names_file: str | None = None) -> tuple[dict[str, list], list[str]]:
    """Classification splits with each label replaced by the name its prompts use, and the sorted names.
    ``names_file``: a JSON object from label to name (e.g. ImageNet's folder ids to class names); without
    it the labels are the names."""
    labels = sorted({label for samples in splits.values() for _, label in samples})
    names = {label: label for label in labels}
    if names_file:
        path = loading.data_path(names_file)
        if not Path(path).is_file():
            raise loading.LoadError(f"the class names file {names_file!r} ({path}) does not exist")
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
        missing = [label for label in labels if label not in mapping]
        if missing:
            raise loading.LoadError(f"{path} names no class for labels {missing[:5]} ({len(missing)} in all)")
        names = {label: str(mapping[label]) for label in labels}
    named = {split: [(image, names[label]) for image, label in samples] for split, samples in splits.items()}
    return named, sorted(set(names.values()))


def fresh_start(settings: RecipeSettings) -> Path:
    """The output folder, claimed for this run before anything is written into it (another run on it is refused
    with its process id); without ``--resume`` a previous run's predictions there are removed, since the
    evaluation would otherwise continue them (with another model's answers)."""
    out = Path(settings.output_dir)
    if is_main_process():
        lock.claim(out)
    if not settings.train.resume:
        for stale in ("zero-shot", "tuned"):
            (out / stale / "predictions.jsonl").unlink(missing_ok=True)
    return out


def _expand(value: Any) -> Any:
    """``~`` and ``$VARIABLES`` in reader options that are paths (e.g. ``image_root: $COCO``)."""
    return os.path.expandvars(os.path.expanduser(value)) if isinstance(value, str) else value


def training_answer(sample: Any) -> str:
    """The answer a VQA sample is trained on: the most common of its reference answers."""
    return Counter(sample.answers).most_common(1)[0][0]


def evaluated(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The model to evaluate after training and the prefix to route it to (PEFT models generate through the
    model they adapted in place; full fine-tuning is the model itself)."""
    if isinstance(model, PrefixModel):
        return model, model.active_prefix
    return for_generation(model), None


def tuned_model(model: nn.Module, settings: RecipeSettings, task: str, saved: str | os.PathLike) -> nn.Module:
    """The trained model for the main process to score: ``model`` itself, or for a base sharded by FSDP (whose
    every forward needs all processes) the ``saved`` prefix on the base loaded again, whole, in this process."""
    if not distributed.is_sharded(model):
        return model
    base, _ = loading.load_model(settings.model, task, settings.quantize)
    return load_prefix(base, saved)


def score_on_test(task: str, model: nn.Module, processor: Any, samples: list, output_dir: Path,
                  evaluate: EvalSection, run: str, classnames: list[str] | None = None) -> dict[str, Any]:
    """One run (``"zero-shot"`` or ``"tuned"``) of ``model`` on the test split: predictions in the official
    format and scores, under ``output_dir/<run>/``."""
    scored, prefix = evaluated(model)
    return evaluation.evaluate_runs(task, scored, processor, samples, {run: prefix}, output_dir,
                                    batch_size=evaluate.batch_size, generation=evaluate.generation,
                                    meteor=evaluate.meteor, templates=evaluate.templates,
                                    classnames=classnames)[run]


def validation(task: str, processor: Any, samples: list, evaluate: EvalSection,
               classnames: list[str] | None = None) -> Any:
    """The ``evaluate`` hook of :func:`mmprefix.training.train`: the validation split scored with the
    model being trained (METEOR left out: its JVM start would dominate frequent evaluations)."""

    def validate(trained: nn.Module) -> dict[str, float]:
        scored, prefix = evaluated(trained)
        if task == "classification":
            return classify(scored, processor, samples, classnames, evaluate.templates, prefix=prefix,
                            batch_size=evaluate.batch_size)
        predictions, _ = evaluation.predict(task, scored, processor, samples, prefix=prefix, progress=False,
                                            batch_size=evaluate.batch_size, generation=evaluate.generation)
        return evaluation.score(task, predictions, samples, meteor=False)

    return validate


def report(output_dir: Path, task: str, settings: RecipeSettings, *, samples: list, results: dict[str, dict],
           trained: dict[str, Any], dataset: SampleDataset, trainable: int, total: int,
           seconds: float) -> dict[str, Any]:
    """``metrics.json`` (``zero_shot`` and ``tuned`` maps), the evaluation reports, and a summary printed for
    the person who ran the recipe."""
    summary = {
        "zero_shot": results["zero-shot"]["metrics"],
        "tuned": results["tuned"]["metrics"],
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100 * trainable / total,
        "training_seconds": seconds,
    }
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    about = {"model": settings.model, "method": settings.method, "run": str(output_dir),
             "trainable parameters": f"{trainable:,} of {total:,} ({summary['trainable_percent']:.3f}%)",
             "training": f"{trained['step']} steps in {seconds:.0f} s"}
    paths = write_report(output_dir, task, samples, results, examples=settings.eval.examples, about=about,
                         curves=output_dir / "curves.png")
    primary = evaluation.PRIMARY_METRIC[task]
    skipped = dataset.summary()
    if skipped:
        print(skipped)
    print(f"\ntrainable parameters: {trainable:,} of {total:,} ({summary['trainable_percent']:.3f}%)")
    print(f"{primary}: zero-shot {summary['zero_shot'].get(primary, float('nan')):.2f} -> tuned "
          f"{summary['tuned'].get(primary, float('nan')):.2f}  (training {seconds:.0f} s)")
    print(f"outputs in {output_dir}: {Path(trained['saved']).name}/ (the trained {settings.method}), checkpoints/, "
          f"log.jsonl, curves.png, metrics.json, {Path(paths['html']).name}, <run>/results.json (official format)")
    return summary


def training_caption(sample: Any) -> str:
    """The caption an image is trained on this time: one of its references, drawn at random (seeded)."""
    return random.choice(sample.captions)
