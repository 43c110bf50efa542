"""The per-site mechanism: prefix keys and values prepended inside one attention call.

An attention module that goes through transformers' attention interface asks its ``config`` which attention
implementation to call. mmprefix gives each targeted module a read-through view of its config that names
``"mmprefix"`` instead; the ``"mmprefix"`` function looks up the current prefix for that module and calls the
model's real implementation (``sdpa`` or ``eager``) on ``[prefix; keys]``, ``[prefix; values]`` with the mask
widened to match. The call happens after RoPE and after the KV-cache update, so prefixes are never rotated,
never enter the cache, and follow beam reordering and left padding for free. The model-level mask is built
from the untouched config, so its format is the one the real implementation expects.

Hand-written attention modules (BLIP, open_clip) get a replacement ``forward`` (``attention/blip.py``,
``attention/open_clip.py``) that computes queries, keys and values the same way and then calls ``attend``
like the interface route does. Which modules take which route is ``attention.ROUTES``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, Protocol

import torch
from accelerate.utils import align_module_device
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..architectures import Site
from .memory import Memory, memory_read

ATTENTION_NAME = "mmprefix"
MASKS_KEPT = 64  # widened masks one call keeps (a step of generation makes one per kind of mask: self, cross)
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


class Prefix(NamedTuple):
    """The prefix one attention call sees: keys and values ``[B or 1, kv_heads, P, head_dim]`` (None when the
    call has only a memory), which slots each row may attend to (``[B, P]`` bool; None when every slot is
    visible to every row), for gated prefixes the gate of each row (``[B or 1, 1 or heads]``), the current
    call's cache (a dict that lives for one call of the model, or None: every layer of a call widens the same
    mask the same way, so the widened mask is made once per call), and the memory read outside the softmax
    (``method="memory"``, see `mmprefix.core.attention.memory`)."""

    keys: torch.Tensor | None
    values: torch.Tensor | None
    visible: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    cache: dict | None = None
    memory: Memory | None = None

    @property
    def outside(self) -> bool:
        """Whether the attention runs over the input alone and the prefix only adds to its output (a gated
        prefix, a memory): `attend` then runs the attention untouched and adds `added_attention` (bit-exact
        where that attention is the model's own; BLIP's and GIT's hand-written routes run SDPA instead)."""
        return self.keys is None or self.gate is not None


class PrefixSource(Protocol):
    """Where attention sites get their prefix for the current call (a `PrefixModel`)."""

    capturing: bool  # True while activations are recorded for a text initialisation

    def prefix_for(self, site_name: str, batch_size: int) -> Prefix | None: ...

    def observe(self, site_name: str, keys: torch.Tensor, values: torch.Tensor) -> None: ...


class PrefixedConfig:
    """Read-through view of an attention module's config that names mmprefix's attention function."""

    _attn_implementation = ATTENTION_NAME

    def __init__(self, config: Any) -> None:
        self.__dict__["config"] = config

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is None:  # during copy/unpickling, before __init__ state exists
            raise AttributeError(name)
        return getattr(config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.config, name, value)


class SiteHook:
    """What an attention module carries while it has a prefix: its site, where to find the current prefix,
    and how to reach its original attention."""

    def __init__(self, site: Site, source: PrefixSource, module: nn.Module, replaced: Callable | None = None) -> None:
        self.site = site
        self.source = source
        self.replaced = replaced  # the forward a replacement route took the place of (None: the class's own)
        # "eager" is not in the global registry: each modeling file has its own eager function.
        modeling = sys.modules.get(type(module).__module__)
        self.eager = getattr(modeling, "eager_attention_forward", sdpa_attention_forward)
        self._functions: dict[str, Callable] = {}  # looked up once per implementation, not per call

    def prefix(self, batch_size: int) -> Prefix | None:
        return self.source.prefix_for(self.site.name, batch_size)

    @property
    def capturing(self) -> bool:
        return self.source.capturing

    def observe(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.source.observe(self.site.name, keys, values)

    def original_attention(self, module: nn.Module, cache: dict | None = None) -> Callable:
        """The model's own attention function (its config's implementation); with a call's ``cache``, read
        once per call from each config (a config attribute costs microseconds in transformers 5; the layers of
        a tower share one config) and for each modeling file's eager function."""
        if cache is not None:
            key = ("attention", id(module.config.config), self.eager)
            function = cache.get(key)
            if function is None:
                function = cache[key] = self.original_attention(module)
            return function
        implementation = module.config.config._attn_implementation
        function = self._functions.get(implementation)
        if function is None:
            if implementation not in SUPPORTED_IMPLEMENTATIONS:
                raise ValueError(unsupported_implementation(implementation))
            function = self._functions[implementation] = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, self.eager)
        return function


def unsupported_implementation(implementation: str | None) -> str:
    return (
        f"mmprefix prefixes need attn_implementation 'sdpa' or 'eager', but the model uses {implementation!r}; "
        "call model.set_attn_implementation('sdpa') (or load it with attn_implementation='sdpa')"
    )


def widen_mask(
    mask: torch.Tensor | None,
    prefix: Prefix,
    query: torch.Tensor,
    kv_len: int,
    causal: bool,
    boolean: bool = False,
) -> torch.Tensor | None:
    """The attention mask over ``[prefix; keys]``: the given mask with one column per prefix slot in front.

    Boolean masks stay boolean (True = attend) and float masks stay additive. A missing mask stays missing
    unless something must be masked: a causal call (top-left aligned over the real keys, which is how SDPA's
    ``is_causal`` treats a missing mask, prefix columns visible) or a row that must not see some prefix slots;
    such a mask is made boolean when ``boolean`` (SDPA takes both; a quarter of the memory of a float mask).
    With ``prefix.cache``, a mask widened once is reused by the call's other layers.
    """
    if mask is None and not causal and prefix.visible is None:
        return None
    num_slots, q_len = prefix.keys.shape[-2], query.shape[-2]
    if prefix.cache is None:
        return _widen(mask, prefix.visible, num_slots, query, kv_len, causal, boolean)
    # The cache holds the mask and visibility tensors themselves, so their ids cannot be reused while cached.
    key = (id(mask), id(prefix.visible), num_slots, q_len, kv_len, causal, boolean, query.dtype, query.device)
    masks = prefix.cache.setdefault("masks", {})  # apart from the call's other entries, which it must not count
    entry = masks.get(key)
    if entry is None or entry[0] is not mask or entry[1] is not prefix.visible:
        if len(masks) >= MASKS_KEPT:  # generation makes new masks at every step: keep the last steps' only
            masks.clear()
        entry = (mask, prefix.visible, _widen(mask, prefix.visible, num_slots, query, kv_len, causal, boolean))
        masks[key] = entry
    return entry[2]


def _widen(
    mask: torch.Tensor | None,
    visible: torch.Tensor | None,
    num_slots: int,
    query: torch.Tensor,
    kv_len: int,
    causal: bool,
    boolean: bool,
) -> torch.Tensor:
    if mask is None:
        q_len = query.shape[-2]
        allowed = torch.ones(1, 1, 1, kv_len, dtype=torch.bool, device=query.device)
        if causal:
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()[None, None]
        mask = allowed if boolean else torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min
        )
    if visible is None:
        visible = torch.ones(1, num_slots, dtype=torch.bool, device=mask.device)
    batch = max(mask.shape[0], visible.shape[0])
    visible = visible[:, None, None, :].to(mask.device)
    if mask.dtype == torch.bool:
        columns = visible
    else:
        columns = torch.zeros(visible.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~visible, torch.finfo(mask.dtype).min
        )
    shape = (batch, mask.shape[1], mask.shape[2])
    return torch.cat([columns.expand(*shape, num_slots), mask.expand(*shape, mask.shape[-1])], dim=-1)


