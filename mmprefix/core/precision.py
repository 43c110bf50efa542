"""Half precision where a tower overflows it: `keep_in_float32`.

float16 holds values up to 65504; the activations of large vision towers exceed it (LAVIS issue #409: NaN losses
with BLIP-2's EVA ViT in float16). bfloat16 has float32's range and does not overflow: prefer it where the
hardware has it. For float16, `keep_in_float32` runs the towers that overflow in float32, weights and compute,
while the rest of the model stays in float16; a prefix in such a tower is applied in float32 too.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .architectures import tower_layout, unwrap
from .devices import execution_device


def keep_in_float32(model: nn.Module, towers: Sequence[str] = ("vision",)) -> None:
    """Run these towers of ``model`` (a model or its `PrefixModel`) in float32: their weights become float32,
    they compute outside autocast on float32 inputs, and their outputs go back to the dtype their weights had
    (what the next module expects)."""
    base = unwrap(model)
    found = tower_layout(base)
    layout = [(prefix, tower) for prefix, tower in (found.towers if found else ()) if prefix]
    for tower in towers:
        prefix = next((p for p, t in layout if t == tower), None)
        if prefix is None:
            raise ValueError(f"{type(base).__name__} has no {tower!r} tower of its own to keep in float32 "
                             f"(it has {sorted({t for _, t in layout})})")
        _run_in_float32(base.get_submodule(prefix.rstrip(".")))


def _run_in_float32(module: nn.Module) -> None:
    if getattr(module, "_mmprefix_float32", False):
        return
    dtype = next(module.parameters()).dtype
    device_type = (execution_device(module) or torch.device("cpu")).type
    module.float()
    forward = module.forward

    @functools.wraps(forward)
    def float32_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, enabled=False):
            output = forward(*_cast(args, torch.float32), **_cast(kwargs, torch.float32))
        return _cast(output, dtype)

    module.forward = float32_forward
    module._mmprefix_float32 = True


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors in ``value`` (nested in tuples, lists, dicts and model outputs) cast to ``dtype``."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        out = copy.copy(value)
        for key, item in value.items():
            out[key] = _cast(item, dtype)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(item, dtype) for item in value)
    return value
