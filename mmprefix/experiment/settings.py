"""A run's settings, typed and checked before anything is loaded: the one layering scheme of the recipes and of
``eval/evaluate.py``.

Settings come in layers, each overriding the one before: the dataclasses' defaults, a YAML file, command-line
flags, then ``key=value`` overrides (dotted keys, e.g. ``train.learning_rate=3e-3``). YAML is read with YAML
1.2's booleans and numbers (PyYAML's YAML 1.1 reads ``3e-3`` as text and ``no`` as false). An override's value is
parsed for the field it sets: text fields take the text as written (``"prefix.init_text=describe: a circle"``),
the others a YAML scalar or a flow-style ``[...]`` / ``{...}``. Each layer is checked against the dataclasses as it
comes: an unknown key or a value of the wrong type is one `SettingsError` line naming the source, the key and what
is valid; the merged settings then run the dataclasses' own checks. This module imports nothing heavy: ``--help``
and every one of these errors answer before torch loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin

import yaml

from .. import typed
from ..config import PrefixConfig
from ..training.config import TrainConfig, TrainingError, TrainingInterrupted, TrainSettings
from .loading import QUANTIZATIONS, LoadError

METHODS = ("prefix", "prompt", "lora", "full")
ON_BAD_IMAGE = ("error", "skip")


class SettingsError(ValueError):
    """Settings that cannot run: the message (one line) names the source, the key and what is valid."""


# -- YAML 1.2 ----------------------------------------------------------------------------------------------------


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans (true/false only) and numbers (``3e-3``, ``1.0e+5``)."""


_REPLACED = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    """YAML 1.2 scalars and collections from ``text``; a syntax error is one line naming ``source``."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SettingsError(f"{source} is not valid YAML{where}: {problem}") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file holding a mapping of settings (empty: no settings)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"cannot read config file {path}: {err}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path} must hold a mapping of settings (key: value lines), not a {type(data).__name__}")
    return data


# -- layers --------------------------------------------------------------------------------------------------------


class _Patch(dict):
    """Keys set one by one inside a mapping setting (``eval.generation.num_beams=5``): merged into the mapping
    of the layers below instead of replacing it, as ``eval.generation={num_beams: 5}`` does."""


def _is_mapping(hint: Any) -> bool:
    return hint is dict or get_origin(hint) is dict


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    members = typed.union_members(hint) or (hint,)
    found = [m for m in members if dataclasses.is_dataclass(m)]
    return found[0] if found else None


def check_layer(cls: type, data: Any, source: str, path: str = "") -> dict[str, Any]:
    """One layer of settings (possibly partial) checked against ``cls``: every key must be a field and every
    value must fit its type; sections are checked recursively. Returns the layer with values converted."""
    if not isinstance(data, Mapping):
        raise SettingsError(f"{typed.location(source, path)} must be a mapping of settings, got {data!r}")
    fields = typed.hints(cls)
    checked = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise SettingsError(str(typed.unknown_key(str(key), list(fields), source, dotted)))
        section = _dataclass_in(fields[key])
        try:
            if section is not None and value is not None:
                checked[key] = check_layer(section, value, source, dotted)
            else:
                checked[key] = typed.check(value, fields[key], source, dotted)
                if isinstance(value, _Patch):
                    checked[key] = _Patch(checked[key])
        except typed.FieldError as err:
            raise SettingsError(str(err)) from None
    return checked


def _merge(base: dict[str, Any], layer: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """``layer`` over ``base``: sections merge key by key, any other value replaces the one before."""
    fields = typed.hints(cls)
    merged = dict(base)
    for key, value in layer.items():
        section = _dataclass_in(fields[key])
        if section is not None and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value, section)
        elif isinstance(value, _Patch) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _field_at(cls: type, dotted: str, source: str) -> Any:
    """The type of the field a dotted key sets (inside a mapping field: ``Any``)."""
    hint: Any = cls
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        section = _dataclass_in(hint)
        if section is None:
            if _is_mapping(hint):
                return Any  # a key inside a free mapping, e.g. eval.generation.max_new_tokens
            raise SettingsError(f"{source}: {'.'.join(parts[:index])} is a value, not a section: cannot set {dotted}")
        fields = typed.hints(section)
        if part not in fields:
            raise SettingsError(str(typed.unknown_key(part, list(fields), source, ".".join(parts[: index + 1]))))
        hint = fields[part]
    return hint


def _parse_value(text: str, hint: Any, source: str) -> Any:
    """An override's value for a field of type ``hint``: text as written for text fields, else YAML."""
    members = typed.union_members(hint) or (hint,)
    takes_collection = any(get_origin(m) in (list, dict) for m in members)
    if str in members and text not in ("null", "~") and not (takes_collection and text.lstrip()[:1] in ("[", "{")):
        return text
    value = parse_yaml(text, source)
    if hint is Any and isinstance(value, (dict, list)) and not text.lstrip().startswith(("{", "[")):
        return text  # "a: b" is a prompt, not a mapping
    return value


