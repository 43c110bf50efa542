"""Per-architecture knowledge the mechanism needs: which attention modules exist, in which tower, of which kind.

Attention modules that go through transformers' attention interface are found generically (their ``forward``
asks ``ALL_ATTENTION_FUNCTIONS`` for the implementation); the hand-written ones are named in ``HANDWRITTEN``.
Towers come from the family records of ``families.py`` (module-name prefixes, found under the model's
``base_model_prefix`` or not), or, for a composite model with no record, from its own sub-models
(``fallback_towers``); self/cross from ``CROSS_ATTENTION_NAMES`` and the record's patterns; layers from the first
index in the module name.
"""

from __future__ import annotations

import inspect
import re
from fnmatch import fnmatchcase
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from torch import nn

from .reach import unread_attention
from .families import (BY_KEY, ITEMS, CAUSAL_LM, DECODER_ONLY_LM, ENCODER_DECODER_LM, FAMILIES, LANGUAGE_MODEL,
                       LANGUAGE_TOWERS, POSITIONS_FROM_MASK, SEQ2SEQ_LM, Family, Media)

# Hand-written attention (never reaches the attention interface): class -> route with a replacement forward. The
# records name their families' own; PyTorch's nn.MultiheadAttention is any model's (a SigLIP head, open_clip).
HANDWRITTEN = {"torch.nn.modules.activation.MultiheadAttention": "torch_mha",
               **{cls: route for family in FAMILIES for cls, route in family.attention.items()}}

# A module whose name contains one of these components is a cross-attention site.
CROSS_ATTENTION_NAMES = ("crossattention", "EncDecAttention", "encoder_attn", "cross_attn", "attn_pool", "attn_pool_contrastive")


# Where attention modules keep their geometry, in lookup order.
HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim")

@dataclass(frozen=True)
class Site:
    """One attention module that can carry a prefix."""

    name: str  # module name in the wrapped model
    tower: str  # e.g. "vision", "text_decoder", "qformer", "lm", "lm_encoder"
    kind: str  # "self" or "cross"
    layer: int  # layer index within its tower
    heads: int
    kv_heads: int
    head_dim: int
    route: str  # "interface" or a key of HANDWRITTEN's values

    def prefix_numel(self, num_virtual_tokens: int) -> int:
        """Trainable values of a flat prefix at this site: keys and values."""
        return 2 * num_virtual_tokens * self.kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=None)
def uses_attention_interface(cls: type) -> bool:
    """True when ``cls.forward`` dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source and "_attn_implementation" in source


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside distributed (DDP), PEFT and `PrefixModel` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif callable(getattr(type(model), "get_base_model", None)):  # PEFT
            model = model.get_base_model()
        elif callable(getattr(type(model), "prefix_for", None)):  # PrefixModel
            model = model.base_model
        else:
            return model


def model_class(model: nn.Module) -> type:
    """The model's own class, not the subclass a distributed wrapper made of it (FSDP2's ``FSDP<Class>``)."""
    return next(c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed"))


def is_open_clip(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside its wrappers) is an open_clip model: ``forward(image, text)``,
    ``encode_image``/``encode_text``, a ``(tokenizer, preprocess)`` pair instead of a processor."""
    return model_class(unwrap(model)).__module__.split(".")[0] == "open_clip"


def attention_route(module: nn.Module) -> str | None:
    """How mmprefix reaches this module's attention, or None if it is not an attention module it supports."""
    name = qualified_name(type(module))
    if name in HANDWRITTEN:
        return HANDWRITTEN[name]
    if hasattr(module, "config") and uses_attention_interface(type(module)):
        return "interface"
    return None