def attend(
    module: nn.Module,
    attention: Callable,
    prefix: Prefix,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``attention`` (an attention-interface function) over ``[prefix; key]`` and ``[prefix; value]``;
    for a gated prefix or a memory, run it untouched; then add what lies outside the softmax
    (`added_attention`)."""
    if not prefix.outside:
        key, value, attention_mask, kwargs = _with_slots(module, attention, prefix, query, key, value, attention_mask,
                                                         kwargs)
    output, weights = attention(module, query, key, value, attention_mask, **kwargs)
    added = added_attention(query, prefix, kwargs.get("scaling"))
    return (output if added is None else output + added), weights


def _with_slots(module: nn.Module, attention: Callable, prefix: Prefix, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any],
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Keys, values, mask and keyword arguments of an attention call over ``[prefix; key]``, ``[prefix; value]``."""
    batch = max(query.shape[0], key.shape[0])
    kv_len = key.shape[-2]
    p_keys, p_values = prefix.keys, prefix.values
    if p_keys.dtype != key.dtype or p_keys.device != key.device:  # bf16 models, prefixes kept in float32
        p_keys, p_values = p_keys.to(dtype=key.dtype, device=key.device), p_values.to(dtype=key.dtype, device=key.device)
    if p_keys.shape[1] != key.shape[1] or p_keys.shape[-1] != key.shape[-1]:
        raise RuntimeError(
            f"prefix of shape {tuple(prefix.keys.shape)} does not fit keys of shape {tuple(key.shape)} at "
            f"{module._mmprefix.site.name}: the prefix was built for a different attention geometry"
        )
    if key.shape[0] != batch:
        key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
    key = torch.cat([p_keys.expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([p_values.expand(batch, -1, -1, -1), value], dim=2)

    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # Only SDPA turns a missing mask into a causal one; eager gets a materialised mask whenever it is causal.
    sdpa = attention is sdpa_attention_forward
    causal = sdpa and attention_mask is None and query.shape[-2] > 1 and is_causal
    attention_mask = widen_mask(attention_mask, prefix, query, kv_len, causal, boolean=sdpa)

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5: prefix slots get no relative-position bias
        kwargs["position_bias"] = nn.functional.pad(position_bias, (prefix.keys.shape[-2], 0))
    return key, value, attention_mask, kwargs


def sdpa_with_prefix(module: nn.Module, prefix: Prefix, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """For the hand-written attentions (BLIP, GIT, open_clip): SDPA over ``[prefix; keys]`` with the module's
    additive ``mask``, its dropout while training; the output in ``(batch, length, heads, head_dim)``."""
    output, _ = attend(
        module,
        sdpa_attention_forward,
        prefix,
        query,
        key,
        value,
        None if mask is None else mask.to(query.dtype),
        scaling=scaling,
        dropout=module.dropout.p if module.training else 0.0,
        is_causal=False,
    )
    return output


def added_attention(query: torch.Tensor, prefix: Prefix, scaling: float | None) -> torch.Tensor | None:
    """What a prefix adds to the attention output outside the softmax, ``[B, T, heads, head_dim]`` like an
    attention function's output: a gated prefix attention and/or a memory read; None when nothing is added."""
    added = None
    if prefix.gate is not None:
        added = gated_prefix_attention(query, prefix, scaling)
    if prefix.memory is not None:
        read = memory_read(query, prefix.memory, scaling)
        added = read if added is None else added + read
    return added


def gated_prefix_attention(query: torch.Tensor, prefix: Prefix, scaling: float | None) -> torch.Tensor:
    """``tanh(gate) * softmax(q Kp^T * scale) Vp``, normalised over the prefix slots alone (LLaMA-Adapter);
    ``[B, T, heads, head_dim]`` like an attention function's output. Rows that see no slot get zero."""
    heads, dim = query.shape[1], query.shape[-1]
    keys = prefix.keys.to(query.dtype).repeat_interleave(heads // prefix.keys.shape[1], dim=1)
    values = prefix.values.to(query.dtype).repeat_interleave(heads // prefix.values.shape[1], dim=1)
    scores = query @ keys.transpose(-1, -2) * (dim**-0.5 if scaling is None else scaling)
    if prefix.visible is not None:
        scores = scores.masked_fill(~prefix.visible[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)
    gate = torch.tanh(prefix.gate).to(query.dtype)[:, None, :, None]
    return gate * (probs @ values).transpose(1, 2)


def prefixed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention-interface function registered as ``"mmprefix"``."""
    hook: SiteHook = module._mmprefix
    prefix = hook.prefix(max(query.shape[0], key.shape[0]))
    if prefix is None:
        if hook.capturing:  # a text initialisation runs without a prefix
            hook.observe(key, value)
        return hook.original_attention(module)(module, query, key, value, attention_mask, **kwargs)
    attention = hook.original_attention(module, prefix.cache)
    return attend(module, attention, prefix, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefixed_attention)


def project(linear: nn.Linear, states: torch.Tensor) -> torch.Tensor:
    """``states @ linear.weight.T`` without the bias, for a gated prefix's output; the weight is brought in
    where accelerate offloads it (outside its own forward it is on the "meta" device)."""
    with align_module_device(linear):
        return nn.functional.linear(states, linear.weight)


def heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, T, heads * head_dim]`` -> ``[B, heads, T, head_dim]``."""
    return states.view(*states.shape[:-1], -1, head_dim).transpose(1, 2)
