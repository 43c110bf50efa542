"""Replacement ``forward`` methods for the attention in open_clip models: ``torch.nn.MultiheadAttention``
(open_clip's default blocks, CoCa's decoder and attention pooler) and open_clip's own ``Attention``
(``CustomResidualAttentionBlock``: qk-norm, head scaling, inner norm).

Like ``attention/blip.py``, each projects queries, keys and values with the module's frozen weights and attends
through ``mechanism.attend`` with SDPA; without a prefix it runs the module's own code (bit-exact), and a gated
prefix or a memory adds its term to that code's output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .mechanism import added_attention, attend, heads, project


def check_mha(module: nn.MultiheadAttention) -> None:
    """Refuse variants whose attention is not a plain softmax over projected keys."""
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("mmprefix does not support nn.MultiheadAttention with add_bias_kv or add_zero_attn")


def check_attention(module: nn.Module) -> None:
    """Refuse open_clip's scaled cosine attention (its logits are not scaled dot products)."""
    if getattr(module, "logit_scale", None) is not None and getattr(module, "scaled_cosine", False):
        raise ValueError("mmprefix does not support open_clip's scaled cosine attention (scaled_cosine_attn=True)")


def additive_mask(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads_: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """torch's MHA masks (bool: True = masked, or float additive; ``[L, S]`` or ``[B*H, L, S]``, plus a
    ``[B, S]`` key padding mask) as one additive ``[B, H or 1, L, S]`` mask."""
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        mask = mask.view(batch, heads_, *mask.shape[-2:]) if mask.dim() == 3 else mask[None, None]
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, dtype)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def mha_attention(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, Any]:
    """``nn.MultiheadAttention.forward`` with a prefix (batch-first or not; shared or separate projections)."""
    hook = self._mmprefix

    def original() -> tuple[torch.Tensor, Any]:
        return type(self).forward(
            self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )

    batch = query.shape[0] if self.batch_first else query.shape[1]
    prefix = hook.prefix(batch)
    if prefix is None and not hook.capturing:
        return original()
    q_in, k_in, v_in = (x if self.batch_first else x.transpose(0, 1) for x in (query, key, value))
    if self._qkv_same_embed_dim:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
    b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
    q = heads(F.linear(q_in, w_q, b_q), self.head_dim)
    k = heads(F.linear(k_in, w_k, b_k), self.head_dim)
    v = heads(F.linear(v_in, w_v, b_v), self.head_dim)
    if hook.capturing:
        hook.observe(k, v)
    if prefix is None:
        return original()
    if prefix.outside:
        output, weights = original()
        added = project(self.out_proj, added_attention(q, prefix, None).flatten(2))
        return output + (added if self.batch_first else added.transpose(0, 1)), weights
    mask = additive_mask(attn_mask, key_padding_mask, q.shape[0], self.num_heads, q.dtype)
    output, _ = attend(
        self, sdpa_attention_forward, prefix, q, k, v, mask,
        dropout=self.dropout if self.training else 0.0, is_causal=is_causal,
    )
    output = self.out_proj(output.flatten(2))
    return (output if self.batch_first else output.transpose(0, 1)), None


def open_clip_attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's ``Attention.forward`` (qk-norm, head scaling, inner norm) with a prefix."""
    hook = self._mmprefix
    prefix = hook.prefix(x.shape[0])
    if prefix is None and not hook.capturing:
        return type(self).forward(self, x, attn_mask)
    batch, length, width = x.shape
    q, k, v = (heads(t, self.head_dim) for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
    q, k = self.ln_q(q), self.ln_k(k)
    if hook.capturing:
        hook.observe(k, v)
    if prefix is None:
        return type(self).forward(self, x, attn_mask)
    if prefix.outside:
        if not isinstance(self.ln_inner, nn.Identity):
            raise ValueError("gated and memory prefixes need open_clip attention without an inner norm "
                             "(scale_attn_inner=False)")
        added = added_attention(q, prefix, self.scale)
        if self.head_scale is not None:
            added = added * self.head_scale.transpose(0, 1)
        return type(self).forward(self, x, attn_mask) + project(self.out_proj, added.flatten(2))
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, q.dtype)
        mask = mask.reshape(batch, self.num_heads, length, length) if mask.dim() == 3 else mask[None, None]
    output, _ = attend(
        self, sdpa_attention_forward, prefix, q, k, v, mask,
        scaling=self.scale, dropout=self.attn_drop.p if self.training else 0.0, is_causal=False,
    )
    if self.head_scale is not None:
        output = output * self.head_scale.transpose(0, 1)  # [heads, 1, 1] -> per head of [B, L, heads, d]
    return self.out_drop(self.out_proj(self.ln_inner(output.reshape(batch, length, width))))
