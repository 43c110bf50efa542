"""Which prefix each row of a call attends to, kept per call so that threads and asyncio tasks never share it.

A `PrefixModel` call (``forward``, ``generate``, any delegated method) opens a `Call`: the route (one prefix
name, None for the base model, or a `Routing` with one name per row), whether prefixes are disabled, the
soft-prompt insertion, and a cache that lives exactly as long as the call. Calls are kept in a context
variable, so each thread and each asyncio task sees only its own; ``PrefixModel.using()`` and
``disable_prefix()`` open a scope that the calls inside inherit (each call still gets a fresh cache, so a
prefix edited between two calls of one scope is seen by the second).

`Routing`: at each site the prefixes that a batch uses are padded to the longest one (padding slots are
masked out) and stacked; each row then picks its own by index. Rows that use no prefix at a site get only
masked slots. When generation expands the batch (beams, returned sequences), rows are repeated in place, as
transformers does.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .attention import Prefix
from .store import PrefixStore


class _Active:
    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE: Any = _Active()
"""``prefix=ACTIVE`` (the default everywhere): use the model's active prefix, or the enclosing scope's route."""


@dataclasses.dataclass
class Call:
    """The routing state of one call (or of a ``using``/``disable_prefix`` scope around calls)."""

    route: Any = ACTIVE  # a prefix name, None (the base model), a Routing, or ACTIVE
    disabled: bool = False
    insertion: Any = None  # the soft-prompt placeholders of this call (prompt.Insertion)
    expansion: int = 1  # generation repeats each row this many times (beams x returned sequences)
    cache: dict | None = None  # built routed prefixes and widened masks; None outside a call
    captured: dict | None = None  # keys and values recorded for a text initialisation

    def open(self, **changes: Any) -> Call:
        """A call inside this scope: the scope's routing, the changes, and a fresh cache."""
        return dataclasses.replace(self, cache={}, **changes)


_CALLS: contextvars.ContextVar[dict[int, Call]] = contextvars.ContextVar("mmprefix_calls", default={})
_OUTSIDE = Call()


def current(owner: object) -> Call:
    """The call (or scope) ``owner`` is in, in this thread or task; a default one outside any."""
    return _CALLS.get().get(id(owner), _OUTSIDE)


@contextlib.contextmanager
def inside(owner: object, call: Call) -> Iterator[Call]:
    """Make ``call`` what ``owner``'s attention sites see, in this thread or task, until the block ends."""
    token = _CALLS.set({**_CALLS.get(), id(owner): call})
    try:
        yield call
    finally:
        _CALLS.reset(token)


# Inputs whose first dimension is the batch, to check a routing list before any compute.
BATCH_INPUTS = ("input_ids", "pixel_values", "inputs_embeds", "attention_mask")


def check_names(names: Sequence[str | None], stores: Mapping[str, Any]) -> None:
    unknown = [n for n in names if n is not None and n not in stores]
    if unknown:
        raise ValueError(f"unknown prefix {unknown[0]!r}; this model has {sorted(stores)}")


def resolve(prefix: Any, stores: Mapping[str, Any], args: tuple, kwargs: dict) -> str | None | Routing:
    """A call's ``prefix=`` argument (a name, None, or one name per row) checked against the prefixes and the
    call's inputs: a name, None, or a `Routing`."""
    if prefix is None or isinstance(prefix, str):
        check_names([prefix], stores)
        return prefix
    names = list(prefix)
    check_names(names, stores)
    sizes = {v.shape[0] for k, v in kwargs.items() if k in BATCH_INPUTS and torch.is_tensor(v)}
    sizes |= {a.shape[0] for a in args if torch.is_tensor(a) and a.dim() > 0}
    if sizes and len(names) not in sizes:
        raise ValueError(f"the routing list has {len(names)} entries but the batch has {sorted(sizes)} rows")
    used = {n for n in names if n is not None}
    if len(set(names)) == 1:
        return names[0]
    if any(stores[n].config.position_offset for n in used):
        raise ValueError("prefixes with position_offset (PEFT adapters) cannot be mixed with others in one batch")
    if len({stores[n].config.method for n in used}) > 1:
        raise ValueError(f"soft prompts and prefixes cannot share a batch (routing {sorted(used)})")
    return Routing(names, stores)


