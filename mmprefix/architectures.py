"""Per-architecture knowledge, as tables: which attention modules exist, in which tower, of which kind.

Everything model-specific that the mechanism needs is here. Attention modules that go through transformers'
attention interface are found generically (their ``forward`` asks ``ALL_ATTENTION_FUNCTIONS`` for the
implementation); the hand-written ones are named in ``HANDWRITTEN``. Towers come from module-name prefixes in
``TOWERS`` (by ``config.model_type`` for transformers models, by class for open_clip ones), self/cross from
``CROSS_ATTENTION_NAMES``, layers from the first index in the module name.
"""

from __future__ import annotations

import inspect
import re
from fnmatch import fnmatchcase
from dataclasses import asdict, dataclass
from functools import lru_cache

from torch import nn

# Hand-written attention (never reaches the attention interface): class -> route with a replacement forward
# (mmprefix.blip, mmprefix.openclip).
HANDWRITTEN = {
    "transformers.models.blip.modeling_blip.BlipAttention": "blip_vision",
    "transformers.models.blip.modeling_blip_text.BlipTextSelfAttention": "blip_text",
    "torch.nn.modules.activation.MultiheadAttention": "torch_mha",
    "open_clip.transformer.Attention": "open_clip",
}

# Language models nested in a VLM, or standing alone, use one of these two layouts.
DECODER_ONLY_LM = (("", "lm"),)
ENCODER_DECODER_LM = (("encoder.", "lm_encoder"), ("decoder.", "lm_decoder"))
LANGUAGE_MODEL = "language_model"  # placeholder: the nested LM's own layout, chosen from its config

# model_type -> ((module-name prefix, tower), ...); the first matching prefix wins.
TOWERS: dict[str, tuple[tuple[str, str], ...]] = {
    "clip": (("vision_model.", "vision"), ("text_model.", "text")),
    "clip_vision_model": (("vision_model.", "vision"), ("", "vision")),
    "clip_text_model": (("text_model.", "text"), ("", "text")),
    "siglip": (("vision_model.", "vision"), ("text_model.", "text")),
    "siglip_vision_model": (("vision_model.", "vision"), ("", "vision")),
    "siglip_text_model": (("text_model.", "text"), ("", "text")),
    "blip": (("vision_model.", "vision"), ("text_encoder.", "text_encoder"), ("text_decoder.", "text_decoder")),
    "blip-2": (("vision_model.", "vision"), ("qformer.", "qformer"), ("language_model.", LANGUAGE_MODEL)),
    "instructblip": (("vision_model.", "vision"), ("qformer.", "qformer"), ("language_model.", LANGUAGE_MODEL)),
    "open_clip.model.CLIP": (("visual.", "vision"), ("transformer.", "text")),
    "open_clip.model.CustomTextCLIP": (("visual.", "vision"), ("text.", "text")),
    "open_clip.coca_model.CoCa": (("visual.", "vision"), ("text.", "text"), ("text_decoder.", "text_decoder")),
}

# A module whose name contains one of these components is a cross-attention site.
CROSS_ATTENTION_NAMES = ("crossattention", "EncDecAttention", "encoder_attn", "cross_attn", "attn_pool", "attn_pool_contrastive")

# Causal LMs that derive position ids from the attention mask (a cumsum) rather than from the cache length.
POSITIONS_FROM_MASK = ("opt",)

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


def _lm_layout(config) -> tuple[tuple[str, str], ...]:
    return ENCODER_DECODER_LM if getattr(config, "is_encoder_decoder", False) else DECODER_ONLY_LM


