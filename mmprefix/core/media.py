"""Which text row each image, tile, frame or packed chunk of a routed call belongs to.

A tower that sees images (or videos, audio clips) does not see the text rows: LLaVA's vision tower sees every
image of the batch, Idefics' every sub-image, Qwen-VL's one packed sequence of all of them. A routed call must
give each of those entries the prefix of the row its item belongs to. The family record says, per input, how the
items reach the towers (`families.Media`); this module works the rows out from the call's own inputs, once per
call, and refuses in one line where they cannot be proven (the placeholders do not add up, no ``input_ids``, a
tower no record describes). It never assumes that image i belongs to row i unless the model itself pairs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .families import FRAMES, GRID, PADDED, ROWS, TILES, UNMAPPED, Media


class MediaError(ValueError):
    """A routed call whose items cannot be mapped to its rows."""


@dataclasses.dataclass
class Items:
    """The items of one input of a call: the text row of each, in the order the towers see them, and how many
    entries of a tower's batch each one takes (tiles, frames; for a packed tower, tokens of the sequence).
    ``rows`` None: the input's first dimension is the rows, each with any whole number of entries."""

    media: Media
    rows: torch.Tensor | None = None
    entries: torch.Tensor | None = None

    def total(self) -> int | None:
        return None if self.entries is None else int(self.entries.sum())

    def entry_rows(self, size: int, rows: int, expansion: int) -> list[int] | None:
        """The text row of each of ``size`` entries of a tower's batch, or None if they do not add up. Generation
        may run the tower on the expanded batch, where each row's entries come ``expansion`` times in a row."""
        if self.rows is None:
            return [entry // (size // rows) for entry in range(size)] if size % rows == 0 else None
        per_row = torch.zeros(rows, dtype=torch.long).index_add_(0, self.rows, self.entries)
        for repeat in dict.fromkeys((1, expansion)):
            if int(per_row.sum()) * repeat == size:
                return torch.arange(rows).repeat_interleave(per_row * repeat).tolist()
        return None

    def chunk_rows(self, cu_seqlens: torch.Tensor, expansion: int) -> list[int] | None:
        """The text row of each chunk of a packed sequence cut at ``cu_seqlens`` (an image, a frame, a window)."""
        for repeat in dict.fromkeys((1, expansion)):
            order = self._expanded(repeat)
            tokens = self.entries[order]
            if int(tokens.sum()) == int(cu_seqlens[-1]):
                item = torch.searchsorted(tokens.cumsum(0), cu_seqlens[:-1].cpu(), right=True)
                return self.rows[order][item].tolist()
        return None

    def _expanded(self, repeat: int) -> torch.Tensor:
        """The items in the order an expanded batch holds them: each row's items ``repeat`` times, row after row."""
        index = torch.arange(len(self.rows))
        if repeat == 1 or not len(index):
            return index
        _, counts = torch.unique_consecutive(self.rows, return_counts=True)
        return torch.cat([group.repeat(repeat) for group in index.split(counts.tolist())])


@dataclasses.dataclass
class CallMedia:
    """The items of one routed call, per input, and which input each tower is running now."""

    rows: int
    items: list[Items]
    towers: Mapping[str, str]  # site name -> tower, for the sites that see media
    failures: dict[str, str] = dataclasses.field(default_factory=dict)  # input -> why its items cannot be mapped
    running: dict[str, Items] = dataclasses.field(default_factory=dict)  # tower -> the input it runs now

    def sees_media(self, site_name: str) -> bool:
        return site_name in self.towers

    def running_input(self, site_name: str) -> str | None:
        """The input the site's tower runs now, where several feed it (None otherwise)."""
        items = self.running.get(self.towers.get(site_name))
        return items.media.input if items is not None else None

    def check(self, reached: Sequence[str], family: Any) -> None:
        """Before any compute: an input whose items cannot be mapped, feeding a tower the routed prefixes reach
        (``reached``: their sites), is an error now rather than inside the model."""
        towers = {self.towers[name] for name in reached if name in self.towers}
        for entry in family.media:
            if entry.input in self.failures and towers & set(entry.towers):
                tower = next(t for t in entry.towers if t in towers)
                raise MediaError(_refusal(tower, self.failures[entry.input]))

    def enter(self, tower: str, size: int, expansion: int) -> None:
        """A tower fed by several inputs starts (a forward pre-hook): the next input in the record's order whose
        entries add up to its batch. Models run them in that order (Qwen-VL: images, then videos), also when an
        image and a video have the same size."""
        feeding = [i for i in self.items if tower in i.media.towers]
        last = self.running.get(tower)
        start = feeding.index(last) + 1 if last in feeding else 0
        for items in feeding[start:] + feeding[:start]:
            if _fits(items, size, self.rows, expansion):
                self.running[tower] = items
                return
        self.running.pop(tower, None)

    def _input(self, site_name: str) -> Items:
        tower = self.towers[site_name]
        feeding = [i for i in self.items if tower in i.media.towers]
        if tower in self.running:
            return self.running[tower]
        if len(feeding) == 1:
            return feeding[0]
        raise MediaError(_refusal(tower, "; ".join(self.failures.values()), site_name))

    def batch_rows(self, site_name: str, size: int, expansion: int) -> list[int]:
        items = self._input(site_name)
        rows = items.entry_rows(size, self.rows, expansion)
        if rows is None:
            raise MediaError(
                f"the {self.towers[site_name]!r} tower sees a batch of {size} at {site_name}, but the call's "
                f"{noun_of(items.media)}s take {items.total()} entries: cannot tell which row each belongs to"
            )
        return rows

    def chunk_rows(self, site_name: str, cu_seqlens: torch.Tensor, expansion: int) -> list[int]:
        items = self._input(site_name)
        rows = items.chunk_rows(cu_seqlens, expansion)
        if rows is None:
            raise MediaError(
                f"the packed sequence at {site_name} has {int(cu_seqlens[-1])} tokens, but the call's "
                f"{noun_of(items.media)}s take {items.total()}: cannot tell which row each chunk belongs to"
            )
        return rows


def _refusal(tower: str, why: str, where: str = "") -> str:
    return (f"per-row routing cannot tell which row each item of the {tower!r} tower belongs to"
            + (f" at {where}" if where else "") + (f" ({why})" if why else "")
            + "; give that tower one prefix per call, or route prefixes that target the other towers "
            "(e.g. targets=['lm'])")


def _fits(items: Items, size: int, rows: int, expansion: int) -> bool:
    """Whether a tower batch (for a packed tower: sequence) of ``size`` can hold ``items``' entries."""
    if items.media.layout == GRID:
        return size in {items.total(), items.total() * expansion}
    return items.entry_rows(size, rows, expansion) is not None


def call_media(family: Any, kwargs: dict | None, config: Any, towers: Mapping[str, str], rows: int) -> CallMedia:
    """The items of a routed call of ``rows`` rows (``family``: the record, whose media they are; ``towers``: site
    name -> tower for the sites that see media; ``kwargs`` None: a ``using()`` scope, whose calls' inputs are not
    known). An input whose items cannot be mapped is remembered with the reason: a site that needs it raises, one
    that does not (its prefixes skip that tower) is not stopped by it."""
    found, failures = [], {}
    for entry in family.media:
        if kwargs is None and entry.layout != ROWS:
            failures[entry.input] = (f"inside using() the calls' {noun_of(entry)}s are not known: pass prefix= to "
                                     "forward or generate")
            continue
        value = (kwargs or {}).get(entry.input)
        if entry.layout != ROWS and value is None:
            continue
        try:
            if entry.layout == UNMAPPED:
                reasons = dict(family.unroutable)
                raise MediaError("; ".join(reasons.get(t, "no record maps its items") for t in entry.towers))
            found.append(_items(entry, value, kwargs, config, rows))
        except MediaError as error:
            failures[entry.input] = str(error)
    return CallMedia(rows, found, towers, failures)


def _items(media: Media, value: torch.Tensor, kwargs: dict, config: Any, rows: int) -> Items:
    if media.layout == ROWS:
        return Items(media)
    if media.layout == PADDED:  # [groups, images, ...]: all-zero images are padding, which the model drops
        entries = torch.ones(int(value.flatten(value.dim() - 3).ne(0).any(-1).sum()), dtype=torch.long)
    elif media.layout == TILES:  # [items, tiles, ...]: all-zero tiles are padding
        if value.dim() < 5:
            raise MediaError(f"{media.input} of shape {tuple(value.shape)} does not say how many tiles each image has")
        entries = value.flatten(2).ne(0).any(-1).sum(1).cpu()
    elif media.layout == FRAMES:  # [items, frames, ...]
        entries = torch.full((value.shape[0],), value.shape[1] if value.dim() >= 5 else 1)
    elif media.layout == GRID:
        entries = kwargs.get(media.sizes)
        if entries is None:
            raise MediaError(f"{media.input} without {media.sizes}: cannot tell the size of each item")
        entries = entries.prod(-1).cpu()
    else:  # ITEMS
        entries = torch.ones(value.shape[0], dtype=torch.long)
    return Items(media, _item_rows(media, len(entries), kwargs, config, rows), entries)


def _attribute(config: Any, path: str) -> Any:
    """A config attribute by dotted path (``vision_config.image_token_id``), or None."""
    for name in path.split("."):
        config = getattr(config, name, None)
    return config


def noun_of(media: Media) -> str:
    """What one item of ``media`` is, for messages."""
    return "audio clip" if "audio" in media.towers else "video" if "video" in media.input else "image"


def _item_rows(media: Media, count: int, kwargs: dict, config: Any, rows: int) -> torch.Tensor:
    """Each item's text row, from its placeholder tokens in ``input_ids`` (the model fills them item by item)."""
    ids = kwargs.get("input_ids")
    token = _attribute(config, media.token) if media.token else None
    if not torch.is_tensor(ids) or token is None:
        why = "no input_ids" if not torch.is_tensor(ids) else f"the config has no {media.token}"
        raise MediaError(f"{why} to tell which row each of the call's {count} {noun_of(media)}s belongs to")
    placeholders = ids == token
    where = placeholders.nonzero()[:, 0].cpu()  # the row of each placeholder, in the order the model fills them
    noun = noun_of(media)
    if media.count == "runs":
        starts = placeholders & ~torch.nn.functional.pad(placeholders, (1, 0))[:, :-1]
        per_row = starts.sum(1).cpu()
        if int(per_row.sum()) != count:
            raise MediaError(f"the call has {count} {noun}s but input_ids hold {int(per_row.sum())} runs of their "
                             f"placeholder tokens (were some cut off by max_length, or do two {noun}s touch?)")
        return torch.arange(rows).repeat_interleave(per_row)
    if media.count == "grid":
        merge = config.vision_config.spatial_merge_size ** 2
        tokens = kwargs[media.sizes].prod(-1).cpu() // merge
    elif media.count == "sizes":
        if kwargs.get(media.sizes) is None:
            raise MediaError(f"no {media.sizes} to tell how many placeholder tokens each {noun_of(media)} takes")
        tokens = torch.as_tensor(kwargs[media.sizes]).reshape(-1).cpu()
    else:  # uniform
        if count == 0 or len(where) % count:
            raise MediaError(f"the call has {count} {noun}s but input_ids hold {len(where)} of their placeholder "
                             "tokens, not the same number for each (were some cut off by max_length?)")
        tokens = torch.full((count,), len(where) // count)
    if int(tokens.sum()) != len(where):
        raise MediaError(f"the call's {count} {noun}s take {int(tokens.sum())} placeholder tokens but input_ids "
                         f"hold {len(where)} (were some cut off by max_length?)")
    ends = tokens.cumsum(0)
    first, last = where[ends - tokens], where[ends - 1]
    if not torch.equal(first, last):
        raise MediaError(f"a {noun}'s placeholder tokens run over two rows of input_ids")
    return first
