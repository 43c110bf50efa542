"""Soft prompts (``PrefixConfig(method="prompt")``, Lester et al., 2021), for comparison with prefixes.

A call through `PrefixModel` inserts ``P`` placeholder tokens into ``input_ids`` at the model's prompt column
(extending ``attention_mask``, and ``labels`` with -100 where they follow the input); a forward hook on the
token embedding then replaces the placeholders' embeddings by the trainable ones. Rows of a routed batch with
shorter prompts (or none) get masked placeholder slots in front of their prompt; where a model numbers its
positions by index, their position ids are passed so that each row keeps the positions it has alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .architectures import PromptInput, prompt_input
from .config import PrefixConfig
from .devices import execution_device
from .routing import Routing


class PromptStore(nn.Module):
    """``P`` trainable input embeddings ``[P, dim]`` (float32). It has no attention sites."""

    sites: list = []

    def __init__(self, config: PrefixConfig, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        data = torch.empty(config.num_virtual_tokens, dim, device=device)
        self.embeddings = nn.Parameter(nn.init.zeros_(data) if config.init == "zero" else data.normal_(std=config.init_std))

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def has_site(self, site_name: str) -> bool:
        return False

    def prefix(self, site_name: str, cache: dict | None = None) -> None:
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt.embeddings": self.embeddings.detach()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.embeddings.copy_(tensors["prompt.embeddings"])


class SoftPrompts:
    """The soft prompts of one wrapped model: where they go in its text input (looked up once) and the hook
    on its token embedding that puts them there. ``current_insertion`` returns the placeholders of the call
    running in this thread or task."""

    def __init__(self, model: nn.Module, current_insertion: Callable[[], Insertion | None]) -> None:
        self.where = prompt_input(model)
        self._current_insertion = current_insertion
        self._hook = self.where.embedding.register_forward_hook(self._embed)

    def new_store(self, config: PrefixConfig) -> PromptStore:
        embedding = self.where.embedding
        return PromptStore(config, embedding.embedding_dim, execution_device(embedding))

    def remove(self) -> None:
        self._hook.remove()

    def insert(
        self, kwargs: dict[str, Any], route: str | Routing, stores: Mapping[str, nn.Module], generating: bool
    ) -> tuple[dict[str, Any], Insertion | None]:
        """The call's arguments with placeholders for the soft prompts its rows use (unchanged if none)."""
        if isinstance(route, Routing):
            names, stores = route.names, route.by_name
        else:
            ids = kwargs.get("input_ids")
            if ids is None:
                raise ValueError('method="prompt" needs input_ids in the call (the prompt goes into the text input)')
            names = [route] * ids.shape[0]
        prompts = [None if n is None else stores[n] for n in names]
        if not any(isinstance(s, PromptStore) for s in prompts):
            return kwargs, None
        if self.where.positions == "fixed" and len({0 if s is None else s.num_virtual_tokens for s in prompts}) > 1:
            raise ValueError(
                "this model numbers its text positions by index alone, so soft prompts of different lengths (or "
                "rows without one) cannot share a batch; route them in separate calls"
            )
        embeddings = [None if s is None else s.embeddings for s in prompts]
        explicit = not generating and self.where.positions == "ids"
        return insert_prompts(kwargs, embeddings, self.where, explicit_positions=explicit)

    def _embed(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        insertion = self._current_insertion()
        if insertion is None or not args:
            return None
        return replace_placeholders(insertion, args[0], output)


class Insertion(NamedTuple):
    """The placeholders of one call: the ``input_ids`` holding them, each row's prompt embeddings
    ``[B, width, dim]`` and which of the ``width`` slots are prompt (True) or masked filler (False)."""

    input_ids: torch.Tensor
    embeddings: torch.Tensor
    slots: torch.Tensor
    column: int


def insert_prompts(
    kwargs: dict[str, Any], prompts: list[torch.Tensor | None], where: PromptInput, explicit_positions: bool
) -> tuple[dict[str, Any], Insertion | None]:
    """New call arguments with placeholder columns for ``prompts`` (one per row, None for no prompt)."""
    ids = kwargs.get("input_ids")
    if ids is None:
        raise ValueError('method="prompt" needs input_ids in the call (the prompt goes into the text input)')
    if kwargs.get("position_ids") is not None:
        raise ValueError('method="prompt" numbers positions itself; call without position_ids')
    lengths = torch.tensor([0 if p is None else p.shape[0] for p in prompts], device=ids.device)
    width, batch, column = int(lengths.max()), ids.shape[0], where.column
    if width == 0:
        return kwargs, None
    slots = torch.arange(width, device=ids.device)[None] >= (width - lengths)[:, None]
    dim = next(p for p in prompts if p is not None).shape[-1]
    embeddings = torch.stack(
        [torch.nn.functional.pad(p, (0, 0, width - p.shape[0], 0)) if p is not None else ids.new_zeros(width, dim, dtype=torch.float32) for p in prompts]
    )

    def insert(tensor: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor[:, :column], filler, tensor[:, column:]], dim=1)

    out = dict(kwargs)
    out["input_ids"] = insert(ids, ids.new_full((batch, width), where.filler_id))
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    out["attention_mask"] = insert(mask, slots.to(mask.dtype))
    for name in where.aligned:  # e.g. token_type_ids, Mllama's cross_attention_mask: the prompt gets zeros
        aligned = kwargs.get(name)
        if torch.is_tensor(aligned) and aligned.shape[:2] == ids.shape:
            out[name] = insert(aligned, aligned.new_zeros(batch, width, *aligned.shape[2:]))
    labels = kwargs.get("labels")
    if where.labels_follow_input and labels is not None:
        out["labels"] = insert(labels, labels.new_full((batch, width), -100))
    if explicit_positions and not slots.all():
        # Each row as if alone: filler slots take no position.
        kept = insert(torch.ones_like(ids), slots.long())
        out["position_ids"] = (kept.cumsum(1) - 1).clamp(min=0)
    return out, Insertion(out["input_ids"], embeddings, slots, column)


