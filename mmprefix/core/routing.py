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
from collections.abc import Container, Iterator, Mapping, Sequence
from typing import Any

import torch

from .attention import Prefix
from .attention.memory import Memory
from .families import UNMAPPED
from .media import CallMedia
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
    store: Any = None  # the prefix store of a call routed to one name, looked up once per call
    disabled: bool = False
    insertion: Any = None  # the soft-prompt placeholders of this call (prompt.Insertion)
    expansion: int = 1  # generation repeats each row this many times (beams x returned sequences)
    cache: dict | None = None  # built routed prefixes and widened masks; None outside a call
    captured: dict | None = None  # keys and values recorded for a text initialisation
    media: CallMedia | None = None  # a routed call's images (videos, audio), for the towers that see them
    condition: Any = None  # image features for image-conditioned prefixes (conditioning.Condition)

    def open(self, **changes: Any) -> Call:
        """A call inside this scope: the scope's routing, the changes, and a fresh cache."""
        return dataclasses.replace(self, cache={}, **changes)


_CALLS: contextvars.ContextVar[dict[int, Call]] = contextvars.ContextVar("mmprefix_calls", default={})
_OUTSIDE = Call()


def route_of(call: Call, active: str | None) -> Any:
    """What ``call`` routes to: its own route, or (``ACTIVE``) the model's ``active`` prefix."""
    return active if call.route is ACTIVE else call.route


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


def resolve(prefix: Any, stores: Mapping[str, Any], args: tuple, kwargs: dict,
            held: Container[Any] = ()) -> str | None | PrefixStore | Routing:
    """A call's ``prefix=`` argument (a name, None, a held store, or one of those per row) checked against the
    prefixes and the call's inputs: a name, None, a store, or a `Routing`. ``held``: the stores that calls may
    name by the store itself (``PrefixModel.hold``), even once their name is gone."""
    if prefix is None or isinstance(prefix, str):
        check_names([prefix], stores)
        return prefix
    if isinstance(prefix, PrefixStore):
        return _check_held(prefix, held)
    entries = list(prefix)
    table = dict(stores)
    names = []
    for entry in entries:  # a held store gets a key of its own: its name may have gone or serve another store
        if isinstance(entry, PrefixStore):
            _check_held(entry, held)
            table[f"<held {id(entry):x}>"] = entry
            entry = f"<held {id(entry):x}>"
        names.append(entry)
    check_names([n for n, e in zip(names, entries) if not isinstance(e, PrefixStore)], stores)
    sizes = {v.shape[0] for k, v in kwargs.items() if k in BATCH_INPUTS and torch.is_tensor(v)}
    sizes |= {a.shape[0] for a in args if torch.is_tensor(a) and a.dim() > 0}
    if sizes and len(names) not in sizes:
        raise ValueError(f"the routing list has {len(names)} entries but the batch has {sorted(sizes)} rows")
    used = {n for n in names if n is not None}
    if len(set(names)) == 1:
        return entries[0]
    if any(table[n].config.position_offset for n in used):
        raise ValueError("prefixes with position_offset (PEFT adapters) cannot be mixed with others in one batch")
    methods = {table[n].config.method for n in used}
    if "prompt" in methods and len(methods) > 1:
        raise ValueError(f"soft prompts and prefixes cannot share a batch (routing {sorted(used)})")
    return Routing(names, table)


def _check_held(store: PrefixStore, held: Container[Any]) -> PrefixStore:
    if store not in held:
        raise ValueError("a PrefixStore routes a call only when its model holds it: use PrefixModel.hold(name)")
    return store


