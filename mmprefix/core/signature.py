"""``PrefixModel.forward`` as callers that read signatures see it: the wrapped model's parameters plus ``prefix``.
transformers' Trainer keeps the dataset columns that signature names (with ``(*args, prefix, **kwargs)`` it kept
none), as it does for a PEFT model."""

from __future__ import annotations

import inspect
from typing import Any

from .routing import ACTIVE


class Forward:
    """``PrefixModel.forward`` (a descriptor): on the class, the function; on a model, a callable that runs it
    and that ``inspect.signature`` reads as the wrapped model's parameters plus ``prefix``. transformers'
    Trainer keeps the dataset columns that signature names: with ``(*args, prefix, **kwargs)`` it kept none."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        return self.function if model is None else BoundForward(self.function, model)


class BoundForward:
    __slots__ = ("function", "model")

    def __init__(self, function: Any, model: Any) -> None:
        self.function, self.model = function, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        base = inspect.signature(self.model.base_model.forward)
        parameters = list(base.parameters.values())
        if "prefix" in base.parameters:
            return base
        at = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
        prefix = inspect.Parameter("prefix", inspect.Parameter.KEYWORD_ONLY, default=ACTIVE)
        return base.replace(parameters=[*parameters[:at], prefix, *parameters[at:]])

    def __repr__(self) -> str:
        return f"<bound method PrefixModel.forward of {type(self.model.base_model).__name__}>"
