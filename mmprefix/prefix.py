"""`PrefixStore`: the trainable keys and values of one named prefix, one pair per attention site."""

from __future__ import annotations

import torch
from torch import nn

from .architectures import Site
from .config import PrefixConfig
from .layer import Prefix


def parameter_key(site_name: str) -> str:
    """Parameter names cannot hold dots; module names never hold dashes."""
    return site_name.replace(".", "-")


class PrefixStore(nn.Module):
    """Flat prefix keys and values ``[kv_heads, P, head_dim]`` for each of its sites, kept in float32."""

    def __init__(self, config: PrefixConfig, sites: list[Site], devices: dict[str, torch.device] | None = None):
        super().__init__()
        self.config = config
        self.sites = list(sites)
        self.keys = nn.ParameterDict()
        self.values = nn.ParameterDict()
        p = config.num_virtual_tokens
        for site in self.sites:
            device = (devices or {}).get(site.name)
            for table in (self.keys, self.values):
                data = torch.empty(site.kv_heads, p, site.head_dim, dtype=torch.float32, device=device)
                table[parameter_key(site.name)] = nn.Parameter(nn.init.normal_(data, std=config.init_std))
        self._by_name = {site.name: parameter_key(site.name) for site in self.sites}

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def prefix(self, site_name: str) -> Prefix | None:
        key = self._by_name.get(site_name)
        if key is None or self.config.num_virtual_tokens == 0:
            return None
        return Prefix(self.keys[key][None], self.values[key][None])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors by ``"<site>.key"`` / ``"<site>.value"``, as saved on disk."""
        out = {}
        for site in self.sites:
            out[f"{site.name}.key"] = self.keys[self._by_name[site.name]].detach()
            out[f"{site.name}.value"] = self.values[self._by_name[site.name]].detach()
        return out

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in; the caller has checked names and shapes."""
        for site in self.sites:
            key = self._by_name[site.name]
            self.keys[key].copy_(tensors[f"{site.name}.key"])
            self.values[key].copy_(tensors[f"{site.name}.value"])