def expansion(model: Any, kwargs: dict) -> int:
    """How many rows ``model.generate(**kwargs)`` makes of each input row (beams x returned sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    return beams * returned


def check_routable(route: Any, family: Any, model: Any) -> None:
    """Towers where one call cannot give its rows different prefixes (``Family.unroutable``) are an error
    before any compute."""
    if not isinstance(route, Routing) or family is None:
        return
    towers = {site.tower for store in route.stores for site in store.sites}
    lazy = {t for m in family.media if m.layout == UNMAPPED for t in m.towers}  # refused by the calls that feed it
    for tower, why in family.unroutable:
        if tower in towers and tower not in lazy:
            raise ValueError(
                f"per-row routing cannot reach the {tower!r} tower of {type(model).__name__} ({why}); give that "
                "tower one prefix per call, or route prefixes that target the other towers"
            )


def record_chunks(owner: Any, site_name: str, module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a packed tower's attention (``owner``: its `PrefixModel`): the module attends once
    per chunk of ``cu_seqlens`` (an image, a frame, a window), in order; a routed call gives each chunk its row's
    prefix (``PrefixModel.prefix_for`` takes them one by one)."""
    call = current(owner)
    route = route_of(call, owner.active_prefix)
    if call.cache is None or call.disabled or not isinstance(route, Routing) or not route.reaches(site_name):
        return
    cu_seqlens = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
    # The layers of a tower share one cu_seqlens tensor (windowed layers another): their rows are worked out once
    key = ("chunk rows", id(cu_seqlens))  # the cache holds the tensor: its id is not reused while cached
    known = call.cache.get(key)
    if known is None or known[0] is not cu_seqlens:
        known = (cu_seqlens, call.media.chunk_rows(site_name, cu_seqlens, call.expansion))
        call.cache[key] = known
    call.cache[("chunks", site_name)] = iter(known[1])