def override_layer(cls: type, overrides: Sequence[str], source: str = "command line") -> dict[str, Any]:
    """``key=value`` overrides as one layer (a nested mapping), each value parsed for its field."""
    layer: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"{source}: {item!r} is not key=value (e.g. train.learning_rate=3e-3)")
        key = key.strip().replace("-", "_")
        value = _parse_value(text, _field_at(cls, key, source), f"{source}: {key}={text}")
        node = layer
        *parents, last = key.split(".")
        for depth, part in enumerate(parents):
            inside_mapping = _is_mapping(_field_at(cls, ".".join(parents[: depth + 1]), source))
            node = node.setdefault(part, _Patch() if inside_mapping else {})
        node[last] = value
    return layer


def layered(cls: type, layers: Sequence[tuple[str, Mapping[str, Any]]]) -> Any:
    """A ``cls`` from layers ``(source, mapping)``, later ones winning; each layer is checked on its own (errors
    name its source), then the merged settings run ``cls``'s own checks."""
    merged: dict[str, Any] = {}
    for source, layer in layers:
        merged = _merge(merged, check_layer(cls, layer, source), cls)
    try:
        return typed.build(cls, merged, "settings")
    except typed.FieldError as err:
        raise SettingsError(str(err)) from None


def set_in(layer: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key in a nested mapping (a layer under construction)."""
    *parents, last = dotted.split(".")
    for part in parents:
        layer = layer.setdefault(part, {})
    layer[last] = value


def unset_variables(text: str) -> list[str]:
    """The ``$NAME`` / ``${NAME}`` in ``text`` that the environment does not set."""
    names = re.findall(r"\$(?:\{(\w+)\}|(\w+))", text)
    return [a or b for a, b in names if (a or b) not in os.environ]


def check_path_variables(value: Any, path: str, source: str) -> None:
    """Every environment variable a path (or a mapping of paths) names must be set; else one line naming it."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_path_variables(item, f"{path}.{key}", source)
    elif isinstance(value, str):
        missing = unset_variables(value)
        if missing:
            raise SettingsError(f"{typed.location(source, path)} uses ${missing[0]}, which is not set: "
                                f"export {missing[0]}=/path/to/the/data (the config's comments say what it holds)")


# -- the recipes' settings -----------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split of the data: ``path`` (a file or folder, ``world:NAME``, may hold ``~`` and ``$VARIABLES``), the
    reader ``format`` and its ``options``, and ``limit`` (the first N samples only)."""

    path: str
    format: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class DataSettings:
    """A recipe's ``data:`` section."""

    train: Split | None = None
    val: Split | None = None
    test: Split | None = None
    on_bad_image: str = "error"  # "skip": a training row whose image cannot be read is replaced by the next one
    class_names: str | None = None  # classification: a JSON object from label to class name

    def __post_init__(self) -> None:
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"data.on_bad_image must be 'error' or 'skip', got {self.on_bad_image!r}")

    def splits(self) -> dict[str, Split]:
        return {name: split for name in ("train", "val", "test") if (split := getattr(self, name)) is not None}


