"""Image-conditioned prefixes (``PrefixConfig(condition="image")``): CoCoOp's idea, generalised to every layer.

CoCoOp (Zhou et al., 2022) adds to every soft-prompt token a shift computed from the image by a small
meta-network, so the prompt adapts to each image; new classes gained most. Here a meta-network ``Linear -> ReLU ->
Linear`` maps each image's pooled features to one shift of the keys and one of the values at every conditioned
site (shared by the site's slots, as CoCoOp shares its shift across the context tokens):

    keys(image) = keys + shift_k(image),  values(image) = values + shift_v(image)

Which sites can be conditioned: the features come from the vision tower, so its own prefix cannot depend on them
(that would be its own output); every site outside the towers named ``vision*`` is conditioned. The features are
the frozen tower's pooled output (``pooler_output``, or open_clip's image embedding), computed once per call with
every prefix disabled and without gradient, from the call's own images; a call that has none (a text-only CLIP
call) runs inside `PrefixModel.conditioned_on` with the features of its rows' images. A call whose rows outnumber
its images (generation's beams, CLIP's texts of each image) repeats each image's features for its rows, as
generation repeats the rows. The meta-network's last layer starts at zero, so the prefix starts unconditioned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .architectures import Site, family_of, is_open_clip, tower_layout
from .families import ROWS
from .attention import Prefix
from .attention.memory import Memory


def conditioned(site: Site) -> bool:
    """Whether an image-conditioned prefix shifts its keys and values at ``site`` (outside the vision towers; a
    saved site description works too)."""
    return not site.tower.startswith("vision")


def vision_tower(model: nn.Module) -> nn.Module:
    """The model's vision tower (its family record's ``vision`` tower); a ValueError where images do not come one
    per row or the model has none."""
    family = family_of(model)
    images = next((m for m in family.media if m.input == "pixel_values"), None) if family is not None else None
    if family is None or (images is not None and images.layout != ROWS):
        # Only a record that pairs image i with row i proves which image a row's prefix is conditioned on
        raise ValueError(f"image-conditioned prefixes need one image per row; {type(model).__name__} gives its vision "
                         "tower images that are not matched one to one with the text rows")
    layout = tower_layout(model)
    for prefix, tower in layout.towers if layout is not None else ():
        if tower == "vision":
            try:
                return model.get_submodule(prefix.rstrip("."))
            except AttributeError:
                continue
    raise ValueError(f"{type(model).__name__} has no vision tower mmprefix knows: image-conditioned prefixes need one")


def feature_width(model: nn.Module) -> int:
    """The width of the pooled features `image_features` returns."""
    tower = vision_tower(model)
    width = getattr(tower, "output_dim", None) if is_open_clip(model) else getattr(tower.config, "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(f"cannot tell the width of {type(tower).__name__}'s pooled features")
    return width


def image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled features ``[images, width]`` of the frozen vision tower (call it with prefixes disabled)."""
    with torch.no_grad():
        out = vision_tower(model)(images) if is_open_clip(model) else vision_tower(model)(pixel_values=images)
    if torch.is_tensor(out):
        return out.float()
    pooled = getattr(out, "pooler_output", None)
    return (pooled if pooled is not None else out.last_hidden_state.mean(1)).float()


def call_images(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The images a call passes to the model (open_clip: ``image``, first positional; else ``pixel_values``)."""
    if is_open_clip(model):
        return kwargs.get("image", args[0] if args else None)
    return kwargs.get("pixel_values")


class ConditionNet(nn.Module):
    """The meta-network of one prefix: pooled image features -> a shift of keys and values at every conditioned
    site, side by side in one output row."""

    def __init__(self, width: int, hidden: int, sites: list[Site], device: torch.device | None = None) -> None:
        super().__init__()
        self.slices, start = {}, 0
        for site in sites:
            if conditioned(site):
                size = 2 * site.kv_heads * site.head_dim
                self.slices[site.name] = (start, start + size, site.kv_heads, site.head_dim)
                start += size
        if not self.slices:
            raise ValueError("an image-conditioned prefix needs a target outside the vision tower (its own prefix "
                             "cannot depend on its output)")
        self.net = nn.Sequential(nn.Linear(width, hidden, device=device), nn.ReLU(),
                                 nn.Linear(hidden, start, device=device))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.to(self.net[0].weight.dtype))

    def shift(self, site_name: str, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The keys' and values' shifts ``[rows, kv_heads, 1, head_dim]`` at one site from the net's output."""
        if site_name not in self.slices:
            return None
        start, stop, kv_heads, head_dim = self.slices[site_name]
        keys, values = out[:, start:stop].view(-1, 2, kv_heads, 1, head_dim).unbind(1)
        return keys, values


@dataclasses.dataclass(frozen=True)
class Condition:
    """The pooled features of a call's images (or of a `PrefixModel.conditioned_on` scope's), one row per image, and
    the meta-networks' outputs for them: computed when the call starts, outside any checkpointed layer, so that a
    layer recomputed in backward reads the same tensors."""

    features: torch.Tensor
    outputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def for_stores(self, stores: list[Any]) -> Condition:
        """This condition with the outputs of these stores' meta-networks."""
        nets = [store.condition for store in stores]
        return Condition(self.features, {id(net): net(self.features.to(net.net[0].weight.device)) for net in nets})

    def output(self, net: ConditionNet) -> torch.Tensor:
        """``net`` on the features: computed when the call started, or now for a call that did not go through the
        `PrefixModel` (a method of the wrapped model called inside a `PrefixModel.conditioned_on` scope)."""
        found = self.outputs.get(id(net))
        return found if found is not None else net(self.features.to(net.net[0].weight.device))

    def index(self, rows: int) -> torch.Tensor:
        """The feature row of each of ``rows`` rows (each image's features repeated for its rows in a row)."""
        count = self.features.shape[0]
        if rows % count:
            raise ValueError(f"an image-conditioned prefix got {count} images for {rows} rows: each image must "
                             "come with the same number of rows")
        return torch.arange(count, device=self.features.device).repeat_interleave(rows // count)


def shifted(prefix: Prefix, site_name: str, row_stores: list[Any], condition: Condition) -> Prefix:
    """``prefix`` with each row's keys and values shifted by its image, for the rows whose store (``row_stores``,
    one per batch row; None: no prefix) is image-conditioned."""
    index = condition.index(len(row_stores))
    shifts: dict[bool, list] = {}  # memory or not -> (keys, values) shift of each row, None where unshifted
    for store in {id(s): s for s in row_stores if s is not None and s.condition is not None}.values():
        got = store.condition.shift(site_name, condition.output(store.condition))
        if got is None:
            continue
        rows = torch.tensor([s is store for s in row_stores], device=got[0].device)
        picked = [t[index].masked_fill(~rows[:, None, None, None], 0.0) for t in got]
        memory = store.config.method == "memory"
        old = shifts.get(memory)
        shifts[memory] = picked if old is None else [a + b for a, b in zip(old, picked)]
    if False in shifts:
        prefix = prefix._replace(keys=prefix.keys + shifts[False][0].to(prefix.keys.dtype),
                                 values=prefix.values + shifts[False][1].to(prefix.values.dtype))
    if True in shifts:
        memory = prefix.memory
        prefix = prefix._replace(memory=Memory(memory.keys + shifts[True][0], memory.values + shifts[True][1],
                                               memory.visible))
    return prefix