def tower_starts(owner: Any, tower: str, module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a tower that several inputs feed (Qwen-VL's images, then its videos): which one it
    runs now, from the size of its batch (its first tensor argument)."""
    call = current(owner)
    if call.media is None or call.cache is None:
        return
    first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
    if first is not None:
        call.media.enter(tower, first.shape[0], call.expansion)


class Routing:
    """The prefix names of the rows of one batch."""

    def __init__(self, names: Sequence[str | None], stores: Mapping[str, PrefixStore]) -> None:
        self.names = list(names)
        self.used = sorted({n for n in self.names if n is not None})
        self.stores = [stores[n] for n in self.used]
        self.by_name = dict(zip(self.used, self.stores))
        gated = {store.config.gate is not None for store in self.stores}
        if len(gated) > 1:
            raise ValueError(
                f"gated and ungated prefixes cannot share a batch (routing {self.used}); route them in separate calls"
            )
        self.gated = gated == {True}
        # Rows without a prefix point one past the used prefixes, at an all-masked entry.
        self.rows = [self.used.index(n) if n is not None else len(self.used) for n in self.names]

    def reaches(self, site_name: str) -> bool:
        """Whether any of the routed prefixes has slots at this site."""
        return any(store.has_site(site_name) and store.num_virtual_tokens > 0 for store in self.stores)

    def prefix(self, site_name: str, batch_size: int, call: Call, chunk_row: int | None = None) -> Prefix | None:
        """Each row's prefix at one site; ``chunk_row``: the text row of a packed tower's current chunk. Without
        autograd (generation) it is built once per site and batch for the whole call: the decoding steps reuse
        it, without working out the rows again."""
        cacheable = call.cache is not None and not torch.is_grad_enabled()
        # the size, the chunk and the input a tower runs (images, then videos) determine the rows within a call
        running = call.media.running_input(site_name) if call.media is not None else None
        key = ("routed", site_name, (batch_size, chunk_row, running))
        if cacheable and key in call.cache:
            return call.cache[key]
        # a site no routed prefix reaches needs no rows (for a packed tower they may not be known)
        prefix = (self._build(site_name, self._batch_rows(site_name, batch_size, call, chunk_row), call.cache)
                  if self.reaches(site_name) else None)
        if cacheable:
            call.cache[key] = prefix
        return prefix

    def row_stores(self, site_name: str, batch_size: int, call: Call) -> list[PrefixStore | None]:
        """The prefix store of each of the ``batch_size`` rows this site sees (None: no prefix)."""
        stores = self.stores + [None]
        return [stores[self.rows[row]] for row in self._batch_rows(site_name, batch_size, call, None)]

    def _batch_rows(self, site_name: str, batch_size: int, call: Call, chunk_row: int | None) -> list[int]:
        """The text row of each of the ``batch_size`` rows this site sees."""
        rows = len(self.names)
        if chunk_row is not None:
            return [chunk_row]
        if call.media is not None and call.media.sees_media(site_name):  # images, tiles or frames, never rows
            return call.media.batch_rows(site_name, batch_size, call.expansion)
        if batch_size in (rows, rows * call.expansion):
            return [row for row in range(rows) for _ in range(batch_size // rows)]
        raise ValueError(
            f"a routing list of {rows} prefixes does not fit a batch of {batch_size} rows at {site_name}"
            + (f" (generation repeats each row {call.expansion} times)" if call.expansion > 1 else "")
        )

    def _build(self, site_name: str, batch_rows: list[int], cache: dict | None) -> Prefix:
        rows = [self.rows[row] for row in batch_rows]
        here = [s.has_site(site_name) and s.num_virtual_tokens > 0 for s in self.stores]  # some, by `reaches`
        memory = [store.config.method == "memory" for store in self.stores]
        # Slots inside the softmax and memory slots read outside it are two tables; a row has slots in one at most
        slots = self._table(site_name, rows, [p and not m for p, m in zip(here, memory)], cache)
        read = self._table(site_name, rows, [p and m for p, m in zip(here, memory)], cache)
        gates = None
        if self.gated:
            heads = max(store.gate(site_name).shape[0] for store, present in zip(self.stores, here) if present)
            closed = slots[0].new_zeros(heads)
            gated = [store.gate(site_name).expand(heads) if present else closed for store, present in zip(self.stores, here)]
            gates = torch.stack([(gated + [closed])[row] for row in rows])
        keys, values, visible = slots or (None, None, None)
        return Prefix(keys, values, visible, gates, cache, Memory(*read) if read is not None else None)

    def _table(self, site_name: str, rows: list[int], members: list[bool], cache: dict | None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Keys, values ``[batch, kv_heads, slots, head_dim]`` and visibility of the member stores' slots at one
        site, for the batch rows' stores ``rows``; rows of other stores see only masked slots. None: no member
        has slots here."""
        # Each table is one stack of the rows' own tensors: few small ops per site, because on a busy CPU every
        # op costs far more than its arithmetic (advanced indexing, table[rows], took milliseconds per site).
        if not any(members):
            return None
        kvs = [store.kv(site_name) if member else None for store, member in zip(self.stores, members)]
        slots = max(kv[0].shape[1] for kv in kvs if kv is not None)
        reference = next(kv[0] for kv in kvs if kv is not None)
        blank = any(row == len(kvs) or kvs[row] is None for row in rows)  # a row that sees no slot here
        empty = reference.new_zeros(reference.shape[0], slots, reference.shape[2]) if blank else None

        def table(tensors: list[torch.Tensor | None]) -> torch.Tensor:
            entries = [empty if t is None else _pad(t, slots) for t in tensors] + [empty]
            return torch.stack([entries[row] for row in rows])

        lengths = tuple(kv[0].shape[1] if kv else 0 for kv in kvs) + (0,)
        visible = self._visible(lengths, slots, rows, reference.device, cache)
        return table([kv[0] if kv else None for kv in kvs]), table([kv[1] if kv else None for kv in kvs]), visible

    def _visible(
        self, lengths: tuple[int, ...], slots: int, rows: list[int], device: torch.device, cache: dict | None,
    ) -> torch.Tensor | None:
        """Which slots each row sees (None: all of them). Sites with the same prefix lengths and rows share one
        tensor per call, so that their widened masks are built once. (Keyed by the rows, not the batch size: a
        vision tower's two images of one row and a language model's two rows have the same size.)"""
        key = ("visible", id(self), lengths, tuple(rows), device)
        if cache is not None and key in cache:
            return cache[key]
        seen = [[slot < lengths[row] for slot in range(slots)] for row in rows]
        visible = None if all(map(all, seen)) else torch.tensor(seen, device=device)
        if cache is not None:
            cache[key] = visible
        return visible


def _pad(tensor: torch.Tensor, slots: int) -> torch.Tensor:
    if tensor.shape[1] == slots:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, 0, slots - tensor.shape[1]))
