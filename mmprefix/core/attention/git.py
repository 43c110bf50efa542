"""Replacement ``forward`` for GIT's hand-written text attention (``GitSelfAttention``), which never reaches the
attention interface.

GIT runs one transformer over ``[image tokens; text]``: image tokens attend to each other, text causally to the
image and the text before it, all through one additive mask that ``GitModel`` builds. Like ``attention/blip.py``,
the replacement computes queries, keys and values as GIT does (including the cache update) and attends through
``mechanism.attend`` with SDPA; without a prefix it runs GIT's own code, so a disabled prefix is bit-exact. A
gated prefix or a memory takes the same SDPA call and adds its term (so a closed gate or an empty memory equals
GIT's output to float rounding), for the reason given in ``attention/blip.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from .mechanism import heads, sdpa_with_prefix


def text_attention(
    self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None, **kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """``GitSelfAttention.forward`` with a prefix."""
    hook = self._mmprefix
    prefix = hook.prefix(hidden_states.shape[0])

    def original() -> tuple[torch.Tensor, Any]:
        return type(self).forward(self, hidden_states, attention_mask, cache, **kwargs)

    if prefix is None and not hook.capturing:
        return original()
    head_dim = self.attention_head_size
    query = heads(self.query(hidden_states), head_dim)
    key, value = heads(self.key(hidden_states), head_dim), heads(self.value(hidden_states), head_dim)
    if hook.capturing:
        hook.observe(key, value)
    if prefix is None:
        return original()
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    output = sdpa_with_prefix(self, prefix, query, key, value, attention_mask, head_dim**-0.5)
    return output.flatten(2), None
