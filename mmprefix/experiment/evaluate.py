"""Evaluate a model, with zero, one or several prefixes, on a task; write predictions, scores and a report.

examples (``mmprefix eval`` and ``python eval/evaluate.py`` are the same command):
  mmprefix eval --task vqa --model embedded:blip --data world:vqa_downstream_test \\
      --prefix counts=out/counts --prefix sizes=out/sizes --output-dir out/eval
  mmprefix eval --config eval/configs/coco_karpathy_blip.yaml --limit 500
  mmprefix eval --config eval/configs/world_vqa_embedded.yaml num_beams=3   # any setting, by its key

Tasks: vqa, caption, text (generation, scored with the official metrics), classification and retrieval
(CLIP-like models). Models: embedded:NAME[:HEAD] (the tiny backbones shipped with mmprefix), a local folder
or Hugging Face id, or open_clip:MODEL[:PRETRAINED]. Each --prefix NAME=DIR (an mmprefix or PEFT prefix
folder) is loaded onto the one frozen model and evaluated as its own run; --base (the default) adds the
model without a prefix. Settings are layered as the recipes' are: a YAML --config with the same keys as the
flags (output_dir or output-dir), then the flags, then key=value overrides; every key and type is checked
before anything is loaded.

Output: OUTPUT_DIR/<run>/predictions.jsonl (a rerun skips the ids already there),
OUTPUT_DIR/<run>/results.json (official result format), OUTPUT_DIR/results.json, results.md and report.html.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from . import settings as layering
from ..models.loading import LoadError
from .settings import EvaluationSettings, SettingsError

TASKS = "vqa, caption, text (generation), classification, retrieval"


class UsageError(Exception):
    """A problem the user can fix (bad flag, missing checkpoint, unreadable data): printed without a traceback."""


# -- settings: defaults < YAML config < flags < key=value overrides (mmprefix.experiment.settings) ---------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprefix eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)  # only flags given override the config
    parser.add_argument("--config", help="YAML file with the same keys as these flags (output_dir or output-dir)")
    parser.add_argument("--task", help=f"what to evaluate: {TASKS}")
    parser.add_argument("--model", help="embedded:NAME[:HEAD], a local folder or HF id, open_clip:MODEL[:PRETRAINED]")
    parser.add_argument("--data", help="annotation file or folder (any format of mmprefix.data.read_samples), "
                        "or world:NAME for a file of the synthetic world, e.g. world:vqa_downstream_test")
    parser.add_argument("--format", help="reader format, e.g. vqav2, gqa, karpathy, coco, jsonl (default: detected)")
    parser.add_argument("--data-option", dest="data_options", action="append", metavar="KEY=VALUE",
                        help="reader option, e.g. annotations=PATH, image_root=DIR, split=test (repeatable)")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate the first N samples only")
    parser.add_argument("--prefix", action="append", metavar="NAME=DIR", help="a prefix run (repeatable)")
    parser.add_argument("--base", action=argparse.BooleanOptionalAction, help="also evaluate the model without prefix")
    parser.add_argument("--output-dir", dest="output_dir", metavar="DIR", help="where predictions and reports go")
    parser.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", help="samples per batch (default 16)")
    parser.add_argument("--num-beams", dest="num_beams", type=int, metavar="N", help="beam search width (default 1)")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, metavar="N",
                        help="longest generated answer or caption (default: the model's)")
    parser.add_argument("--on-bad-image", dest="on_bad_image", choices=["skip", "error"],
                        help="an unreadable image is listed and skipped (default) or stops the evaluation")
    parser.add_argument("--meteor", action=argparse.BooleanOptionalAction, help="compute METEOR (a JVM start)")
    parser.add_argument("--spice", action=argparse.BooleanOptionalAction, help="try SPICE (needs its jars offline)")
    parser.add_argument("--template", dest="templates", action="append", help="classification prompt, e.g. 'a photo of a {}.'")
    parser.add_argument("--examples", type=int, metavar="N", help="examples in report.html (default 12)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, help="show progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any setting by its key, e.g. num_beams=3")
    return parser


def key_value(item: str, what: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
    return key.strip(), value.strip()


def settings_from(argv: list[str] | None) -> EvaluationSettings:
    """The settings of one evaluation, checked in full before anything is loaded."""
    flags = vars(build_parser().parse_intermixed_args(argv))
    config, overrides = flags.pop("config", None), flags.pop("overrides", [])
    if "data_options" in flags:  # KEY=VALUE strings from the command line
        flags["data_options"] = dict(key_value(item, "--data-option") for item in flags["data_options"])
    try:
        settings = layering.evaluation_settings(config, flags, overrides)
    except SettingsError as err:
        raise UsageError(str(err)) from None
    for item in settings.prefix:  # the form here; the folders before the model loads (run)
        key_value(item, "--prefix")
    return settings


# -- prefixes and runs -----------------------------------------------------------------------------------------


def prefix_runs(prefixes: list[str], base: bool) -> dict[str, str | None]:
    """``{run: prefix folder}`` from the ``NAME=DIR`` items (the base model's run ``"base"``: None), each a folder
    that exists; checked before anything loads."""
    runs: dict[str, str | None] = {"base": None} if base else {}
    for item in prefixes:
        name, folder = key_value(item, "--prefix")
        if name in runs:
            raise UsageError(f"run {name!r} is given twice (the base model's run is called 'base')")
        if not os.path.isdir(folder):
            raise UsageError(f"--prefix {item}: {folder or 'DIR'} is not a folder (a prefix folder, e.g. out/vqa/prefix)")
        runs[name] = folder
    if not runs:
        raise UsageError("nothing to evaluate: give --prefix NAME=DIR or --base")
    return runs


def add_prefixes(model: Any, runs: dict[str, str | None]) -> tuple[Any, dict[str, str | None]]:
    """Load every prefix of ``runs`` (see `prefix_runs`) onto one PrefixModel; the runs as ``evaluate_runs`` takes
    them: ``{"base": None, NAME: NAME, ...}``."""
    from ..core.model import PrefixModel

    if any(folder is not None for folder in runs.values()):
        model = model if isinstance(model, PrefixModel) else PrefixModel(model)
    for name, folder in runs.items():
        if folder is not None:
            try:
                model.load_prefix(name, folder)
            except (OSError, ValueError) as err:
                raise UsageError(f"cannot load prefix {name!r} from {folder}: {err}") from None
    return model, {name: None if folder is None else name for name, folder in runs.items()}


# -- data ------------------------------------------------------------------------------------------------------


def read_data(settings: EvaluationSettings) -> tuple[list, list[str] | None]:
    """(samples, class names for classification), limited to the first ``limit`` samples."""
    from ..data import read_samples
    from ..data.classification import read_classification
    from ..models import loading

    task, path, classnames = settings.task, loading.data_path(settings.data), None
    try:
        if task == "classification":
            samples, classnames = read_classification(path)
        else:
            reader_task = "caption" if task == "retrieval" else task
            samples = read_samples(reader_task, path, format=settings.format, **settings.data_options)
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"cannot read {task} data from {path}: {err}") from None
    if settings.limit:
        samples = samples[: settings.limit]
    if not samples:
        raise UsageError(f"no samples in {path}")
    return samples, classnames


def generation_settings(settings: EvaluationSettings) -> dict[str, int]:
    generation = {"num_beams": settings.num_beams}
    if settings.max_new_tokens:
        generation["max_new_tokens"] = settings.max_new_tokens
    return generation


# -- the command -----------------------------------------------------------------------------------------------


def run(settings: EvaluationSettings) -> dict[str, dict]:
    from .. import evaluation
    from ..data import NoReadableImages
    from ..models import loading
    from ..evaluation import report

    task, output_dir = settings.task, Path(settings.output_dir)

    # 1. the frozen model and its processor, then every prefix on it: one run per prefix (and the base model)
    runs = prefix_runs(settings.prefix, settings.base)  # a bad --prefix is refused before the model loads
    try:
        model, processor = loading.load_model(settings.model, task)
    except LoadError as err:
        raise UsageError(str(err)) from None
    model, runs = add_prefixes(model, runs)

    # 2. the samples, in any reader format
    samples, classnames = read_data(settings)
    print(f"{task}: {len(samples)} samples, runs {list(runs)}", file=sys.stderr)

    # 3. predict (resumable) and score every run
    try:
        results = evaluation.evaluate_runs(
            task, model, processor, samples, runs, output_dir,
            batch_size=settings.batch_size, generation=generation_settings(settings),
            on_bad_image=settings.on_bad_image, meteor=settings.meteor, spice=settings.spice,
            classnames=classnames, templates=settings.templates, progress=settings.progress,
        )
    except (evaluation.ResumeError, NoReadableImages) as err:
        raise UsageError(str(err)) from None

    # 4. the report: results.json, results.md, report.html
    recorded = {k: v for k, v in dataclasses.asdict(settings).items() if k != "progress"}
    about = {"model": settings.model, "data": settings.data, "runs": ", ".join(runs), "output": str(output_dir)}
    paths = report.write_report(output_dir, task, samples, results, examples=settings.examples, settings=recorded,
                                about=about)
    print(report.markdown_table(results, task))
    for label, result in results.items():
        if result["errors"]:
            print(f"{label}: {len(result['errors'])} unreadable image(s) skipped (listed in results.json)")
    print(f"\nreport: {paths['html']}\ntable: {paths['markdown']}\nscores: {paths['json']}\n"
          f"predictions: {output_dir}/<run>/predictions.jsonl, official results: {output_dir}/<run>/results.json")
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        run(settings_from(argv))
    except (UsageError, SettingsError) as err:
        print(f"mmprefix eval: error: {err}", file=sys.stderr)
        return 2
    return 0