def _is_language_model(config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


def tower_layout(model: nn.Module) -> tuple[tuple[str, str], ...] | None:
    """((module-name prefix, tower), ...) for a supported model, None for an unknown family."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or qualified_name(type(model))
    if family in TOWERS:
        layout = []
        for prefix, tower in TOWERS[family]:
            if tower == LANGUAGE_MODEL:
                text_config = config.get_text_config()
                layout += [(prefix + sub, sub_tower) for sub, sub_tower in _lm_layout(text_config)]
            else:
                layout.append((prefix, tower))
        return tuple(layout)
    if config is not None and _is_language_model(config):
        return _lm_layout(config)
    return None


@dataclass(frozen=True)
class PromptInput:
    """Where a soft prompt (``PrefixConfig(method="prompt")``) goes in a model's text input."""

    embedding: nn.Module  # the token embedding that embeds ``input_ids``
    column: int  # index in ``input_ids`` where the prompt is inserted
    labels_follow_input: bool  # ``labels`` are aligned with ``input_ids`` (they get -100 at the prompt)
    positions: str  # "mask": from the attention mask; "ids": forward takes position_ids; "fixed": by index only
    filler_id: int  # placeholder token id (the pad token: never an image placeholder)


# Vision-language models: (token-embedding path, or None for get_input_embeddings(); column; labels follow input).
# CLIP and BLIP keep their first token (BOS / [CLS], which they pool or read) in front of the prompt.
PROMPT_INPUTS = {
    "CLIPModel": ("text_model.embeddings.token_embedding", 1, False),
    "CLIPTextModel": (None, 1, False),
    "CLIPTextModelWithProjection": (None, 1, False),
    "BlipForConditionalGeneration": (None, 1, True),
    "BlipForQuestionAnswering": (None, 1, False),
    "BlipForImageTextRetrieval": (None, 1, False),
    "Blip2ForConditionalGeneration": (None, 0, True),
    "Blip2Model": (None, 0, False),
    "InstructBlipForConditionalGeneration": (None, 0, True),
}


def prompt_input(model: nn.Module) -> PromptInput:
    """Where a soft prompt goes in ``model``; a ValueError for models without a supported text input."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if name in PROMPT_INPUTS:
        path, column, labels_follow = PROMPT_INPUTS[name]
        embedding = model.get_submodule(path) if path else model.get_input_embeddings()
        language = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(language, "is_encoder_decoder", False):
            labels_follow = False  # a T5 inside BLIP-2: labels are the decoder's
    elif config is not None and _is_language_model(config):
        encoder_decoder = getattr(config, "is_encoder_decoder", False)
        embedding = (model.get_encoder() if encoder_decoder else model).get_input_embeddings()
        column, labels_follow, language = 0, not encoder_decoder, config
    else:
        raise ValueError(
            f'method="prompt" needs a text input mmprefix knows; {name} has none. Supported: '
            f"{', '.join(sorted(PROMPT_INPUTS))}, and causal or seq2seq language models"
        )
    if getattr(language, "model_type", None) in POSITIONS_FROM_MASK:
        positions = "mask"
    elif "position_ids" in inspect.signature(model.forward).parameters and not getattr(
        language, "is_encoder_decoder", False
    ):
        positions = "ids"
    else:
        positions = "fixed"
    return PromptInput(embedding, column, labels_follow, positions, getattr(language, "pad_token_id", None) or 0)


def supported_families() -> str:
    return (
        "CLIP and SigLIP (vision/text), BLIP, BLIP-2 and InstructBLIP (with OPT, T5 or another supported LM), "
        "open_clip CLIP, CustomTextCLIP and CoCa, and "
        "causal or seq2seq language models whose attention uses transformers' attention interface "
        "(e.g. Llama, Mistral, Qwen2, GPT-2, OPT, T5, BART)"
    )


def _layer_index(relative_name: str) -> int:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", relative_name)
    return int(match.group(1)) if match else 0


def _kind(name: str) -> str:
    parts = name.split(".")
    return "cross" if any(part in CROSS_ATTENTION_NAMES for part in parts) else "self"


def find_sites(model: nn.Module, target_modules: list[str] | None = None) -> list[Site]:
    """All attention modules of ``model`` that can carry a prefix.

    For a supported family, every supported attention module inside a known tower. With ``target_modules``,
    only modules whose names match one of the regular expressions (and, for unknown families, any module whose
    attention goes through transformers' attention interface, in a tower called ``"model"``).
    """
    layout = tower_layout(model)
    if layout is None and not target_modules:
        raise ValueError(
            f"mmprefix does not know the architecture {type(model).__name__} "
            f"(model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}). Supported: "
            f"{supported_families()}. For another model whose attention goes through transformers' attention "
            "interface, target its attention modules by name: PrefixConfig(target_modules=[r'.*\\.self_attn'])."
        )
    patterns = [re.compile(p) for p in target_modules or []]
    sites = []
    for name, module in model.named_modules():
        route = attention_route(module)
        if route is None or (patterns and not any(p.fullmatch(name) for p in patterns)):
            continue
        if layout is None:
            prefix, tower = "", "model"
        else:
            match = next(((p, t) for p, t in layout if name.startswith(p)), None)
            if match is None:
                continue
            prefix, tower = match
        heads, kv_heads, head_dim = head_geometry(module)
        sites.append(
            Site(
                name=name,
                tower=tower,
                kind=_kind(name),
                layer=_layer_index(name[len(prefix) :]),
                heads=heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                route=route,
            )
        )
    if not sites:
        where = f"matching target_modules={target_modules}" if target_modules else "in any known tower"
        raise ValueError(
            f"{type(model).__name__} has no supported attention module {where}. Supported: {supported_families()}."
        )
    return sites


def unreachable_towers(model: nn.Module, sites: list[Site]) -> dict[str, str]:
    """Towers of a supported family that exist but hold no attention mmprefix can reach (e.g. an open_clip
    vision tower taken from timm): tower -> class of the tower's module."""
    found = {site.tower for site in sites}
    missing = {}
    for prefix, tower in tower_layout(model) or ():
        if not prefix or tower in found:
            continue
        try:
            module = model.get_submodule(prefix.rstrip("."))
        except AttributeError:
            continue
        missing.setdefault(tower, type(module).__name__)
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


_TARGET = re.compile(r"^(?P<tower>[\w*?]+)(?:\.(?P<kind>[\w*?]+))?(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


def select_sites(sites: list[Site], targets: list[str] | None) -> list[Site]:
    """The sites selected by ``PrefixConfig.targets`` strings (``"tower.kind[start:stop]"``, shell wildcards)."""
    if targets is None:
        return list(sites)
    valid = ", ".join(sorted({f"{s.tower}.{s.kind}" for s in sites}))
    chosen: set[str] = set()
    for target in targets:
        match = _TARGET.match(target.strip())
        if match is None:
            raise ValueError(f"cannot parse target {target!r}: expected 'tower', 'tower.kind' or 'tower.kind[start:stop]'")
        tower, kind = match["tower"], match["kind"] or "*"
        hits = [s for s in sites if fnmatchcase(s.tower, tower) and fnmatchcase(s.kind, kind)]
        if not hits:
            raise ValueError(f"target {target!r} matches no attention site; valid targets for this model: {valid}")
        if match["start"] is not None:
            layer_slice = slice(int(match["start"]) if match["start"] else None, int(match["stop"]) if match["stop"] else None)
            layers = {t: sorted({s.layer for s in hits if s.tower == t}) for t in {s.tower for s in hits}}
            hits = [s for s in hits if s.layer in layers[s.tower][layer_slice]]
        chosen.update(s.name for s in hits)
    return [s for s in sites if s.name in chosen]