@dataclass
class EvalSettings:
    """A recipe's ``eval:`` section: how the validation and test splits are scored."""

    batch_size: int = 16
    generation: dict[str, Any] = field(default_factory=dict)  # generate() arguments, and a VQA "prompt"
    meteor: bool = True
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # classification prompts
    examples: int = 12  # samples shown in report.html

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.examples < 0:
            raise ValueError("eval.batch_size must be >= 1 and eval.examples >= 0")


@dataclass
class PrefixOptions(PrefixConfig):
    """The ``prefix:`` section: `PrefixConfig` fields, and the learning rate this method trains with."""

    learning_rate: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method != "prefix":
            raise ValueError("prefix.method must stay 'prefix' (choose a soft prompt with method: prompt)")

    def config(self) -> PrefixConfig:
        """The prefix's `PrefixConfig`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(PrefixConfig)}
        return PrefixConfig(**values)


@dataclass
class PromptOptions(PrefixOptions):
    """The ``prompt:`` section: a soft prompt's `PrefixConfig` fields and learning rate."""

    method: str = "prompt"

    def __post_init__(self) -> None:
        PrefixConfig.__post_init__(self)
        if self.method != "prompt":
            raise ValueError("prompt.method must stay 'prompt'")


@dataclass
class FullOptions:
    """The ``full:`` section: full fine-tuning takes only its learning rate."""

    learning_rate: float | None = None


@dataclass
class RecipeSettings:
    """Everything a recipe run reads. ``output_dir`` may hold ``{method}`` (the shipped configs write each
    method into its own folder); the method's section (``prefix:``, ``prompt:``, ``lora:``, ``full:``) may set
    the learning rate that method trains with, unless ``train.learning_rate`` is given on the command line."""

    model: str
    method: str = "prefix"
    quantize: str | None = None  # "int8" or "int4": the frozen base's linear weights, through torchao
    output_dir: str = "out/{method}"
    prefix: PrefixOptions = field(default_factory=PrefixOptions)
    prompt: PromptOptions = field(default_factory=PromptOptions)
    lora: dict[str, Any] = field(default_factory=dict)  # peft.LoraConfig fields, and learning_rate
    full: FullOptions = field(default_factory=FullOptions)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or unset, got {self.quantize!r}")
        if self.quantize is not None and self.train.fsdp:  # found out here, before a model is loaded
            raise ValueError(f"quantize={self.quantize!r} and train.fsdp=true do not combine: FSDP cannot split "
                             "quantized weights; choose one")
        self.output_dir = self.output_dir.replace("{method}", self.method)

    def method_options(self) -> Any:
        """What `mmprefix.experiment.methods.prepare` takes for this method: a `PrefixConfig`, LoRA options."""
        if self.method in ("prefix", "prompt"):
            return getattr(self, self.method).config()
        if self.method == "lora":
            return {k: v for k, v in self.lora.items() if k != "learning_rate"}
        return {}

    def train_config(self) -> TrainConfig:
        """The training engine's config: the ``train:`` section and the output folder."""
        return TrainConfig(output_dir=self.output_dir, **dataclasses.asdict(self.train))

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run, for ``--resume`` to compare: the model, the method and its options,
        the training data and the training settings (not how often it logs, evaluates or saves)."""
        method = self.method_options()
        return {"model": self.model, "method": self.method, "quantize": self.quantize,
                "options": dataclasses.asdict(method) if dataclasses.is_dataclass(method) else method,
                "train_data": dataclasses.asdict(self.data.train) if self.data.train else None}


FLAGS = {  # recipe flag -> (dotted key, argparse keywords)
    "--output-dir": ("output_dir", dict(metavar="DIR", help="where the run writes everything (default: the config's "
                                        "output_dir, e.g. out/vqa/{method})")),
    "--method": ("method", dict(choices=METHODS, help="what to train: a prefix (default), a soft prompt, LoRA or "
                                "every weight (full fine-tuning), for comparison")),
    "--max-steps": ("train.max_steps", dict(type=int, metavar="N", help="optimizer steps to train")),
    "--save-every": ("train.save_every", dict(type=int, metavar="N", help="write a resumable checkpoint every N "
                                              "steps (0: only when SIGTERM/SIGINT stops the run)")),
    "--resume": ("train.resume", dict(action="store_const", const=True, help="continue from the latest good "
                                      "checkpoint in the output folder; refused when the settings differ")),
    "--resume-with-changes": ("train.resume_with_changes", dict(action="store_const", const=True, help="resume "
                              "although settings differ from the checkpoint's (they are listed)")),
    "--seed": ("train.seed", dict(type=int, metavar="N", help="random seed of the run (data order, initialisation)")),
    "--mixed-precision": ("train.mixed_precision", dict(choices=["no", "fp16", "bf16"],
                                                        help="train the frozen model in bf16 or fp16 (default: no)")),
}


def recipe_parser(description: str | None, default_config: Path) -> argparse.ArgumentParser:
    """The command line every recipe shares; ``description`` is the recipe's docstring (examples kept as lines)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Settings are layered: the YAML config, then these flags, then key=value "
                                            "overrides. Errors name the key and list the valid ones.")
    parser.add_argument("--config", type=Path, default=default_config, metavar="YAML",
                        help="the run's settings (default: %(default)s)")
    for flag, (_, options) in FLAGS.items():
        parser.add_argument(flag, default=None, **options)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="any setting by its dotted key, e.g. train.learning_rate=3e-3 prefix.num_virtual_tokens=8")
    return parser


