"""``mmprefix eval``'s settings (``eval/evaluate.py``): what to evaluate, on which data, with which prefixes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


from .layers import layered, override_layer
from .recipes import ON_BAD_IMAGE
from .yamlfile import SettingsError, read_yaml


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
        from ...evaluation import TASKS  # imports torch: after --help, before any model or data

        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {self.on_bad_image!r}")
        if isinstance(self.prefix, dict):
            self.prefix = [f"{name}={folder}" for name, folder in self.prefix.items()]
        if (self.limit is not None and self.limit < 1) or self.batch_size < 1 or self.num_beams < 1 or \
                (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ValueError("limit, batch_size, num_beams and max_new_tokens must be >= 1")
        if not self.output_dir.strip():
            raise ValueError("output_dir is empty: name the folder the results go to")


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


