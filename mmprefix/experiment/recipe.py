"""What the recipes share, so that each recipe reads top to bottom in one sitting: the command line, YAML
configs with overrides, and a dataset of samples whose images load (or are skipped) as rows are drawn."""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import PartialState
from torch import nn

from .. import evaluation
from ..data import ImageLoader, read_samples
from ..data.classification import read_classification
from ..evaluation.contrastive import classify
from ..evaluation.report import write_report
from ..model import PrefixModel, load_prefix
from ..training import distributed
from . import loading
from .methods import METHODS, for_generation

FLAGS = {  # command-line flag -> dotted config key
    "output_dir": "output_dir",
    "max_steps": "train.max_steps",
    "save_every": "train.save_every",
    "resume": "train.resume",
    "seed": "train.seed",
    "mixed_precision": "train.mixed_precision",
    "method": "method",
}


def parse_args(argv: list[str] | None, default_config: Path, description: str) -> dict[str, Any]:
    """The run's configuration: the YAML file, then the flags, then ``key=value`` overrides (dotted keys,
    values parsed as YAML scalars or flow-style ``[...]``/``{...}``: ``train.learning_rate=3e-3
    prefix.targets=[text]``; any other text, e.g. ``"prefix.init_text=describe: a red circle"``, stays text)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=default_config, help="YAML config (default: %(default)s)")
    parser.add_argument("--output-dir", dest="output_dir")
    parser.add_argument("--max-steps", dest="max_steps", type=int)
    parser.add_argument("--save-every", dest="save_every", type=int)
    parser.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--mixed-precision", dest="mixed_precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. train.batch_size=8")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if not args.config.is_file():
        parser.error(f"config file {args.config} does not exist")
    config = yaml.safe_load(args.config.read_text()) or {}
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            set_key(config, key, value)
    for override in args.overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            parser.error(f"override {override!r} is not key=value")
        set_key(config, key, _override_value(value))
    # A method's own section may set its learning rate (full fine-tuning wants a far smaller one than a
    # prefix); an explicit train.learning_rate override still wins.
    section = config.get(config.get("method", "prefix")) or {}
    if "learning_rate" in section:
        rate = section.pop("learning_rate")
        if not any(o.partition("=")[0] == "train.learning_rate" for o in args.overrides):
            set_key(config, "train.learning_rate", rate)
    return config


def _override_value(text: str) -> Any:
    """A scalar, or a flow-style list or mapping; plain text with ': ' in it (a prompt) stays text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and not text.lstrip().startswith(("{", "[")):
        return text
    return value


