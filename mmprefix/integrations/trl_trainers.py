"""TRL's trainers with a `PrefixModel` (saving and loading are Trainer's: see `hf_trainer`).

* The fused LM head: TRL replaces the forward of the model it trains by one that, asked for
  ``fused_lm_head=True``, runs the model's ``base_model`` (for a transformers model, the backbone) and projects
  only the scored positions. For a PEFT model it patches the transformers model inside (``get_base_model()``);
  for a prefix model it now does the same with the wrapped model, whose ``base_model`` is the backbone. The prefix
  model's own forward routes the prefixes and then calls that fused forward.
* DPO's reference: for a PEFT model with no ``ref_model`` TRL computes the reference with the adapter disabled;
  for any other model it loads a second copy. A prefix model with no ``ref_model`` gets `ReferenceModel`, the
  same model with its prefixes disabled: no second copy of the base exists.
"""

from __future__ import annotations

import functools
import inspect
import sys
from types import ModuleType
from typing import Any

from torch import nn

from ..core import routing
from ..core.model import PrefixModel
from . import wrap_method


class ReferenceModel(nn.Module):
    """A `PrefixModel` with its prefixes disabled: exactly its base model, sharing its weights (no copy)."""

    def __init__(self, model: PrefixModel) -> None:
        super().__init__()
        self.base_model = model.base_model  # registered: the reference's weights (state_dict, hashes) are these
        self._policy = (model,)  # not a submodule: the reference owns no prefix

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self._policy[0]
        with policy.disable_prefix():
            return policy(*args, **kwargs)


def patch(name: str, module: ModuleType) -> None:
    """``trl.trainer.utils``: the fused LM head goes on the wrapped model; ``trl.trainer.dpo_trainer``: the
    reference model."""
    if name == "trl.trainer.dpo_trainer":
        wrap_method(module.DPOTrainer, "__init__", _dpo_init)
        return
    original = module.add_fused_lm_head
    if getattr(original, "__mmprefix__", False):
        return
    fused = _fused_head(original)
    # trainer modules imported before this patch hold the original under their own name
    for loaded in [m for name, m in sys.modules.items() if name.startswith("trl.")]:
        if getattr(loaded, "add_fused_lm_head", None) is original:
            loaded.add_fused_lm_head = fused
    module.add_fused_lm_head = fused


def _fused_head(original: Any) -> Any:
    @functools.wraps(original)
    def add_fused_lm_head(model: nn.Module, *args: Any, **kwargs: Any) -> None:
        if isinstance(model, ReferenceModel):
            return None  # it runs its policy's base model, whose forward is fused already
        if isinstance(model, PrefixModel):
            model = model.base_model
        return original(model, *args, **kwargs)

    add_fused_lm_head.__mmprefix__ = True
    return add_fused_lm_head


def _dpo_init(original: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    model = bound.arguments.get("model")
    if isinstance(model, PrefixModel):
        check_trainable(model)
        if bound.arguments.get("ref_model") is None:
            if getattr(bound.arguments.get("args"), "sync_ref_model", False):
                raise ValueError("sync_ref_model=True moves a reference model of its own towards the policy; a prefix "
                                 "model's reference is its base model with the prefix disabled (shared weights, no "
                                 "copy): leave sync_ref_model off")
            bound.arguments["ref_model"] = ReferenceModel(model)
    original(*bound.args, **bound.kwargs)


def check_trainable(model: PrefixModel) -> None:
    """DPO trains the active prefix against the model without it: a prefix must be active, not disabled, and
    trainable, or the policy would be its own reference and nothing would train."""
    if routing.current(model).disabled:
        raise ValueError("the model is inside disable_prefix(): DPO would train the base model against itself; "
                         "build the DPOTrainer outside that block")
    if model.active_prefix is None:
        raise ValueError("the model's active prefix is None (set_prefix(None)): DPO would train the base model "
                         f"against itself; choose the prefix to train with set_prefix(name) (it has {sorted(model.prefixes)})")
    if not any(p.requires_grad for p in model.prefixes[model.active_prefix].parameters()):
        raise ValueError(f"the active prefix {model.active_prefix!r} has no trainable parameters (requires_grad is "
                         "off): DPO would train nothing; turn it on with requires_grad_(True)")
