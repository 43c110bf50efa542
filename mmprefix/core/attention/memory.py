"""The decoupled prefix (``PrefixConfig(method="memory")``, Prefix-Tuning+ / PrefixMemory-Tuning, Wang et al.).

A plain prefix competes with the input inside one softmax: a long input dilutes it, a long prefix drowns the
input. The memory prefix leaves the attention call untouched and adds, for each query ``q``, a read of ``P``
trainable memory slots (keys ``K``, values ``V`` per key/value head) through a kernel feature map ``phi``:

    out(q) = attention(q, keys, values) + sum_j phi(q)·phi(k_j) v_j / sum_j phi(q)·phi(k_j)

Choices, and why:

* ``phi(x) = elu(x) + 1`` (the linear-attention map of Katharopoulos et al., 2020), applied to ``q`` and ``k``
  each scaled by the square root of the site's attention scaling, so that ``phi(q)·phi(k)`` grows with the same
  ``q·k * scaling`` a softmax logit does. It is strictly positive: the normaliser never vanishes or changes sign,
  and every slot's weight is a fraction.
* normalised over the memory slots alone: the term is a weighted mean of the memory values, so its size is
  bounded by the largest value whatever the query's size, the number of slots or the input's length (the
  input never competes with it), and a learning rate carries over from one memory size to another.
* computed in float32 whatever the model's dtype, then cast: ``phi(q)·phi(k)`` sums ``head_dim`` products of
  activations and overflows float16 for large queries, while the bounded result fits any dtype its values fit.
* one matrix product per site: ``phi(K)^T [V | 1]`` (``head_dim x (head_dim + 1)`` per head) is formed first,
  so the cost does not grow with ``P`` and numerator and normaliser come out of the same product.

The term depends on the query alone, so each new query of a cached generation step gets it exactly once, as in a
full recompute. With the values at zero the term is exactly zero and the model equals the base model bit for bit
(to float rounding on BLIP's and GIT's hand-written attention, which mmprefix runs through SDPA).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

# A normaliser below this is an all-invisible row (a routed row without memory): its read is zero.
TINY = torch.finfo(torch.float32).tiny


class Memory(NamedTuple):
    """The memory one attention call reads: keys and values ``[B or 1, kv_heads, P, head_dim]`` (float32 or the
    store's dtype) and which slots each row reads (``[B, P]`` bool; None: all)."""

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor | None = None


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``: positive, equal to ``x + 1`` for ``x > 0`` and ``exp(x)`` below."""
    return F.elu(x) + 1


def memory_read(query: torch.Tensor, memory: Memory, scaling: float | None) -> torch.Tensor:
    """The memory term for queries ``[B, heads, T, head_dim]``, as ``[B, T, heads, head_dim]`` in the query's
    dtype (the layout of an attention function's output)."""
    heads, dim = query.shape[1], query.shape[-1]
    root = ((dim**-0.5) if scaling is None else scaling) ** 0.5
    keys = feature_map(memory.keys.float() * root)
    if memory.visible is not None:  # slots a row must not read weigh nothing in numerator and normaliser
        keys = keys * memory.visible[:, None, :, None].to(keys.device)
    values = memory.values.float()
    values = torch.cat([values, torch.ones_like(values[..., :1])], dim=-1)
    table = keys.transpose(-1, -2) @ values  # [B or 1, kv_heads, head_dim, head_dim + 1]
    if table.shape[1] != heads:  # grouped-query attention: query heads share their key/value head's memory
        table = table.repeat_interleave(heads // table.shape[1], dim=1)
    read = feature_map(query.float() * root) @ table.to(query.device)
    term = read[..., :-1] / read[..., -1:].clamp_min(TINY)
    return term.to(query.dtype).transpose(1, 2)
