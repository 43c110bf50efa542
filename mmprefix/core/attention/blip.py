"""Replacement ``forward`` methods for BLIP's hand-written attention, which never reaches the interface.

Each computes queries, keys and values exactly as transformers' BLIP does (including the text attention's
cache handling) and then attends through ``mechanism.attend`` with SDPA. Without a prefix for the current call
they run BLIP's own code, so a disabled prefix gives the original outputs bit for bit. A gated prefix or a
memory takes the same SDPA call and adds its term: BLIP's own eager attention, run beside the term, made the VQA
recipe's memory prefix a third slower than the plain prefix. A closed gate or an empty memory therefore equals
BLIP's output to float rounding (SDPA against BLIP's matmul and softmax), not bit for bit.

BLIP's cross-attention reads ``encoder_attention_mask``, which ``BlipTextAttention`` never passes, so the
image mask is always ignored upstream; the replacement keeps that behaviour so that outputs match the model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import EncoderDecoderCache

from .mechanism import heads, sdpa_with_prefix


def vision_attention(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``BlipAttention.forward`` with a prefix: fused qkv projection, no mask."""
    hook = self._mmprefix
    prefix = hook.prefix(hidden_states.shape[0])
    if prefix is None and not hook.capturing:
        return type(self).forward(self, hidden_states, **kwargs)
    batch, length, width = hidden_states.shape
    query, key, value = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    if hook.capturing:
        hook.observe(key, value)
    if prefix is None:
        return type(self).forward(self, hidden_states, **kwargs)
    output = sdpa_with_prefix(self, prefix, query, key, value, None, self.scale)
    return self.projection(output.reshape(batch, length, width)), None


def text_attention(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """``BlipTextSelfAttention.forward`` (self- or cross-attention, with its cache logic) with a prefix."""
    hook = self._mmprefix
    prefix = hook.prefix(hidden_states.shape[0])

    def original() -> tuple[torch.Tensor, Any]:
        return type(self).forward(
            self,
            hidden_states,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            cache=cache,
            **kwargs,
        )

    if prefix is None and not hook.capturing:
        return original()
    head_dim = self.attention_head_size
    is_cross = encoder_hidden_states is not None
    if hook.capturing:
        source = encoder_hidden_states if is_cross else hidden_states
        hook.observe(*(heads(proj(source), head_dim) for proj in (self.key, self.value)))
    query = heads(self.query(hidden_states), head_dim)
    if prefix is None:
        return original()

    mask = encoder_attention_mask if is_cross else attention_mask
    layer_cache, reuse = cache, False
    if isinstance(cache, EncoderDecoderCache):
        reuse = is_cross and cache.is_updated.get(self.layer_idx)
        layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
    if reuse:
        key = layer_cache.layers[self.layer_idx].keys
        value = layer_cache.layers[self.layer_idx].values
    else:
        source = encoder_hidden_states if is_cross else hidden_states
        key, value = heads(self.key(source), head_dim), heads(self.value(source), head_dim)
        if cache is not None:
            key, value = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)
            if is_cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True

    output = sdpa_with_prefix(self, prefix, query, key, value, mask, head_dim**-0.5)
    return output.flatten(2), None