def recipe_settings(argv: Sequence[str] | None, task: str, default_config: Path,
                    description: str | None = None) -> RecipeSettings:
    """A recipe's settings from its command line: the YAML config, the flags, the overrides; checked in full
    (keys, types, method options, unset data variables) before anything is loaded."""
    parser = recipe_parser(description, default_config)
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    flags: dict[str, Any] = {}
    for flag, (key, _) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            set_in(flags, key, value)
    if flags.get("train", {}).get("resume_with_changes"):
        set_in(flags, "train.resume", True)
    overrides = override_layer(RecipeSettings, args.overrides)
    settings = layered(RecipeSettings, [(str(args.config), read_yaml(args.config)), ("command line", flags),
                                        ("command line", overrides)])
    # the method's own learning rate, unless the command line sets train.learning_rate
    rate = (settings.lora.get("learning_rate") if settings.method == "lora"
            else getattr(settings, settings.method).learning_rate)
    explicit = "learning_rate" in overrides.get("train", {})
    if rate is not None and not explicit:
        try:
            settings.train.learning_rate = typed.check(rate, float, "settings", f"{settings.method}.learning_rate")
        except typed.FieldError as err:
            raise SettingsError(str(err)) from None
    _check_lora(settings.lora)
    for name, split in settings.data.splits().items():
        if task == "classification" and (split.format or split.options):
            raise SettingsError(f"settings: data.{name}: classification reads {{image, label}} JSONL or a folder per "
                                "class and takes no format or options")
        check_path_variables(split.path, f"data.{name}.path", "settings")
        check_path_variables(split.options, f"data.{name}.options", "settings")
    if settings.data.class_names:
        check_path_variables(settings.data.class_names, "data.class_names", "settings")
    return settings


def _check_lora(options: Mapping[str, Any]) -> None:
    """The ``lora:`` section names only LoraConfig fields (checked by name; LoraConfig checks the values)."""
    if not options:
        return
    from peft import LoraConfig  # only when there is a lora section; this imports torch

    valid = [f.name for f in dataclasses.fields(LoraConfig) if f.init] + ["learning_rate"]
    for key in options:
        if key not in valid:
            raise SettingsError(str(typed.unknown_key(key, valid, "settings", f"lora.{key}")))


