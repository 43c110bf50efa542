"""Reading PEFT prefix-tuning adapters, and PEFT's position convention.

PEFT hands the prefix to a causal LM as a KV cache of length ``P``. mmprefix puts the same keys and values
inside attention instead; to give the same logits it must also reproduce what that cache does to positions:
every real token's position id is shifted by ``P`` (``PrefixConfig.position_offset``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .architectures import POSITIONS_FROM_MASK, Site, find_sites
from .config import PrefixConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def is_peft_folder(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


def read_peft_prefix(
    model: nn.Module, directory: str | os.PathLike
) -> tuple[PrefixConfig, list[Site], dict[str, torch.Tensor]]:
    """A PEFT ``PREFIX_TUNING`` adapter for a causal LM as (config, sites, tensors by site)."""
    directory = Path(directory)
    config, weights = json.loads((directory / CONFIG_NAME).read_text()), load_file(directory / WEIGHTS_NAME)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{directory} holds a PEFT {config.get('peft_type')} adapter; only PREFIX_TUNING can be loaded")
    if config.get("task_type") != "CAUSAL_LM":
        raise ValueError(
            f"{directory} is a PEFT prefix for task_type={config.get('task_type')!r}; mmprefix reads CAUSAL_LM ones"
        )
    table = weights.get("prompt_embeddings")
    if table is None:
        raise ValueError(f"{directory}: no 'prompt_embeddings' tensor in {WEIGHTS_NAME}")
    p, layers, heads = config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"]
    head_dim = config["token_dim"] // heads
    sites = sorted((s for s in find_sites(model) if s.kind == "self"), key=lambda s: s.layer)
    problems = []
    if len(sites) != layers:
        problems.append(f"layers: adapter has {layers}, model has {len(sites)}")
    if sites and (sites[0].kv_heads, sites[0].head_dim) != (heads, head_dim):
        problems.append(
            f"key/value heads x head_dim: adapter {heads}x{head_dim}, model {sites[0].kv_heads}x{sites[0].head_dim}"
        )
    if tuple(table.shape) != (p, layers * 2 * heads * head_dim):
        problems.append(f"prompt_embeddings has shape {tuple(table.shape)}, expected {(p, layers * 2 * heads * head_dim)}")
    if problems:
        base = config.get("base_model_name_or_path")
        raise ValueError(
            f"the PEFT adapter in {directory} (base model {base!r}) does not fit {type(model).__name__}: "
            + "; ".join(problems)
        )
    # PEFT's get_prompt: view [P, 2L, H, hd], then layer l takes slot 2l as keys and 2l+1 as values.
    slots = table.reshape(p, 2 * layers, heads, head_dim).permute(1, 2, 0, 3)
    tensors = {}
    for site in sites:
        tensors[f"{site.name}.key"] = slots[2 * site.layer]
        tensors[f"{site.name}.value"] = slots[2 * site.layer + 1]
    return PrefixConfig(num_virtual_tokens=p, targets=["lm.self"], position_offset=True), sites, tensors


def shifted_positions(model: nn.Module, args: tuple, kwargs: dict[str, Any], offset: int) -> torch.Tensor:
    """The position ids a causal LM would use for this call, shifted as a ``offset``-long KV cache shifts them."""
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids + offset
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs["inputs_embeds"][..., 0]
    batch, length = inputs.shape[:2]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    mask = kwargs.get("attention_mask")
    if getattr(model.config, "model_type", None) in POSITIONS_FROM_MASK and mask is not None:
        mask = mask.long()
        positions = (mask.cumsum(1) * mask - 1)[:, past:]
        return positions + offset * mask[:, past:]  # padding keeps its position, as under PEFT
    return torch.arange(past + offset, past + offset + length, device=inputs.device).expand(batch, -1)
