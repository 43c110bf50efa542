"""transformers' Trainer and TRL's trainers, taught about prefix models.

Both libraries know PEFT models by name: which forward arguments to keep, what to save, how to resume, which
module is the backbone, how to get a reference model for DPO. A `PrefixModel` gets the same treatment with
nothing in the user's code beyond ``add_prefix``: when mmprefix is imported, `install` arranges for a few
methods of those libraries to be wrapped the moment their modules are imported (at once, if they already are). Each wrapped method checks whether its trainer holds a `PrefixModel`, and behaves exactly as before when it
does not. What changes for a prefix model: `hf_trainer` (saving, loading, resuming, the best checkpoint, labels)
and `trl_trainers` (the fused LM head, DPO's reference model).

Neither library is imported here: a process that never imports them pays nothing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import sys
import threading
from types import ModuleType
from collections.abc import Callable
from typing import Any

# module of transformers or TRL -> the mmprefix module whose ``patch(module)`` adapts it
PATCHES = {
    "transformers.trainer": "hf_trainer",
    "trl.trainer.utils": "trl_trainers",
    "trl.trainer.dpo_trainer": "trl_trainers",
}

_lock = threading.Lock()
_installed = False
_searching: set[str] = set()


def install() -> None:
    """Adapt the modules of `PATCHES` that are imported already, and each of the others when it is imported."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        sys.meta_path.insert(0, _AfterImport())
    for name in PATCHES:
        module = sys.modules.get(name)
        if module is not None:
            _patch(name, module)


def _patch(name: str, module: ModuleType) -> None:
    importlib.import_module(f"{__name__}.{PATCHES[name]}").patch(name, module)


def wrap_method(cls: type, name: str, replacement: Callable[..., Any]) -> None:
    """Make ``cls.name`` call ``replacement(original, self, *args, **kwargs)``, once (a second call leaves it)."""
    original = cls.__dict__[name]
    if getattr(original, "__mmprefix__", False):
        return

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return replacement(original, self, *args, **kwargs)

    method.__mmprefix__ = True
    setattr(cls, name, method)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of `PATCHES` as the other finders would, and has each patched right after it runs."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in PATCHES or name in _searching:
            return None
        _searching.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            _searching.discard(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, name)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, with the patch applied after the module has executed."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self.loader, self.name = loader, name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _patch(self.name, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.loader, name)
