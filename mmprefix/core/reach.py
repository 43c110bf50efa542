"""Which attention modules of a model's vision tower feed what the model reads from it, found by a dry run.

A VLM reads its vision tower through ``get_image_features``: often at a hidden layer before the last, never
through a pooling head it keeps from its contrastive pretraining. A prefix in an attention module whose output
never reaches those features can never get a gradient. Rather than guess from names, mmprefix builds the model's
architecture again on the meta device (no memory, no compute), runs ``get_image_features`` on an image-shaped meta
tensor with hooks on every attention module, and walks the autograd graph back from the features: modules whose
outputs are not on it are left out. Where no such dry run can be made (no ``get_image_features``, inputs it cannot
shape), nothing is left out on its account and the caller is told so.
"""

from __future__ import annotations

import copy
import inspect
import threading
from typing import Any

import torch
from torch import nn

FEATURE_FIELDS = ("pooler_output", "image_embeds", "image_features")  # where a model output keeps the features
UNREAD = "the model never reads its output (a dry run of get_image_features follows no path from it)"


def unread_attention(cls: type, model: nn.Module, attention: list[str]) -> tuple[dict[str, str], str | None]:
    """Of the attention modules named ``attention``, those whose output never reaches the image features of
    ``model`` (of class ``cls``, the model's own class under any wrapper): name -> why; and why no dry run could be
    made (None when it was, or when ``model`` is no VLM)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or getattr(config, "vision_config", None) is None:
        return {}, None  # not a VLM: nothing to check
    try:
        key = (cls, config.to_json_string(use_diff=False), tuple(attention))
    except (TypeError, ValueError) as error:
        return {}, f"its config cannot be serialised ({error})"
    with _LOCK:
        if key not in _RUNS:
            if len(_RUNS) >= 32:
                _RUNS.pop(next(iter(_RUNS)))
            _RUNS[key] = _dry_run(cls, copy.deepcopy(config), attention)
        unread, why_not = _RUNS[key]
    return {name: UNREAD for name in unread}, why_not


_RUNS: dict[tuple, tuple[frozenset[str], str | None]] = {}  # (class, config, modules) -> the dry run's result
_LOCK = threading.Lock()


def _dry_run(cls: type, config: Any, attention: list[str]) -> tuple[frozenset[str], str | None]:
    try:
        with torch.device("meta"):
            twin = cls._from_config(config)
    except Exception as error:  # any architecture may fail to build on meta: then there is no dry run
        return frozenset(), f"the architecture does not build on the meta device ({type(error).__name__})"
    features = _image_features_method(twin)
    if features is None:
        return frozenset(), "it has no get_image_features"
    outputs: dict[str, torch.Tensor] = {}
    hooks = [twin.get_submodule(name).register_forward_hook(_recorder(outputs, name)) for name in attention]
    try:
        result = features(**_image_inputs(features, config.vision_config))
    except Exception as error:  # inputs it cannot shape from the config alone
        return frozenset(), f"get_image_features did not run on an image shaped from the config ({type(error).__name__})"
    finally:
        for hook in hooks:
            hook.remove()
    reached = _graph(_tensors(result))
    return frozenset(name for name, output in outputs.items() if output.grad_fn not in reached), None


def _image_features_method(twin: nn.Module) -> Any:
    for owner in (twin, getattr(twin, "model", None)):
        method = getattr(owner, "get_image_features", None)
        if callable(method):
            return method
    return None


def _recorder(outputs: dict, name: str):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        first = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(first):
            outputs[name] = first

    return hook


def _image_inputs(method: Any, vision: Any) -> dict:
    """One square image as the vision config describes it (its size and channels), and its size where the method
    asks for one (``image_sizes``)."""
    size = vision.image_size if isinstance(getattr(vision, "image_size", None), int) else vision.image_size[0]
    pixels = torch.zeros(1, getattr(vision, "num_channels", 3), size, size, device="meta", requires_grad=True)
    inputs = {"pixel_values": pixels}
    if "image_sizes" in inspect.signature(method).parameters:
        inputs["image_sizes"] = torch.tensor([[size, size]], device="meta")
    return inputs


def _tensors(result: Any) -> list[torch.Tensor]:
    """Every tensor a ``get_image_features`` result holds (a tensor, a tuple or list of them, a model output)."""
    if torch.is_tensor(result):
        return [result]
    if isinstance(result, dict):  # a model output: the features, not the tower's hidden states beside them
        chosen = next((result[k] for k in FEATURE_FIELDS if result.get(k) is not None), None)
        result = [chosen] if chosen is not None else list(result.values())
    if isinstance(result, (list, tuple)):
        return [t for item in result for t in _tensors(item)]
    return []


def _graph(roots: list[torch.Tensor]) -> set:
    """Every autograd node the roots depend on."""
    seen, stack = set(), [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen
