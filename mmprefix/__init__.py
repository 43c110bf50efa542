"""mmprefix: prefix tuning for frozen vision-language models."""

from .architectures import Site
from .compose import compose
from .config import PrefixConfig
from .model import PrefixModel, add_prefix, load_prefix

__all__ = ["PrefixConfig", "PrefixModel", "Site", "add_prefix", "compose", "load_prefix"]
__version__ = "0.1.0"