def expansion(model: Any, kwargs: dict) -> int:
    """How many rows ``model.generate(**kwargs)`` makes of each input row (beams x returned sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    return beams * returned


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

    def prefix(self, site_name: str, batch_size: int, call: Call) -> Prefix | None:
        """Each row's prefix at one site. Without autograd (generation) it is built once per site and batch
        size for the whole call: the decoding steps reuse it."""
        rows = len(self.names)
        if batch_size not in (rows, rows * call.expansion):
            raise ValueError(
                f"a routing list of {rows} prefixes does not fit a batch of {batch_size} rows at {site_name}"
                + (f" (generation repeats each row {call.expansion} times)" if call.expansion > 1 else "")
            )
        if call.cache is None or torch.is_grad_enabled():
            return self._build(site_name, batch_size, call.cache)
        key = ("routed", site_name, batch_size)
        if key not in call.cache:
            call.cache[key] = self._build(site_name, batch_size, call.cache)
        return call.cache[key]

    def _build(self, site_name: str, batch_size: int, cache: dict | None) -> Prefix | None:
        # Rows are gathered with index_select: CPU advanced indexing (table[rows]) starts a parallel region that
        # took milliseconds per site on a busy 2-core machine, index_select microseconds.
        here = [s.has_site(site_name) and s.num_virtual_tokens > 0 for s in self.stores]
        if not any(here):
            return None
        kvs = [store.kv(site_name) if present else None for store, present in zip(self.stores, here)]
        slots = max(kv[0].shape[1] for kv in kvs if kv is not None)
        reference = next(kv[0] for kv in kvs if kv is not None)
        empty = reference.new_zeros(reference.shape[0], slots, reference.shape[2])
        keys = torch.stack([_pad(kv[0], slots) if kv else empty for kv in kvs] + [empty])
        values = torch.stack([_pad(kv[1], slots) if kv else empty for kv in kvs] + [empty])
        lengths = tuple(kv[0].shape[1] if kv else 0 for kv in kvs) + (0,)
        rows = self.rows.to(reference.device).repeat_interleave(batch_size // len(self.names))
        visible = self._visible(lengths, slots, rows, batch_size, cache)
        gates = None
        if self.gated:
            heads = max(store.gate(site_name).shape[0] for store, present in zip(self.stores, here) if present)
            closed = reference.new_zeros(heads)
            gates = torch.stack(
                [store.gate(site_name).expand(heads) if present else closed for store, present in zip(self.stores, here)]
                + [closed]
            )
        pick = lambda table: table.index_select(0, rows)  # noqa: E731
        return Prefix(pick(keys), pick(values), visible, None if gates is None else pick(gates), cache)

    def _visible(
        self, lengths: tuple[int, ...], slots: int, rows: torch.Tensor, batch_size: int, cache: dict | None
    ) -> torch.Tensor | None:
        """Which slots each row sees (None: all of them). Sites with the same prefix lengths share one tensor
        per call, so that their widened masks are built once."""
        key = ("visible", id(self), lengths, batch_size, rows.device)
        if cache is not None and key in cache:
            return cache[key]
        visible = torch.arange(slots, device=rows.device)[None] < torch.tensor(lengths, device=rows.device)[:, None]
        visible = visible.index_select(0, rows)
        visible = None if bool(visible.all()) else visible
        if cache is not None:
            cache[key] = visible
        return visible


def _pad(tensor: torch.Tensor, slots: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, 0, 0, slots - tensor.shape[1]))
