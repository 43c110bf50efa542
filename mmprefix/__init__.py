"""mmprefix: prefix tuning for frozen vision-language models.

``PrefixConfig`` loads at once; the names that need torch load on first use, so that command lines can answer
``--help`` and refuse bad settings before torch is imported."""

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import types
from typing import Any

from . import integrations
from .core.config import PrefixConfig

# transformers imports torchao whenever it is installed (its quantizer registry), and torchao's import makes torch
# log two deprecation notices addressed to torchao's authors ("<enum ...> is an Enum subclass and is now natively
# supported by torch.compile"). They would open every run; nothing else torch logs there is filtered.
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage()
)

_LAZY = {"PrefixModel": ".core.model", "add_prefix": ".core.model", "load_prefix": ".core.model",
         "compose": ".core.compose", "Site": ".core.architectures"}

__all__ = ["PrefixConfig", "PrefixModel", "Site", "add_prefix", "compose", "load_prefix"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


# Where modules lived before the core (mmprefix/core/) and the model helpers (mmprefix/models/) got their folders.
# An old path imports the module at its new place, as the same module object: ``mmprefix.model.PrefixModel`` is
# ``mmprefix.core.model.PrefixModel``, and a patch through either name reaches the other.
_MOVED = {**{f"{__name__}.{m}": f"{__name__}.core.{m}" for m in (
    "architectures", "attention", "coca", "compose", "conditioning", "config", "devices", "families", "files",
    "media", "model", "peft_compat", "precision", "processors", "prompt", "reach", "routing", "saving", "store",
    "targets", "text_init", "typed")},
    f"{__name__}.data.images": f"{__name__}.core.images",
    f"{__name__}.adapters": f"{__name__}.models.adapters",
    f"{__name__}.experiment.loading": f"{__name__}.models.loading",
    f"{__name__}.experiment.methods": f"{__name__}.models.methods"}


def _new_name(name: str) -> str | None:
    """The current name of a module imported by an old path (a moved package's submodules too); None if unmoved."""
    for old, new in _MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports by old paths: the module under its new name, registered under both."""

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(fullname, self) if _new_name(fullname) else None

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(_new_name(spec.name))
        self._specs[spec.name] = module.__spec__  # the import system then sets the old name's spec on it
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self._specs.pop(module.__spec__.name)


class _Package(types.ModuleType):
    """Importing the old module path ``mmprefix.compose`` binds the module to the package's ``compose``; the public
    function of that name stays what ``mmprefix.compose`` means."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
    sys.meta_path.insert(0, _OldPaths())  # before the path finder, which would load a second copy from __path__

# transformers' Trainer and TRL's trainers learn to save, load and train prefix models when their modules are
# imported (nothing is imported here; each adapted method behaves as before for any other model)
integrations.install()
