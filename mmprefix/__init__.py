"""mmprefix: prefix tuning for frozen vision-language models.

``PrefixConfig`` loads at once; the names that need torch load on first use, so that command lines can answer
``--help`` and refuse bad settings before torch is imported."""

import importlib
import logging
from typing import Any

from .config import PrefixConfig

# transformers imports torchao whenever it is installed (its quantizer registry), and torchao's import makes torch
# log two deprecation notices addressed to torchao's authors ("<enum ...> is an Enum subclass and is now natively
# supported by torch.compile"). They would open every run; nothing else torch logs there is filtered.
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage()
)

_LAZY = {"PrefixModel": ".model", "add_prefix": ".model", "load_prefix": ".model", "compose": ".compose",
         "Site": ".architectures"}

__all__ = ["PrefixConfig", "PrefixModel", "Site", "add_prefix", "compose", "load_prefix"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # also replaces the submodule `compose`, which importing it bound to this name
    return value
