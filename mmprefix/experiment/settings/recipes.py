"""The recipes' settings: the schema of a recipe run (model, method and its options, data, training,
evaluation), its command-line flags, and reading them."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...core import typed
from ...core.config import PrefixConfig
from ...training.config import TrainConfig, TrainSettings
from ...models.loading import QUANTIZATIONS
from .layers import check_path_variables, layered, override_layer, set_in
from .yamlfile import SettingsError, read_yaml

METHODS = ("prefix", "prompt", "memory", "lora", "adapter", "full")
ON_BAD_IMAGE = ("error", "skip")
# generate() settings of eval.generation that are whole numbers, and their least values (the rest go to generate)
GENERATION_INTEGERS = {"max_new_tokens": 1, "min_new_tokens": 0, "num_beams": 1, "max_length": 1, "min_length": 0,
                       "no_repeat_ngram_size": 0}



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
class EvalSection:
    """A recipe's ``eval:`` section: how the validation and test splits are scored."""

    batch_size: int = 16
    generation: dict[str, Any] = field(default_factory=dict)  # generate() arguments, and a VQA "prompt"
    meteor: bool = True
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # classification prompts
    examples: int = 12  # samples shown in report.html

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.examples < 0:
            raise ValueError("eval.batch_size must be >= 1 and eval.examples >= 0")
        for key, least in GENERATION_INTEGERS.items():
            value = self.generation.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ValueError(f"eval.generation.{key} must be an integer >= {least}, got {value!r}")


@dataclass
class PrefixOptions(PrefixConfig):
    """The ``prefix:`` section: `PrefixConfig` fields, and the learning rate this method trains with."""

    learning_rate: float | None = None
    section: ClassVar[str] = "prefix"  # the section, and the PrefixConfig method it configures

    def __post_init__(self) -> None:
        super().__post_init__()
        section = type(self).section
        if self.method != section:
            raise ValueError(f"{section}.method must stay {section!r} (choose another method with method: ...)")
        _check_trainable(self)

    def config(self) -> PrefixConfig:
        """The prefix's `PrefixConfig`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(PrefixConfig)}
        return PrefixConfig(**values)


@dataclass
class PromptOptions(PrefixOptions):
    """The ``prompt:`` section: a soft prompt's `PrefixConfig` fields and learning rate."""

    method: str = "prompt"
    section: ClassVar[str] = "prompt"


@dataclass
class MemoryOptions(PrefixOptions):
    """The ``memory:`` section: a decoupled prefix's `PrefixConfig` fields (``method="memory"``) and learning rate."""

    method: str = "memory"
    section: ClassVar[str] = "memory"


@dataclass
class AdapterOptions:
    """The ``adapter:`` section: the bottleneck width of the adapters (`mmprefix.models.adapters`) and the learning
    rate."""

    width: int = 16
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"adapter.width must be >= 1, got {self.width}")
        _check_rate(self.learning_rate)


def _check_trainable(options: PrefixOptions) -> None:
    """What a run trains with: at least one virtual token (0 is the base model unchanged) and a rate above 0."""
    if options.num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1 to train, got {options.num_virtual_tokens}")
    _check_rate(options.learning_rate)


def _check_rate(rate: float | None) -> None:
    if rate is not None and not rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {rate}")


@dataclass
class FullOptions:
    """The ``full:`` section: full fine-tuning takes only its learning rate."""

    learning_rate: float | None = None

    def __post_init__(self) -> None:
        _check_rate(self.learning_rate)


@dataclass
class RecipeSettings:
    """Everything a recipe run reads. ``output_dir`` may hold ``{method}`` (the shipped configs write each
    method into its own folder); the method's section (``prefix:``, ``prompt:``, ``memory:``, ``lora:``,
    ``adapter:``, ``full:``) may set the learning rate that method trains with, unless ``train.learning_rate`` is
    given on the command line."""

    model: str
    method: str = "prefix"
    quantize: str | None = None  # "int8" or "int4": the frozen base's linear weights, through torchao
    output_dir: str = "out/{method}"
    prefix: PrefixOptions = field(default_factory=PrefixOptions)
    prompt: PromptOptions = field(default_factory=PromptOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    lora: dict[str, Any] = field(default_factory=dict)  # peft.LoraConfig fields, and learning_rate
    adapter: AdapterOptions = field(default_factory=AdapterOptions)
    full: FullOptions = field(default_factory=FullOptions)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or unset, got {self.quantize!r}")
        if self.quantize is not None and self.train.fsdp:  # found out here, before a model is loaded
            raise ValueError(f"quantize={self.quantize!r} and train.fsdp=true do not combine: FSDP cannot split "
                             "quantized weights; choose one")
        if not self.output_dir.strip():
            raise ValueError("output_dir is empty: name the folder the run writes into")
        self.output_dir = self.output_dir.replace("{method}", self.method)

    def method_options(self) -> Any:
        """What `mmprefix.models.methods.prepare` takes for this method: a `PrefixConfig`, LoRA options."""
        if self.method in ("prefix", "prompt", "memory"):
            return getattr(self, self.method).config()
        if self.method == "lora":
            return {k: v for k, v in self.lora.items() if k != "learning_rate"}
        if self.method == "adapter":
            return {"width": self.adapter.width}
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
    "--method": ("method", dict(choices=METHODS, help="what to train: a prefix (default), a soft prompt, a memory "
                                "prefix (decoupled from the softmax), LoRA, bottleneck adapters or every weight "
                                "(full fine-tuning), for comparison")),
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
    try:  # checked like the other sections' rates, which their dataclasses check
        _check_rate(typed.check(settings.lora.get("learning_rate"), float | None, "settings", "lora.learning_rate"))
    except typed.FieldError as err:
        raise SettingsError(str(err)) from None
    except ValueError as err:
        raise SettingsError(f"settings: lora.{err}") from None
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
