"""`PrefixStore`: the trainable keys, values (and gates) of one named prefix, one set per attention site."""

from __future__ import annotations

import torch
from torch import nn

from .architectures import Site
from .conditioning import ConditionNet
from .config import PrefixConfig
from .attention import Prefix
from .attention.memory import Memory


def parameter_key(site_name: str) -> str:
    """Parameter names cannot hold dots; module names never hold dashes."""
    return site_name.replace(".", "-")


class PrefixStore(nn.Module):
    """Keys and values ``[kv_heads, P, head_dim]`` for each of its sites, kept in float32.

    Flat (the default): one parameter pair per site. ``reparam="mlp"``: an embedding ``[P, hidden]`` and a
    two-layer MLP whose output row holds every site's keys and values side by side; each site computes only
    its own slice of the last layer, so no per-call cache is needed.
    """

    def __init__(self, config: PrefixConfig, sites: list[Site], devices: dict[str, torch.device] | None = None,
                 condition_width: int | None = None):
        super().__init__()
        self.config = config
        self.sites = list(sites)
        self._by_name = {site.name: parameter_key(site.name) for site in self.sites}
        self._site = {site.name: site for site in self.sites}
        devices = devices or {}
        p = config.num_virtual_tokens
        if config.reparam is None:
            self.keys = nn.ParameterDict()
            self.values = nn.ParameterDict()
            for site in self.sites:
                for table in (self.keys, self.values):
                    data = torch.empty(site.kv_heads, p, site.head_dim, device=devices.get(site.name))
                    table[parameter_key(site.name)] = nn.Parameter(self._initial(data, table is self.values))
            # Read per attention call: the tables' own parameter dicts skip nn.Module attribute lookups, and
            # stay current when a wrapper (FSDP, offloading) swaps the parameters.
            self._key_table, self._value_table = self.keys._parameters, self.values._parameters
        else:
            device = next(iter(devices.values()), None)
            self._slices, start = {}, 0
            for site in self.sites:
                width = 2 * site.kv_heads * site.head_dim
                self._slices[site.name] = (start, start + width)
                start += width
            self.embedding = nn.Parameter(torch.randn(p, config.reparam_hidden, device=device))
            self.mlp = nn.Sequential(
                nn.Linear(config.reparam_hidden, config.reparam_hidden, device=device),
                nn.Tanh(),
                nn.Linear(config.reparam_hidden, start, device=device),
            )
            if config.init == "zero":
                nn.init.zeros_(self.mlp[2].weight)
                nn.init.zeros_(self.mlp[2].bias)
            elif config.method == "memory":  # the values' rows of every site's slice start at zero
                with torch.no_grad():
                    for begin, end in self._slices.values():
                        self.mlp[2].weight[begin:end].view(2, -1, config.reparam_hidden)[1].zero_()
                        self.mlp[2].bias[begin:end].view(2, -1)[1].zero_()
        self.condition: ConditionNet | None = None  # the meta-network of an image-conditioned prefix
        if config.condition is not None:
            if condition_width is None:
                raise ValueError("an image-conditioned prefix needs the width of the model's image features")
            device = next((d for d in devices.values() if d is not None), None)
            self.condition = ConditionNet(condition_width, config.condition_hidden, self.sites, device)
        if config.gate is not None:
            self.gates = nn.ParameterDict()
            for site in self.sites:
                size = 1 if config.gate == "scalar" else site.heads
                self.gates[parameter_key(site.name)] = nn.Parameter(torch.zeros(size, device=devices.get(site.name)))

    def _initial(self, data: torch.Tensor, values: bool) -> torch.Tensor:
        # A memory's values start at zero: its term is then exactly zero, as a LoRA up-projection starts
        if self.config.init == "zero" or (values and self.config.method == "memory"):
            return nn.init.zeros_(data)
        return nn.init.normal_(data, std=self.config.init_std)  # "text" is overwritten after capture

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def has_site(self, site_name: str) -> bool:
        return site_name in self._by_name

    def kv(self, site_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[kv_heads, P, head_dim]`` at one site."""
        if self.config.reparam is None:
            key = self._by_name[site_name]
            return self._key_table[key], self._value_table[key]
        site = self._site[site_name]
        start, stop = self._slices[site_name]
        hidden = self.mlp[1](self.mlp[0](self.embedding))
        out = nn.functional.linear(hidden, self.mlp[2].weight[start:stop], self.mlp[2].bias[start:stop])
        keys, values = out.view(-1, 2, site.kv_heads, site.head_dim).permute(1, 2, 0, 3)
        return keys, values

    def gate(self, site_name: str) -> torch.Tensor | None:
        if self.config.gate is None:
            return None
        return self.gates[self._by_name[site_name]]

    def prefix(self, site_name: str, cache: dict | None = None) -> Prefix | None:
        """The prefix for a call where every row uses this store (None where it has no slots here);
        ``cache``: the call's cache (see `mmprefix.core.attention.Prefix`)."""
        if site_name not in self._by_name or self.config.num_virtual_tokens == 0:
            return None
        keys, values = self.kv(site_name)
        if self.config.method == "memory":
            return Prefix(None, None, cache=cache, memory=Memory(keys[None], values[None]))
        if self.config.gate is None:
            return Prefix(keys[None], values[None], None, None, cache)
        return Prefix(keys[None], values[None], None, self.gate(site_name)[None], cache)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors by ``"<site>.key"``, ``"<site>.value"`` (and ``"<site>.gate"``, and an image-conditioned
        prefix's meta-network as ``"condition.<layer>.<weight|bias>"``), as saved on disk."""
        out = {}
        with torch.no_grad():
            for site in self.sites:
                out[f"{site.name}.key"], out[f"{site.name}.value"] = (t.detach() for t in self.kv(site.name))
                if self.config.gate is not None:
                    out[f"{site.name}.gate"] = self.gate(site.name).detach()
            if self.condition is not None:
                out.update({f"condition.{k}": v.detach() for k, v in self.condition.net.state_dict().items()})
        return out

    def reparam_tensors(self) -> dict[str, torch.Tensor]:
        """The embedding and MLP, to resume training a reparameterised prefix."""
        return {"embedding": self.embedding.detach(), **{f"mlp.{k}": v for k, v in self.mlp.state_dict().items()}}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in (the caller has checked names and shapes): flat keys and values, gates, and
        for a reparameterised store its ``reparam.*`` embedding and MLP when they were kept."""
        if self.config.reparam is not None and "reparam.embedding" in tensors:
            self.embedding.copy_(tensors["reparam.embedding"])
            self.mlp.load_state_dict({k[len("reparam.mlp.") :]: v for k, v in tensors.items() if k.startswith("reparam.mlp.")})
        else:
            self.set_kv({s.name: (tensors[f"{s.name}.key"], tensors[f"{s.name}.value"]) for s in self.sites})
        if self.config.gate is not None:
            for site in self.sites:
                self.gates[self._by_name[site.name]].copy_(tensors[f"{site.name}.gate"])
        if self.condition is not None:
            net = {k[len("condition."):]: v for k, v in tensors.items() if k.startswith("condition.")}
            width = self.condition.net[0].in_features
            if net["0.weight"].shape[1] != width:
                raise ValueError(f"the prefix's meta-network reads image features of width {net['0.weight'].shape[1]}, "
                                 f"this model's vision tower gives {width}")
            self.condition.net.load_state_dict(net)

    @torch.no_grad()
    def set_kv(self, kv: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Make the store produce these keys and values. A reparameterised store sets its last MLP layer to
        map its hidden rows onto them (exact while P <= reparam_hidden)."""
        if self.config.reparam is None:
            for site in self.sites:
                key = self._by_name[site.name]
                self.keys[key].copy_(kv[site.name][0])
                self.values[key].copy_(kv[site.name][1])
            return
        rows = []
        for site in self.sites:
            keys, values = kv[site.name]
            rows.append(torch.stack([keys, values]).permute(2, 0, 1, 3).reshape(keys.shape[1], -1))
        target = torch.cat(rows, dim=1).to(self.embedding)
        hidden = self.mlp[1](self.mlp[0](self.embedding))
        self.mlp[2].bias.zero_()
        self.mlp[2].weight.copy_((torch.linalg.pinv(hidden) @ target).T)
