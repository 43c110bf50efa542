"""Where a module computes. accelerate's big-model hooks (``device_map``, ``cpu_offload``, ``disk_offload``) move
weights to an execution device as each module runs, and keep offloaded weights on the "meta" device in between:
a module runs on its hook's execution device, else where its weights are."""

from __future__ import annotations

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device | None:
    """The device ``module`` computes on: the execution device of accelerate's hook on it or on its first hooked
    sub-module, else the device of its first parameter that holds data; None when neither says (a module
    without weights: the default device)."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for part in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
            device = getattr(part, "execution_device", None)
            if device is not None:
                return torch.device(device)
    return next((p.device for p in module.parameters() if p.device.type != "meta"), None)


def placed_by_hooks(model: nn.Module) -> bool:
    """Whether accelerate's hooks place ``model``'s weights (dispatched or offloaded): moving it whole with
    ``.to()`` would fail on its "meta" weights or undo its device map."""
    return any(hasattr(module, "_hf_hook") for module in model.modules())