def prefix_recipe(settings: RecipeSettings, script: str, splits: Sequence[str] = ("train", "test")) -> RecipeSettings:
    """The settings of a recipe that trains a prefix and nothing else (``recipes/instruct.py``, ``align.py``):
    the method must be ``prefix`` and the ``splits`` it reads must be set."""
    missing = [f"data.{name}" for name in splits if getattr(settings.data, name) is None]
    if settings.method != "prefix" or missing:
        raise SettingsError(f"{script} trains a prefix: method must be prefix (got {settings.method!r})"
                            + (f" and {', '.join(missing)} must be set" if missing else ""))
    return settings


# -- eval/evaluate.py's settings ------------------------------------------------------------------------------------


@dataclass
class EvaluationSettings:
    """Everything ``eval/evaluate.py`` reads: what to evaluate (``task``, ``model``, ``data``, each
    ``prefix`` run as ``NAME=DIR`` and the ``base`` model), how, and where the results go."""

    task: str
    model: str
    data: str
    output_dir: str
    format: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    prefix: list[str] | dict[str, str] = field(default_factory=list)
    base: bool = True
    batch_size: int = 16
    num_beams: int = 1
    max_new_tokens: int | None = None
    on_bad_image: str = "skip"
    meteor: bool = True
    spice: bool = False
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    examples: int = 12
    progress: bool = True

    def __post_init__(self) -> None:
        from ..evaluation import TASKS  # imports torch: after --help, before any model or data

        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {self.on_bad_image!r}")
        if isinstance(self.prefix, dict):
            self.prefix = [f"{name}={folder}" for name, folder in self.prefix.items()]
        if (self.limit is not None and self.limit < 1) or self.batch_size < 1 or self.num_beams < 1:
            raise ValueError("limit, batch_size and num_beams must be >= 1")


REQUIRED_FOR_EVALUATION = ("task", "model", "data", "output_dir")


def evaluation_settings(config: str | None, flags: Mapping[str, Any], overrides: Sequence[str]) -> EvaluationSettings:
    """``eval/evaluate.py``'s settings: defaults < the YAML ``config`` (keys as the flags', ``-`` or ``_``) <
    the flags given < ``key=value`` overrides; the same layering and checks as the recipes'."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config:
        layers.append((config, {str(k).replace("-", "_"): v for k, v in read_yaml(config).items()}))
    layers += [("command line", flags), ("command line", override_layer(EvaluationSettings, overrides))]
    given = {key for _, layer in layers for key, value in layer.items() if value is not None}
    missing = [f"--{key.replace('_', '-')}" for key in REQUIRED_FOR_EVALUATION if key not in given]
    if missing:
        raise SettingsError(f"missing {', '.join(missing)} (as flags or in --config)")
    return layered(EvaluationSettings, layers)


# -- the end of a command -----------------------------------------------------------------------------------------


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None, name: str = "recipe") -> int:
    """Run a command's ``main``: settings, loading and data problems end with one readable line and status 2; a
    run stopped by SIGTERM/SIGINT (after saving a checkpoint) with 128 + the signal number."""
    try:
        main(argv)
    except TrainingInterrupted as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 128 + err.signal_number
    except (SettingsError, LoadError, FileNotFoundError, TrainingError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if not isinstance(err, _data_errors()):
            raise  # a bug, not bad input: the traceback is what helps
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _data_errors() -> tuple[type, ...]:
    """Errors of bad data or files, whose messages name the file and what to fix (loaded once needed)."""
    from ..data import AnnotationError, BadImageError, NoReadableImages
    from ..training.checkpoints import CheckpointMismatch, DamagedCheckpoint

    return AnnotationError, BadImageError, NoReadableImages, DamagedCheckpoint, CheckpointMismatch
