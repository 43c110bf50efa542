"""How a prefix gets into an attention module: one route per kind of module, and ``install``/``uninstall``.

``architectures.attention_route`` names a module's route; ``ROUTES`` says what the route does to the module:
``"interface"`` modules keep their code and read a config view that names mmprefix's attention function
(``mechanism.prefixed_attention``); the others get a replacement ``forward`` that computes queries, keys and
values as the original does and then attends through ``mechanism.attend``.
"""

from __future__ import annotations

from types import MethodType
from typing import Callable, NamedTuple

from torch import nn

from ..architectures import Site
from . import blip, git, open_clip
from .mechanism import (SUPPORTED_IMPLEMENTATIONS, Prefix, PrefixedConfig, PrefixSource, SiteHook,
                        unsupported_implementation)

__all__ = ["ROUTES", "Prefix", "PrefixSource", "Route", "install", "uninstall"]


class Route(NamedTuple):
    """A replacement ``forward`` (None: the module's own code, through the attention interface) and a check
    that refuses module variants the route cannot reproduce exactly (raises ``ValueError``)."""

    forward: Callable | None
    check: Callable[[nn.Module], None]


def _check_implementation(module: nn.Module) -> None:
    implementation = module.config._attn_implementation
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(unsupported_implementation(implementation))


def _anything(module: nn.Module) -> None:
    return None


ROUTES: dict[str, Route] = {
    "interface": Route(None, _check_implementation),
    "blip_vision": Route(blip.vision_attention, _anything),
    "blip_text": Route(blip.text_attention, _anything),
    "git_text": Route(git.text_attention, _anything),
    "torch_mha": Route(open_clip.mha_attention, open_clip.check_mha),
    "open_clip": Route(open_clip.open_clip_attention, open_clip.check_attention),
}


def _forward_slot(module: nn.Module) -> str:
    """Where a module's own forward code is called from: accelerate's hooks (``device_map``, offloading) wrap
    ``forward`` and call the code they wrapped as ``_old_forward``, after bringing the weights in."""
    return "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"


def install(module: nn.Module, site: Site, source: PrefixSource) -> None:
    """Give ``module`` a prefix route; ``uninstall`` restores it exactly."""
    if hasattr(module, "_mmprefix"):
        raise ValueError(f"{site.name} already carries an mmprefix prefix; call remove_prefix() on its PrefixModel first")
    route = ROUTES[site.route]
    route.check(module)
    replaced = None
    if route.forward is None:
        module.config = PrefixedConfig(module.config)
    else:
        slot = _forward_slot(module)
        replaced = module.__dict__.get(slot)  # None: the class's forward
        setattr(module, slot, MethodType(route.forward, module))
    module._mmprefix = SiteHook(site, source, module, replaced)


def uninstall(module: nn.Module) -> None:
    hook: SiteHook = module.__dict__.pop("_mmprefix")
    route = ROUTES[hook.site.route]
    if route.forward is None:
        module.config = module.config.config
        return
    # accelerate may have hooked the module since install: the route then sits in _old_forward
    slot = next(s for s in ("forward", "_old_forward") if getattr(module.__dict__.get(s), "__func__", None) is route.forward)
    if slot == "forward" and hook.replaced is None:
        del module.forward
    else:
        setattr(module, slot, hook.replaced or MethodType(type(module).forward, module))
