"""Per-sample routing: each row of a batch attends to its own prefix (or to none).

At each site the prefixes that the batch uses are padded to the longest one (padding slots are masked out) and
stacked; each row then picks its own by index. Rows that use no prefix at a site get only masked slots. When
generation expands the batch (beams, returned sequences), rows are repeated in place, as transformers does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .layer import Prefix
from .prefix import PrefixStore


class Routing:
    """The prefix names of the rows of one batch."""

    def __init__(self, names: Sequence[str | None], stores: Mapping[str, PrefixStore]) -> None:
        self.names = list(names)
        self.used = sorted({n for n in self.names if n is not None})
        self.stores = [stores[n] for n in self.used]
        gated = {store.config.gate is not None for store in self.stores}
        if len(gated) > 1:
            raise ValueError(
                f"gated and ungated prefixes cannot share a batch (routing {self.used}); route them in separate calls"
            )
        self.gated = gated == {True}
        # Rows without a prefix point one past the used prefixes, at an all-masked entry.
        self.rows = torch.tensor([self.used.index(n) if n is not None else len(self.used) for n in self.names])
        self._built: dict[tuple[str, int], Prefix | None] = {}

    def prefix(self, site_name: str, batch_size: int) -> Prefix | None:
        """Each row's prefix at one site. Without autograd (generation) it is built once per site and batch
        size for the whole call: the decoding steps reuse it."""
        if torch.is_grad_enabled():
            return self._build(site_name, batch_size)
        key = (site_name, batch_size)
        if key not in self._built:
            self._built[key] = self._build(site_name, batch_size)
        return self._built[key]

    def _build(self, site_name: str, batch_size: int) -> Prefix | None:
        here = [s.has_site(site_name) and s.num_virtual_tokens > 0 for s in self.stores]
        if not any(here):
            return None
        if batch_size % len(self.names):
            raise ValueError(
                f"a routing list of {len(self.names)} prefixes does not fit a batch of {batch_size} rows at {site_name}"
            )
        kvs = [store.kv(site_name) if present else None for store, present in zip(self.stores, here)]
        slots = max(kv[0].shape[1] for kv in kvs if kv is not None)
        reference = next(kv[0] for kv in kvs if kv is not None)
        empty = reference.new_zeros(reference.shape[0], slots, reference.shape[2])
        keys = torch.stack([_pad(kv[0], slots) if kv else empty for kv in kvs] + [empty])
        values = torch.stack([_pad(kv[1], slots) if kv else empty for kv in kvs] + [empty])
        lengths = torch.tensor([kv[0].shape[1] if kv else 0 for kv in kvs] + [0], device=reference.device)
        visible = torch.arange(slots, device=reference.device)[None] < lengths[:, None]
        rows = self.rows.to(reference.device).repeat_interleave(batch_size // len(self.names))
        every_slot_used = bool(visible[rows].all())
        gates = None
        if self.gated:
            heads = max(store.gate(site_name).shape[0] for store, present in zip(self.stores, here) if present)
            closed = reference.new_zeros(heads)
            gates = torch.stack(
                [store.gate(site_name).expand(heads) if present else closed for store, present in zip(self.stores, here)]
                + [closed]
            )
        return Prefix(
            keys[rows], values[rows], None if every_slot_used else visible[rows], None if gates is None else gates[rows]
        )


def _pad(tensor: torch.Tensor, slots: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, 0, 0, slots - tensor.shape[1]))
