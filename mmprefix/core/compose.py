"""Composing prefixes into a new named prefix: a weighted sum, or a concatenation along the prefix axis."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import torch

from .model import PrefixModel
from .store import PrefixStore


def compose(
    model: PrefixModel, parts: Mapping[str, float] | Sequence[str], name: str
) -> PrefixStore:
    """Add prefix ``name`` to ``model``, made from other prefixes of it.

    ``parts`` is either ``{"a": 0.7, "b": 0.3}``, a weighted sum of prefixes with the same sites and lengths
    (gates are summed with the same weights), or ``["style", "task"]``, their concatenation along the prefix
    axis (same sites; lengths add up; ungated only). Memories (``method="memory"``) compose with memories only:
    their slots are summed or concatenated the same way. Entries may also be prefix folders, loaded first. The
    result is a flat prefix that can be saved and routed like any other.
    """
    if not isinstance(model, PrefixModel):
        raise ValueError("compose() works on a PrefixModel (the result of add_prefix or load_prefix)")
    weighted = isinstance(parts, Mapping)
    names = list(parts)
    if not names:
        raise ValueError("compose() needs at least one prefix")
    loaded = []
    try:
        stores = []
        for entry in names:
            if entry not in model.prefixes and os.path.isdir(entry):
                temporary = f"_compose_{len(loaded)}"
                model.load_prefix(temporary, entry)
                loaded.append(temporary)
                entry = temporary
            if entry not in model.prefixes:
                raise ValueError(f"unknown prefix {entry!r}; this model has {sorted(model.prefixes)}")
            stores.append(model.prefixes[entry])
        _check_compatible(stores, names, weighted)
        first = stores[0]
        tensors = {}
        with torch.no_grad():
            for site in first.sites:
                pairs = [store.kv(site.name) for store in stores]
                if weighted:
                    weights = [float(w) for w in parts.values()]
                    for i, part in enumerate(("key", "value")):
                        tensors[f"{site.name}.{part}"] = sum(w * pair[i] for w, pair in zip(weights, pairs))
                    if first.config.gate is not None:
                        tensors[f"{site.name}.gate"] = sum(w * store.gate(site.name) for w, store in zip(weights, stores))
                else:
                    for i, part in enumerate(("key", "value")):
                        tensors[f"{site.name}.{part}"] = torch.cat([pair[i] for pair in pairs], dim=1)
        length = first.num_virtual_tokens if weighted else sum(s.num_virtual_tokens for s in stores)
        config = dataclasses.replace(first.config, num_virtual_tokens=length, reparam=None, init="random")
        store = model.add_prefix(name, config)
        if [s.name for s in store.sites] != [s.name for s in first.sites]:
            model.delete_prefix(name)
            raise ValueError(f"cannot compose: the targets of {names[0]!r} now select other attention sites")
        store.load_tensors(tensors)
        return store
    finally:
        for temporary in loaded:
            model.delete_prefix(temporary)


def _check_compatible(stores: list[PrefixStore], names: list[str], weighted: bool) -> None:
    first, reference = stores[0], [s.name for s in stores[0].sites]
    conditioned = [name for name, store in zip(names, stores) if store.config.condition is not None]
    if conditioned:
        raise ValueError(f"cannot compose {conditioned[0]!r}: an image-conditioned prefix's meta-network has no sum or "
                         "concatenation with another's")
    for store, label in zip(stores[1:], names[1:]):
        if store.config.method != first.config.method:
            raise ValueError(f"cannot compose {names[0]!r} (method={first.config.method!r}) and {label!r} "
                             f"(method={store.config.method!r}): slots inside attention and memory slots do not mix")
        sites = [s.name for s in store.sites]
        if sites != reference:
            only = sorted(set(sites) ^ set(reference))
            raise ValueError(
                f"cannot compose {names[0]!r} and {label!r}: they sit in different attention sites "
                f"({len(reference)} vs {len(sites)}; e.g. {only[0] if only else 'a different order'})"
            )
        if weighted and store.num_virtual_tokens != first.num_virtual_tokens:
            raise ValueError(
                f"cannot sum {names[0]!r} ({first.num_virtual_tokens} tokens) and {label!r} "
                f"({store.num_virtual_tokens} tokens): a weighted sum needs prefixes of the same length"
            )
        if weighted and store.config.gate != first.config.gate:
            raise ValueError(f"cannot sum {names[0]!r} (gate={first.config.gate}) and {label!r} (gate={store.config.gate})")
    if not weighted and any(s.config.gate is not None for s in stores):
        raise ValueError("gated prefixes cannot be concatenated: each site has one gate")