def _first_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for attr in names:
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def head_geometry(module: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of an attention module."""
    heads = _first_attr(module, HEADS_ATTRS) or getattr(getattr(module, "config", None), "num_attention_heads", None)
    head_dim = _first_attr(module, HEAD_DIM_ATTRS)
    if heads is None or head_dim is None:
        raise ValueError(f"cannot read the number of heads and head_dim of {type(module).__name__}")
    kv_heads = heads // getattr(module, "num_key_value_groups", 1)
    return heads, kv_heads, head_dim


def _is_language_model(config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


# Sub-models of a family standing alone (CLIPVisionModel, SiglipTextModel, ...): model_type suffix -> tower.
SUB_MODELS = (("_vision_model", "vision"), ("_text_model", "text"))
# Generic fallback: sub-config attribute -> tower of the sub-model built from it (others: the attribute's stem).
SUB_CONFIG_TOWERS = {"vision_config": "vision", "text_config": LANGUAGE_MODEL, "audio_config": "audio",
                     "qformer_config": "qformer", "perceiver_config": "resampler"}


def family_of(model: nn.Module) -> Family | None:
    """The record that covers ``model`` (a sub-model standing alone gets its tower at the root), or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = BY_KEY.get(model_type) or BY_KEY.get(qualified_name(model_class(model)))
    if family is not None:
        return family
    for suffix, tower in SUB_MODELS:
        parent = BY_KEY.get((model_type or "").removesuffix(suffix)) if (model_type or "").endswith(suffix) else None
        if parent is not None:
            return replace(parent, towers=((f"{tower}_model.", tower), ("", tower)), unused=(), refused=())
    if config is not None and not fallback_towers(model) and _is_language_model(config):
        return SEQ2SEQ_LM if getattr(config, "is_encoder_decoder", False) else CAUSAL_LM
    return None


def _base(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """The model's base module (``LlavaModel`` inside ``LlavaForConditionalGeneration``) and the name prefixes its
    modules have: towers are named relative to it, and found with or without the prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not model:
        return base, ("", f"{prefix}.")
    return model, ("",)


def fallback_media(config) -> tuple[Media, ...]:
    """A composite model with no record: its images, if its config names their placeholder token (each image the
    same number of placeholders, LLaVA-style). Anything else its towers see cannot be mapped to rows."""
    token = next((a for a in ("image_token_id", "image_token_index") if isinstance(getattr(config, a, None), int)), None)
    return (Media("pixel_values", ITEMS, token),) if token and getattr(config, "vision_config", None) else ()


def fallback_towers(model: nn.Module) -> tuple[tuple[str, str], ...] | None:
    """Towers of a composite model with no record, from what its modules are: the outermost module built from
    each sub-config is a tower named after it (``vision_config`` -> ``vision``, ``audio_config`` -> ``audio``,
    ``text_config`` -> the language model's layout; others: the sub-config's stem), found however deep it sits
    (Phi-4-multimodal keeps its vision and audio towers inside one embedding module). Attention outside them runs
    on the model's own text config: the language model (Chameleon's ``layers``). None if it has no sub-configs."""
    config = getattr(model, "config", None)
    sub_configs = getattr(config, "sub_configs", None) or {}
    if not sub_configs:
        return None
    built = {id(getattr(config, key)): key for key in sub_configs if getattr(config, key, None) is not None}
    types = {getattr(getattr(config, key, None), "model_type", None): key for key in sub_configs}
    towers: list[tuple[str, str]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            child_config = getattr(child, "config", None)
            key = built.get(id(child_config)) or types.get(getattr(child_config, "model_type", None))
            if key is not None:
                towers.append((f"{prefix}{name}.", SUB_CONFIG_TOWERS.get(key, key.removesuffix("_config"))))
            elif any(attention_route(m) is not None for m in child.modules()):
                if any(getattr(m, "config", None) is not None and id(m.config) in built for m in child.modules()):
                    visit(child, f"{prefix}{name}.")  # a sub-config's model is inside: look for it there
                else:
                    towers.append((f"{prefix}{name}.", LANGUAGE_MODEL if _is_text(child, config) else name))

    visit(_base(model)[0], "")
    return tuple(towers)


def _is_text(module: nn.Module, config) -> bool:
    """Whether ``module``'s attention runs on the model's own (text) config: its language model. (An installed
    prefix wraps an attention module's config in a view that keeps the original as ``config``.)"""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for m in module.modules():
        own = getattr(m, "config", None) if attention_route(m) is not None else None
        if own is not None and vars(own).get("config", own) in (config, text):
            return True
    return False


@dataclass(frozen=True)
class Layout:
    """Where the towers of one model are: full module-name prefixes, the first match wins."""

    family: Family
    towers: tuple[tuple[str, str], ...]
    fallback: bool  # towers from the model's sub-models: no tested record covers it

    @property
    def media_towers(self) -> frozenset[str]:
        """Towers that see a call's images (videos, audio) instead of its text rows: those the record's media
        name; with no record, every tower but the language model's."""
        if self.fallback:
            return frozenset(t for _, t in self.towers if t not in LANGUAGE_TOWERS)
        return frozenset(t for m in self.family.media for t in m.towers)

    def root(self, site_name: str) -> str:
        """The module name of the tower ``site_name`` is in."""
        return next(p for p, _ in self.towers if site_name.startswith(p)).rstrip(".")


def tower_layout(model: nn.Module) -> Layout | None:
    """The towers of a supported model (or of a composite one, by the generic fallback); None otherwise."""
    family = family_of(model)
    fallback = family is None
    if fallback:
        towers = fallback_towers(model)
        if towers is None:
            return None
        family = Family("generic fallback", (), towers, media=fallback_media(model.config))
    return Layout(family, _expand(model, family.towers), fallback)


def _expand(model: nn.Module, towers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    layout = []
    for base in _base(model)[1]:
        for prefix, tower in towers:
            if tower != LANGUAGE_MODEL:
                layout.append((base + prefix, tower))
                continue
            try:
                language_model = model.get_submodule((base + prefix).rstrip("."))
            except AttributeError:
                continue
            encoder_decoder = getattr(getattr(language_model, "config", None), "is_encoder_decoder", False)
            nested = ENCODER_DECODER_LM if encoder_decoder else DECODER_ONLY_LM
            layout += [(base + prefix + p, t) for p, t in _expand(language_model, nested)]
    return tuple(layout)


@dataclass(frozen=True)
class PromptInput:
    """Where a soft prompt (``PrefixConfig(method="prompt")``) goes in a model's text input."""

    embedding: nn.Module  # the token embedding that embeds ``input_ids``
    column: int  # index in ``input_ids`` where the prompt is inserted
    labels_follow_input: bool  # ``labels`` are aligned with ``input_ids`` (they get -100 at the prompt)
    positions: str  # "mask": from the attention mask; "ids": forward takes position_ids; "fixed": by index only
    filler_id: int  # placeholder token id (the pad token: never an image placeholder)
    aligned: tuple[str, ...] = ()  # other inputs aligned with input_ids (zeros at the prompt)


def prompt_input(model: nn.Module) -> PromptInput:
    """Where a soft prompt goes in ``model``; a ValueError for models without a supported text input."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    family = family_of(model)
    inputs = family.prompt_inputs if family is not None else {}
    if name in inputs:
        path, column, labels_follow = inputs[name]
        embedding = model.get_submodule(path) if path else model.get_input_embeddings()
        language = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(language, "is_encoder_decoder", False):
            labels_follow = False  # a T5 inside BLIP-2: labels are the decoder's
    elif family in (CAUSAL_LM, SEQ2SEQ_LM):
        encoder_decoder = getattr(config, "is_encoder_decoder", False)
        embedding = (model.get_encoder() if encoder_decoder else model).get_input_embeddings()
        column, labels_follow, language = 0, not encoder_decoder, config
    else:
        known = sorted(c for f in FAMILIES for c in f.prompt_inputs)
        raise ValueError(
            f'method="prompt" needs a text input mmprefix knows; {name} has none. Supported: '
            f"{', '.join(known)}, and causal or seq2seq language models"
        )
    if getattr(language, "model_type", None) in POSITIONS_FROM_MASK:
        positions = "mask"
    elif "position_ids" in inspect.signature(model.forward).parameters and not getattr(
        language, "is_encoder_decoder", False
    ):
        positions = "ids"
    else:
        positions = "fixed"
    filler = getattr(language, family.prompt_filler if family else "pad_token_id", None) or 0
    return PromptInput(embedding, column, labels_follow, positions, filler, family.aligned_inputs)


def supported_families() -> str:
    return (
        f"{', '.join(f.name for f in FAMILIES)}, and causal or seq2seq language models whose attention uses "
        "transformers' attention interface (e.g. Llama, Mistral, Qwen2, GPT-2, OPT, T5, BART)"
    )


def _layer_index(relative_name: str) -> int:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", relative_name)
    return int(match.group(1)) if match else 0


def _kind(name: str, family: Family) -> str:
    parts = name.split(".")
    cross = any(part in CROSS_ATTENTION_NAMES for part in parts) or any(fnmatchcase(name, p) for p in family.cross)
    return "cross" if cross else "self"


def _feature_layer_cutoff(config, attribute: str) -> int | None:
    """VLMs that read the vision tower's hidden states at a chosen layer (``attribute`` of the config: LLaVA's
    ``vision_feature_layer`` = -2) never use the layers after it: the first unused vision layer, or None."""
    owner, _, name = attribute.rpartition(".")
    chosen = getattr(getattr(config, owner, None) if owner else config, name, None)
    layers = getattr(getattr(config, "vision_config", None), "num_hidden_layers", None)
    if chosen is None or layers is None:
        return None
    states = [c if c >= 0 else layers + 1 + c for c in (chosen if isinstance(chosen, (list, tuple)) else [chosen])]
    return max(states) if max(states) < layers else None


def _unused(name: str, tower: str, layer: int, layout: Layout, config) -> str | None:
    """Why the model never reads this attention module's output (no gradient could reach a prefix), or None."""
    for prefix, why in layout.family.unused:
        if any(name.startswith(base + prefix) for base in ("", "model.")):
            return why
    cutoff = _feature_layer_cutoff(config, layout.family.feature_layer)
    if tower == "vision" and cutoff is not None and layer >= cutoff:
        return (f"the model reads the vision tower's hidden states after layer {cutoff - 1} "
                f"({layout.family.feature_layer}={_feature_layer_value(config, layout.family.feature_layer)})")
    return None


def _feature_layer_value(config, attribute: str):
    owner, _, name = attribute.rpartition(".")
    return getattr(getattr(config, owner) if owner else config, name)


def scan(model: nn.Module, target_modules: list[str] | None = None) -> tuple[list[Site], dict[str, str]]:
    """Every supported attention module in a known tower (or matching ``target_modules``) as a `Site`, and the
    attention modules left out because the model never reads their output (name -> why)."""
    layout = tower_layout(model)
    if layout is None and not target_modules:
        raise ValueError(
            f"mmprefix does not know the architecture {type(model).__name__} "
            f"(model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}). Supported: "
            f"{supported_families()}. For another model whose attention goes through transformers' attention "
            "interface, target its attention modules by name: PrefixConfig(target_modules=[r'.*\\.self_attn'])."
        )
    patterns = [re.compile(p) for p in target_modules or []]
    family = layout.family if layout else Family("target_modules", (), ())
    refused = {tower for tower, _ in family.refused}
    sites, unused = [], {}
    for name, module in model.named_modules():
        route = attention_route(module)
        if route is None or (patterns and not any(p.fullmatch(name) for p in patterns)):
            continue
        if layout is None:
            prefix, tower = "", "model"
        else:
            match = next(((p, t) for p, t in layout.towers if name.startswith(p)), None)
            if match is None or match[1] in refused:
                continue
            prefix, tower = match
        layer = _layer_index(name[len(prefix) :])
        why = _unused(name, tower, layer, layout, getattr(model, "config", None)) if layout else None
        if why is not None:
            unused[name] = why
            continue
        heads, kv_heads, head_dim = head_geometry(module)
        sites.append(Site(name, tower, _kind(name, family), layer, heads, kv_heads, head_dim, route))
    if layout is not None and layout.fallback:  # no record says what the model reads: a dry run finds out
        unread = _unread(model, sites)
        unused.update(unread)
        sites = [s for s in sites if s.name not in unread]
    if not sites:
        where = f"matching target_modules={target_modules}" if target_modules else "in any known tower"
        raise ValueError(
            f"{type(model).__name__} has no supported attention module {where}. Supported: {supported_families()}."
        )
    return sites, unused


def _unread(model: nn.Module, sites: list[Site]) -> dict[str, str]:
    """The sites a dry run shows the model never reads (see `mmprefix.core.reach`). A tower left with no site at all
    means the dry run read the wrong output: then nothing is left out on its account."""
    unread, _ = unread_attention(model_class(model), model, [s.name for s in sites])
    emptied = {s.tower for s in sites} - {s.tower for s in sites if s.name not in unread}
    return {} if emptied else unread


def find_sites(model: nn.Module, target_modules: list[str] | None = None) -> list[Site]:
    """All attention modules of ``model`` that can carry a prefix.

    For a supported family (or a composite model, by the generic fallback), every supported attention module
    inside a known tower whose output the model reads. With ``target_modules``, only modules whose names match
    one of the regular expressions (and, for unknown families, any module whose attention goes through
    transformers' attention interface, in a tower called ``"model"``).
    """
    return scan(model, target_modules)[0]


def unreachable_towers(model: nn.Module, sites: list[Site]) -> dict[str, str]:
    """Towers of a supported family that hold attention mmprefix cannot reach (a record's refused tower, or an
    open_clip vision tower taken from timm): tower -> why."""
    layout = tower_layout(model)
    if layout is None:
        return {}
    found = {site.tower for site in sites}
    refused = dict(layout.family.refused)
    missing = {}
    for prefix, tower in layout.towers:
        if not prefix or tower in found or tower in missing:
            continue
        try:
            module = model.get_submodule(prefix.rstrip("."))
        except AttributeError:
            continue
        if tower in refused:
            missing[tower] = f"{type(module).__name__}: {refused[tower]}"
        elif any("Attention" in type(m).__name__ for m in module.modules()):  # a projector without attention is fine
            missing[tower] = type(module).__name__
    return missing


def check_reachable(model: nn.Module, sites: list[Site], targets: list[str] | None) -> None:
    """A tower mmprefix cannot reach is an error when the prefix asks for it (or for everything)."""
    missing = unreachable_towers(model, sites)
    wanted = [t for t in missing if targets is None or any(fnmatchcase(t, x.split(".")[0].split("[")[0]) for x in targets)]
    if wanted:
        reachable = sorted({s.tower for s in sites})
        raise ValueError(
            f"the {', '.join(f'{t!r} tower ({missing[t]})' for t in wanted)} of {type(model).__name__} has no "
            f"attention mmprefix can reach; target the others explicitly, e.g. targets={reachable}"
        )


def family_setting(model: nn.Module, name: str, by_lm: dict[str, str], default: str) -> str:
    """A setting of the model's family record (``Family.<name>``: LoRA's or the adapters' target modules); for a
    plain language model, the one its ``model_type`` needs (``by_lm``), else ``default``."""
    family = family_of(model)
    if family is None or family in (CAUSAL_LM, SEQ2SEQ_LM):
        return by_lm.get(getattr(getattr(model, "config", None), "model_type", None), default)
    return getattr(family, name)