def remove_placeholders(insertion: Insertion, sequences: torch.Tensor) -> torch.Tensor:
    """Generated sequences without the placeholder columns, where they start with the inserted input
    (decoder-only models return their input); other outputs unchanged."""
    reference, column = insertion.input_ids, insertion.column
    end = column + insertion.slots.shape[1]
    if sequences.shape[1] < end or sequences.shape[0] % reference.shape[0]:
        return sequences
    repeat = sequences.shape[0] // reference.shape[0]
    if not torch.equal(sequences[:, :end], reference[:, :end].repeat_interleave(repeat, dim=0).to(sequences)):
        return sequences
    return torch.cat([sequences[:, :column], sequences[:, end:]], dim=1)


def replace_placeholders(insertion: Insertion, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor | None:
    """The token embeddings with prompt vectors in the placeholder slots, if ``ids`` are the inserted ones
    (possibly repeated for beams); None otherwise (a later decoding step, another input)."""
    reference, column = insertion.input_ids, insertion.column
    width = insertion.slots.shape[1]
    end = column + width
    if ids.dim() != 2 or ids.shape[1] < end or ids.shape[0] % reference.shape[0]:
        return None
    repeat = ids.shape[0] // reference.shape[0]
    if not torch.equal(ids[:, :end], reference[:, :end].repeat_interleave(repeat, dim=0)):
        return None
    prompts = insertion.embeddings.repeat_interleave(repeat, dim=0).to(embedded.dtype)
    slots = insertion.slots.repeat_interleave(repeat, dim=0)[..., None]
    middle = torch.where(slots, prompts, embedded[:, column:end])
    return torch.cat([embedded[:, :column], middle, embedded[:, end:]], dim=1)