def run(main: Any, argv: list[str] | None = None) -> int:
    """Run a recipe's ``main``; a missing checkpoint or data file ends with one readable line and status 2."""
    try:
        main(argv)
    except (loading.LoadError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def set_key(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted!r}: {part!r} is not a section of the config")
    node[last] = value


def method_options(config: dict[str, Any]) -> dict[str, Any]:
    """The options of the configured method (its own section: ``prefix:``, ``prompt:``, ``lora:``)."""
    return copy.deepcopy(config.get(config.get("method", "prefix"), None) or {})


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
    """Samples with their images loaded when drawn; with ``on_bad_image="skip"`` unreadable images drop their
    rows from the batch (the collate function sees only good rows) and are counted in ``images.skipped``."""

    def __init__(self, samples: list, on_bad_image: str = "error") -> None:
        self.samples = samples
        self.images = ImageLoader(on_bad_image=on_bad_image)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        sample = self.samples[index]
        image = _image_of(sample)
        return sample, (self.images.load(image) if image is not None else None)


def _image_of(sample: Any) -> Any:
    """A sample's image: the ``image`` field, or the first item of a classification ``(image, label)`` pair."""
    return sample[0] if isinstance(sample, tuple) else getattr(sample, "image", None)


def good_rows(rows: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Rows whose image loaded (or that have none)."""
    return [(sample, image) for sample, image in rows if image is not None or _image_of(sample) is None]


def load_splits(task: str, data: dict[str, Any]) -> dict[str, list]:
    """Samples of each split in ``data`` (``train``, ``val``, ``test``: ``{path, format, options, limit}``);
    paths may be ``world:NAME`` (the synthetic world) and hold ``~`` or ``$VARIABLES``. Classification
    samples are ``(image path, label)`` pairs from a ``{image, label}`` JSONL file or a folder per class."""
    splits = {}
    for split in ("train", "val", "test"):
        spec = data.get(split)
        if not spec:
            continue
        path = loading.data_path(spec["path"])
        if not Path(path).exists():
            raise loading.LoadError(f"the {split} data {spec['path']!r} ({path}) does not exist; "
                                    f"download it or fix data.{split}.path")
        options = {k: _expand(v) for k, v in (spec.get("options") or {}).items()}
        if task == "classification":
            if spec.get("format") or spec.get("options"):
                raise ValueError(f"data.{split}: classification reads {{image, label}} JSONL or a folder per "
                                 "class and takes no format or options")
            samples, _ = read_classification(path)
        else:
            samples = read_samples(task, path, format=spec.get("format"), **options)
        splits[split] = samples[: spec["limit"]] if spec.get("limit") else samples
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
            raise ValueError(f"{path} names no class for labels {missing[:5]} ({len(missing)} in all)")
        names = {label: str(mapping[label]) for label in labels}
    named = {split: [(image, names[label]) for image, label in samples] for split, samples in splits.items()}
    return named, sorted(set(names.values()))


def fresh_start(config: dict[str, Any]) -> Path:
    """The output folder; without ``--resume`` a previous run's predictions there are removed, since the
    evaluation would otherwise continue them (with another model's answers)."""
    out = Path(config["output_dir"])
    if not config["train"].get("resume"):
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


def tuned_model(model: nn.Module, config: dict[str, Any], task: str) -> nn.Module:
    """The trained model for the main process to score: ``model`` itself, or for a base sharded by FSDP (whose
    every forward needs all processes) the saved prefix on the base loaded again, whole, in this process."""
    if not distributed.is_sharded(model):
        return model
    base, _ = loading.load_model(config["model"], task, config.get("quantize"))
    return load_prefix(base, Path(config["output_dir"]) / "prefix")


def score_on_test(task: str, model: nn.Module, processor: Any, samples: list, output_dir: Path,
                  evaluate: dict[str, Any], run: str, classnames: list[str] | None = None) -> dict[str, Any]:
    """One run (``"zero-shot"`` or ``"tuned"``) of ``model`` on the test split: predictions in the official
    format and scores, under ``output_dir/<run>/``."""
    scored, prefix = evaluated(model)
    return evaluation.evaluate_runs(task, scored, processor, samples, {run: prefix}, output_dir,
                                    classnames=classnames, **evaluate)[run]


def validation(task: str, processor: Any, samples: list, evaluate: dict[str, Any],
               classnames: list[str] | None = None) -> Any:
    """The ``evaluate`` hook of :func:`mmprefix.training.train`: the validation split scored with the
    model being trained (METEOR left out: its JVM start would dominate frequent evaluations)."""

    def validate(trained: nn.Module) -> dict[str, float]:
        scored, prefix = evaluated(trained)
        if task == "classification":
            return classify(scored, processor, samples, classnames, evaluate["templates"], prefix=prefix,
                                       batch_size=evaluate["batch_size"])
        predictions, _ = evaluation.predict(task, scored, processor, samples, prefix=prefix, progress=False,
                                            batch_size=evaluate["batch_size"], generation=evaluate.get("generation"))
        return evaluation.score(task, predictions, samples, meteor=False)

    return validate


def report(output_dir: Path, task: str, samples: list, results: dict[str, dict], trainable: int, total: int,
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
    paths = write_report(output_dir, task, samples, results)
    primary = evaluation.PRIMARY_METRIC[task]
    print(f"\ntrainable parameters: {trainable:,} of {total:,} ({summary['trainable_percent']:.3f}%)")
    print(f"{primary}: zero-shot {summary['zero_shot'].get(primary, float('nan')):.2f} -> tuned "
          f"{summary['tuned'].get(primary, float('nan')):.2f}  (training {seconds:.0f} s)")
    print(f"outputs in {output_dir}: prefix/, checkpoints/, log.jsonl, curves.png, metrics.json, "
          f"{Path(paths['html']).name}, <run>/results.json (official format)")
    return summary


def training_caption(sample: Any) -> str:
    """The caption an image is trained on this time: one of its references, drawn at random (seeded)."""
    return random.choice(sample.captions)
