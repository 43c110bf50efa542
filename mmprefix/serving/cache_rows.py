"""The key/value cache of a running batch as plain tensors, so that rows can join and leave between steps.

Self-attention keys and values are ``[rows, kv_heads, length, head_dim]`` per layer, each row's tokens at the
right end (left padding) with ``mask`` ``[rows, length]`` marking its real ones; rows that join are padded on
the left to the batch's length (or the batch to theirs), rows that leave are dropped and columns that no
remaining row uses are cut. Positions never come from a column's index: the decoding loop gives each row its
own position ids, so padding changes neither RoPE nor absolute position embeddings. Cross-attention (BLIP's
text decoder) keeps each row's encoder keys and values, padded on the right, with ``cross_mask``.

`to_cache` and `from_cache` convert to and from transformers' `DynamicCache` / `EncoderDecoderCache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) per layer


@dataclass
class CacheRows:
    """The cache of some rows (see the module docstring). ``mask``/``cross_mask``: bool, True = a real token."""

    layers: Pairs
    mask: torch.Tensor
    cross: Pairs | None = None
    cross_mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def padded(self) -> bool:
        """Whether some row has padding (else masks can be left out, as a lone request runs)."""
        return not bool(self.mask.all())

    def cross_padded(self) -> bool:
        return self.cross_mask is not None and not bool(self.cross_mask.all())

    def select(self, rows: Sequence[int]) -> CacheRows:
        """These rows only, in this order, without the columns none of them uses."""
        index = torch.tensor(list(rows), device=self.mask.device)
        mask = self.mask[index]
        start = int(mask.any(0).long().argmax()) if mask.numel() else 0  # the first column some row uses
        layers = [(k[index, :, start:], v[index, :, start:]) for k, v in self.layers]
        cross, cross_mask = None, None
        if self.cross is not None:
            cross_mask = self.cross_mask[index]
            end = int(cross_mask.any(0).nonzero().max()) + 1
            cross, cross_mask = [(k[index, :, :end], v[index, :, :end]) for k, v in self.cross], cross_mask[:, :end]
        return CacheRows(layers, mask[:, start:], cross, cross_mask)

    def appended(self, layers: Pairs) -> CacheRows:
        """These rows after a step: ``layers`` hold one more column, a real token for every row."""
        mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return CacheRows(layers, mask, self.cross, self.cross_mask)


def merge(parts: Sequence[CacheRows]) -> CacheRows:
    """The rows of ``parts`` in one cache, in order."""
    if len(parts) == 1:
        return parts[0]
    length = max(part.length for part in parts)
    layers = [_cat([_left(part.layers[i], length - part.length) for part in parts]) for i in range(len(parts[0].layers))]
    mask = torch.cat([functional.pad(part.mask, (length - part.length, 0)) for part in parts])
    if parts[0].cross is None:
        return CacheRows(layers, mask)
    width = max(part.cross_mask.shape[1] for part in parts)
    cross = [_cat([_right(part.cross[i], width - part.cross_mask.shape[1]) for part in parts])
             for i in range(len(parts[0].cross))]
    cross_mask = torch.cat([functional.pad(part.cross_mask, (0, width - part.cross_mask.shape[1])) for part in parts])
    return CacheRows(layers, mask, cross, cross_mask)


def _left(pair: tuple[torch.Tensor, torch.Tensor], columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pair if columns == 0 else tuple(functional.pad(t, (0, 0, columns, 0)) for t in pair)


def _right(pair: tuple[torch.Tensor, torch.Tensor], columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pair if columns == 0 else tuple(functional.pad(t, (0, 0, 0, columns)) for t in pair)


def _cat(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([k for k, _ in pairs]), torch.cat([v for _, v in pairs])


def to_cache(rows: CacheRows) -> DynamicCache | EncoderDecoderCache:
    """A transformers cache holding these rows (an `EncoderDecoderCache` when there is cross-attention)."""
    cache = _dynamic(rows.layers)
    if rows.cross is None:
        return cache
    return EncoderDecoderCache(cache, _dynamic(rows.cross))


def _dynamic(pairs: Pairs) -> DynamicCache:
    """A `DynamicCache` whose layers hold these tensors themselves (filling it through ``update`` would copy them
    all at every step)."""
    cache = DynamicCache()
    for keys, values in pairs:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def from_cache(cache: DynamicCache | EncoderDecoderCache) -> tuple[Pairs, Pairs | None]:
    """``(self-attention pairs, cross-attention pairs or None)`` of a transformers cache of full-attention
    layers; anything else (sliding windows, quantized or static layers) is a ValueError."""
    if isinstance(cache, EncoderDecoderCache):
        return from_cache(cache.self_attention_cache)[0], from_cache(cache.cross_attention_cache)[0]
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ValueError(f"step-level batching needs full-attention cache layers, this model's cache has {sorted(kinds)}")
    return [(layer.keys, layer.values) for layer in cache.layers], None


def start_rows(cache: DynamicCache | EncoderDecoderCache, rows: int) -> CacheRows:
    """The cache a prefill of ``rows`` unpadded rows made, as `CacheRows`."""
    layers, cross = from_cache(cache)
    device = layers[0][0].device
    mask = torch.ones(rows, layers[0][0].shape[2], dtype=torch.bool, device=device)
    cross_mask = None if cross is None else torch.ones(rows, cross[0][0].shape[2], dtype=torch.bool, device=device)
    return CacheRows(layers, mask, cross, cross_mask)
