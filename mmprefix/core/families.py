"""One record per model family: everything mmprefix knows about a family, in one place.

A record names the family's towers (module-name prefixes, under the model's ``base_model_prefix`` or not), what
counts as cross-attention beyond the usual names, attention whose output the model never reads (no gradient
could ever reach a prefix there), towers it cannot reach and why, where a soft prompt goes, which class to load
per task, LoRA's target modules, the prompt format of the recipes and evaluation (``data/formatting.py``), and
how the images (videos, audio) of a call reach the towers that see them instead of the text rows. Adding a family is one record
here plus one tiny factory in ``tests/tiny_families.py``; a composite model with no record gets towers from its own
sub-models (``architectures.fallback_towers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# Placeholder tower: the nested language model's own layout (``lm``, or ``lm_encoder``/``lm_decoder``).
LANGUAGE_MODEL = "language_model"
DECODER_ONLY_LM = (("", "lm"),)
ENCODER_DECODER_LM = (("encoder.", "lm_encoder"), ("decoder.", "lm_decoder"))
LANGUAGE_TOWERS = tuple(tower for _, tower in DECODER_ONLY_LM + ENCODER_DECODER_LM)

DEFAULT_LORA = r".*\.(q_proj|v_proj)$"  # Llama, Mistral, Qwen2, OPT, BART, and the LMs inside today's VLMs
# The feed-forward output projection a bottleneck adapter follows (mmprefix.models.adapters): CLIP-style vision and text
# towers (mlp.fc2) and Llama-style LMs (mlp.down_proj), so CLIP, LLaVA-style VLMs and most LMs.
DEFAULT_ADAPTER = r".*\.mlp\.(fc2|down_proj)$"


# How the items of one input (images, videos, audio clips) reach the towers that see them (`Media.layout`):
ROWS = "rows"  # the input's first dimension is the text rows: the towers' batch is a whole number of entries per row
ITEMS = "items"  # the first dimension is the items, one entry each (LLaVA's images; a tiling processor's tiles)
PADDED = "padded"  # [groups, images, ...]: every image that is not all zeros (padding), in order (Idefics' rows, videos)
TILES = "tiles"  # [items, tiles, ...]: every tile that is not all zeros (padding), item after item (LLaVA-NeXT)
FRAMES = "frames"  # [items, frames, ...]: every frame, item after item (videos)
GRID = "grid"  # packed into one sequence cut by cu_seqlens; ``sizes`` holds each item's (t, h, w) (Qwen-VL)
UNMAPPED = "unmapped"  # seen in a way mmprefix does not map to rows: a routed call with such items is refused


class Media(NamedTuple):
    """One input whose items a family's towers see instead of the text rows, and how a routed call tells which
    row each item belongs to (``mmprefix/media.py``). Unless the layout is ``ROWS`` (the model itself pairs input
    row i with text row i), the items' rows come from their placeholder tokens in ``input_ids``: ``token`` names
    the config attribute of the placeholder id (dotted for a sub-config's), ``count`` how many placeholders an item
    takes: ``"uniform"`` (the same number for each), ``"runs"`` (one run of placeholders per item: two items that
    touch are refused), ``"grid"`` (its ``sizes`` grid's product over the vision config's ``spatial_merge_size``
    squared) or ``"sizes"`` (the number the input ``sizes`` gives)."""

    input: str
    layout: str
    token: str | None = None
    count: str = "uniform"
    sizes: str | None = None  # the input with each item's size: GRID's (t, h, w) grids, or its placeholder count
    towers: tuple[str, ...] = ("vision",)


PER_ROW_IMAGES = (Media("pixel_values", ROWS),)


@dataclass(frozen=True)
class Family:
    """What mmprefix knows about one model family (see the module docstring)."""

    name: str
    keys: tuple[str, ...]  # config.model_type values, or qualified class names (open_clip)
    towers: tuple[tuple[str, str], ...]  # (module-name prefix, tower); the first matching prefix wins
    cross: tuple[str, ...] = ()  # fnmatch patterns on module names: cross-attention with no usual name
    unused: tuple[tuple[str, str], ...] = ()  # (module-name prefix, why the model never reads its output)
    feature_layer: str = "vision_feature_layer"  # config attribute: the vision layer the model reads (later: unused)
    refused: tuple[tuple[str, str], ...] = ()  # (tower, why mmprefix cannot reach its attention)
    # class name -> (token-embedding path or None for get_input_embeddings(), column, labels follow input_ids)
    prompt_inputs: dict[str, tuple[str | None, int, bool]] = field(default_factory=dict)
    aligned_inputs: tuple[str, ...] = ()  # inputs aligned with input_ids: a soft prompt inserts zeros there too
    tasks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task -> transformers classes to load
    lora: str = DEFAULT_LORA
    prompt_format: str | None = None  # "blip", "blip2", "chat", "paligemma"; None: "lm" (data/formatting.py)
    media: tuple[Media, ...] = ()  # the inputs that towers see instead of the text rows, in the order the model runs them
    # (tower, why one call cannot give its rows different prefixes): refused before any compute; for a tower fed by
    # an UNMAPPED input, only in the calls that have such an input
    unroutable: tuple[tuple[str, str], ...] = ()
    image_first: tuple[str, ...] = ()  # towers that see the image's tokens in front of input_ids (GIT)
    prompt_filler: str = "pad_token_id"  # text-config attribute: the token id a soft prompt's placeholders hold
    # hand-written attention (it never reaches transformers' attention interface): qualified class -> the route
    # with its replacement forward (attention/blip.py, git.py, open_clip.py)
    attention: dict[str, str] = field(default_factory=dict)
    shard_layers: tuple[str, ...] = ()  # layer classes FSDP shards one by one that _no_split_modules leaves out
    adapter: str = DEFAULT_ADAPTER  # module names of the feed-forward output projections adapters follow

    @property
    def packed(self) -> tuple[str, ...]:
        """Towers whose attention runs once per chunk (an image, a frame, a window) of one packed sequence."""
        return tuple(dict.fromkeys(t for m in self.media if m.layout == GRID for t in m.towers))


# open_clip: its own Attention (qk-norm, scaled heads) is hand-written; its blocks are not in any _no_split_modules
OPEN_CLIP = dict(attention={"open_clip.transformer.Attention": "open_clip"},
                 shard_layers=("ResidualAttentionBlock", "CustomResidualAttentionBlock"))


def _generation(*classes: str) -> dict[str, tuple[str, ...]]:
    return {"vqa": classes, "caption": classes}


def _contrastive(*classes: str) -> dict[str, tuple[str, ...]]:
    return {"classification": classes, "retrieval": classes}


VISION_LM = (("vision_tower.", "vision"), ("multi_modal_projector.", "projector"), ("language_model.", LANGUAGE_MODEL))
UNUSED_VISION_HEAD = (("vision_tower.head.", "the model reads the vision tower's patch features, not its pooled output"),)
DEEPSEEK_TOWERS = (("vision_model.", "vision"), ("aligner.", "projector"), ("language_model.", LANGUAGE_MODEL))
# Images in input_ids' order, each the same number of placeholder tokens (LLaVA, PaliGemma, Gemma 3; a tile each)
IMAGES = (Media("pixel_values", ITEMS, "image_token_id"),)
# Images split into tiles by their size, padded with all-zero tiles; an image's placeholders are one run
TILED_IMAGES = Media("pixel_values", TILES, "image_token_id", count="runs")
# Qwen-VL: every image and video of a call packed into one sequence, images first
PACKED = (Media("pixel_values", GRID, "image_token_id", count="grid", sizes="image_grid_thw"),
          Media("pixel_values_videos", GRID, "video_token_id", count="grid", sizes="video_grid_thw"))
# GLM-4V: packed like Qwen-VL, but a video's frames hold image placeholders (a call has images or videos, not both)
GLM_PACKED = (PACKED[0], PACKED[1]._replace(token="image_token_id"))
VIDEOS = Media("pixel_values_videos", FRAMES, "video_token_id")  # [videos, frames, ...]; placeholders per video
SIGLIP_HEAD = "the model reads the vision tower's patch features, not its pooled output"


def _vision_lm(name: str, *classes: str, unused=UNUSED_VISION_HEAD, **options) -> Family:
    """A LLaVA-style record: vision tower, projector, language model; chat-template prompts."""
    conditional = classes[0]
    return Family(
        name, (name,), options.pop("towers", VISION_LM), unused=unused,
        prompt_inputs={c: (None, 0, c == conditional) for c in classes}, tasks=_generation(conditional),
        prompt_format=options.pop("prompt_format", "chat"), media=options.pop("media", IMAGES), **options,
    )


FAMILIES: tuple[Family, ...] = (
    Family("clip", ("clip",), (("vision_model.", "vision"), ("text_model.", "text")),
           prompt_inputs={"CLIPModel": ("text_model.embeddings.token_embedding", 1, False),
                          "CLIPTextModel": (None, 1, False), "CLIPTextModelWithProjection": (None, 1, False)},
           tasks=_contrastive("CLIPModel"), media=PER_ROW_IMAGES),
    # The pooling head is a learned probe attending to the patches: cross-attention, like CoCa's pooler.
    Family("siglip", ("siglip", "siglip2"), (("vision_model.", "vision"), ("text_model.", "text")),
           cross=("*head.attention",), tasks=_contrastive("SiglipModel", "Siglip2Model"), media=PER_ROW_IMAGES,
           prompt_inputs={c: ("text_model.embeddings.token_embedding", 0, False) for c in ("SiglipModel", "Siglip2Model")}),
    Family("blip", ("blip",), (("vision_model.", "vision"), ("text_encoder.", "text_encoder"),
                                ("text_decoder.", "text_decoder")),
           prompt_inputs={"BlipForConditionalGeneration": (None, 1, True), "BlipForQuestionAnswering": (None, 1, False),
                          "BlipForImageTextRetrieval": (None, 1, False)},
           tasks={"vqa": ("BlipForQuestionAnswering",), "caption": ("BlipForConditionalGeneration",)},
           lora=r".*\.(query|value|qkv)$", prompt_format="blip", media=PER_ROW_IMAGES, shard_layers=("BlipTextLayer",),
           adapter=r".*(\.mlp\.fc2|\.layer\.\d+\.output\.dense)$",  # vision MLP; text FFN, not attention output
           attention={"transformers.models.blip.modeling_blip.BlipAttention": "blip_vision",
                      "transformers.models.blip.modeling_blip_text.BlipTextSelfAttention": "blip_text"}),
    Family("blip-2", ("blip-2",), (("vision_model.", "vision"), ("qformer.", "qformer"), ("language_model.", LANGUAGE_MODEL)),
           prompt_inputs={"Blip2ForConditionalGeneration": (None, 0, True), "Blip2Model": (None, 0, False)},
           tasks=_generation("Blip2ForConditionalGeneration"), lora=r".*\.(query|value|qkv|q_proj|v_proj)$",
           prompt_format="blip2", media=(Media("pixel_values", ROWS, towers=("vision", "qformer")),)),
    Family("instructblip", ("instructblip",),
           (("vision_model.", "vision"), ("qformer.", "qformer"), ("language_model.", LANGUAGE_MODEL)),
           prompt_inputs={"InstructBlipForConditionalGeneration": (None, 0, True)},
           tasks=_generation("InstructBlipForConditionalGeneration"), lora=r".*\.(query|value|qkv|q_proj|v_proj)$",
           prompt_format="blip2", media=(Media("pixel_values", ROWS, towers=("vision", "qformer")),)),
    # GIT: a CLIP image encoder, and one text transformer over [image tokens; text] (hand-written attention).
    Family("git", ("git",), (("image_encoder.", "vision"), ("encoder.", "lm")),
           prompt_inputs={"GitForCausalLM": (None, 1, True)}, tasks=_generation("GitForCausalLM"), image_first=("lm",),
           lora=r".*\.(q_proj|v_proj|query|value)$", media=PER_ROW_IMAGES,  # [rows, frames, ...]: frames row by row
           attention={"transformers.models.git.modeling_git.GitSelfAttention": "git_text"}),
    _vision_lm("llava", "LlavaForConditionalGeneration", "LlavaModel"),
    _vision_lm("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextModel", media=(TILED_IMAGES,)),
    _vision_lm("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel",
               media=(TILED_IMAGES, VIDEOS)),
    _vision_lm("llava_next_video", "LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel",
               media=(TILED_IMAGES, VIDEOS)),
    _vision_lm("paligemma", "PaliGemmaForConditionalGeneration", "PaliGemmaModel",
               aligned_inputs=("token_type_ids",), prompt_format="paligemma"),
    _vision_lm("gemma3", "Gemma3ForConditionalGeneration", "Gemma3Model", aligned_inputs=("token_type_ids",)),
    _vision_lm("mistral3", "Mistral3ForConditionalGeneration", "Mistral3Model", unused=(), media=(),
               unroutable=(("vision", "Pixtral attends over every image of the batch in one sequence with a "
                                      "block-diagonal mask"),)),
    _vision_lm("internvl", "InternVLForConditionalGeneration", "InternVLModel", unused=()),
    _vision_lm("idefics2", "Idefics2ForConditionalGeneration", "Idefics2Model", unused=(),
               towers=(("vision_model.", "vision"), ("connector.", "resampler"), ("text_model.", LANGUAGE_MODEL)),
               cross=("*perceiver_resampler.layers.*",),
               media=(Media("pixel_values", PADDED, "image_token_id", towers=("vision", "resampler")),)),
    _vision_lm("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Model", unused=(),
               towers=(("vision_model.", "vision"), ("connector.", "projector"), ("text_model.", LANGUAGE_MODEL)),
               media=(Media("pixel_values", PADDED, "image_token_id"),)),
    _vision_lm("smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMModel", unused=(),
               towers=(("vision_model.", "vision"), ("connector.", "projector"), ("text_model.", LANGUAGE_MODEL)),
               media=(Media("pixel_values", PADDED, "image_token_id"),)),
    *(
        _vision_lm(name, conditional, base, unused=(), towers=(("visual.", "vision"), ("language_model.", LANGUAGE_MODEL)),
                   media=PACKED, aligned_inputs=("mm_token_type_ids",))
        for name, conditional, base in (
            ("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
            ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
            ("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLModel"),
        )
    ),
    *(
        _vision_lm(name, conditional, base, unused=(), towers=(("visual.", "vision"), ("language_model.", LANGUAGE_MODEL)),
                   media=GLM_PACKED, aligned_inputs=("mm_token_type_ids",))
        for name, conditional, base in (
            ("glm4v", "Glm4vForConditionalGeneration", "Glm4vModel"),
            ("glm4v_moe", "Glm4vMoeForConditionalGeneration", "Glm4vMoeModel"),
        )
    ),
    # Qwen2.5-Omni's thinker (the part that reads audio, images and video and writes text)
    _vision_lm("qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniThinkerModel",
               unused=(), towers=(("audio_tower.", "audio"), ("visual.", "vision"), ("language_model.", LANGUAGE_MODEL)),
               media=(*PACKED, Media("input_features", UNMAPPED, towers=("audio",))),
               unroutable=(("audio", "its audio tower packs every clip of a call into one sequence of fixed-size "
                                     "chunks, which mmprefix does not map to rows"),)),
    Family("phi4_multimodal", ("phi4_multimodal",),
           (("embed_tokens_extend.image_embed.img_processor.", "vision"),
            ("embed_tokens_extend.audio_embed.encoder.", "audio"), ("layers.", "lm")),
           unused=(("embed_tokens_extend.image_embed.img_processor.head.", SIGLIP_HEAD),),
           feature_layer="vision_config.feature_layer",
           # image_pixel_values: [images, crops, ...], padding crops included; an image's placeholders: one run
           media=(Media("image_pixel_values", FRAMES, "vision_config.image_token_id", count="runs"),
                  Media("audio_input_features", ITEMS, "audio_config.audio_token_id", count="sizes",
                        sizes="audio_embed_sizes", towers=("audio",))),
           prompt_inputs={"Phi4MultimodalForCausalLM": (None, 0, True)}, tasks=_generation("Phi4MultimodalForCausalLM"),
           prompt_format="chat"),
    _vision_lm("deepseek_vl", "DeepseekVLForConditionalGeneration", "DeepseekVLModel", towers=DEEPSEEK_TOWERS,
               unused=(("vision_model.head.", SIGLIP_HEAD),)),
    _vision_lm("deepseek_vl_hybrid", "DeepseekVLHybridForConditionalGeneration", "DeepseekVLHybridModel",
               towers=(("high_res_vision_", "high_res_vision"), *DEEPSEEK_TOWERS), unused=(("vision_model.head.", SIGLIP_HEAD),),
               refused=(("high_res_vision", "its SAM encoder computes attention in its own code, with relative "
                                            "position terms mmprefix does not reproduce"),)),
    # Llama 3.2 Vision: a tiled local vision transformer, a global one, and cross-attention layers in the LM.
    _vision_lm("mllama", "MllamaForConditionalGeneration", "MllamaModel", unused=(),
               towers=(("vision_model.transformer.", "vision"), ("vision_model.global_transformer.", "vision_global"),
                       ("multi_modal_projector.", "projector"), ("language_model.", LANGUAGE_MODEL)),
               aligned_inputs=("cross_attention_mask",),  # pixel_values: [rows, images, tiles, ...], padding kept
               media=(Media("pixel_values", ROWS, towers=("vision", "vision_global")),)),
    _vision_lm("kosmos-2", "Kosmos2ForConditionalGeneration", "Kosmos2Model", unused=(),
               towers=(("vision_model.", "vision"), ("image_to_text_projection.", "projector"), ("text_model.", "lm")),
               cross=("*x_attn",), aligned_inputs=("image_embeds_position_mask",),
               media=(Media("pixel_values", ROWS, towers=("vision", "projector")),),
               prompt_filler="bos_token_id"),  # its positions count every token that is not padding
    Family("florence2", ("florence2",), (("vision_tower.", "vision"), ("language_model.", LANGUAGE_MODEL)),
           refused=(("vision", "its DaViT channel attention attends over channels, with the number of image tokens as "
                     "head size (it changes with the image size), so a prefix has no fixed shape there"),),
           prompt_inputs={"Florence2ForConditionalGeneration": (None, 0, False)}, media=PER_ROW_IMAGES),
    Family("vit", ("vit",), (("", "vision"),), media=PER_ROW_IMAGES),
    Family("vision-encoder-decoder", ("vision-encoder-decoder",), (("encoder.", "vision"), ("decoder.", "text_decoder")),
           media=PER_ROW_IMAGES),
    Family("whisper", ("whisper",), (("encoder.", "audio"), ("decoder.", "text_decoder")),
           media=(Media("input_features", ROWS, towers=("audio",)),)),
    Family("open_clip CLIP", ("open_clip.model.CLIP",), (("visual.", "vision"), ("transformer.", "text")),
           media=PER_ROW_IMAGES, adapter=r".*\.mlp\.c_proj$", **OPEN_CLIP),
    Family("open_clip CustomTextCLIP", ("open_clip.model.CustomTextCLIP",), (("visual.", "vision"), ("text.", "text")),
           media=PER_ROW_IMAGES, **OPEN_CLIP),
    Family("open_clip CoCa", ("open_clip.coca_model.CoCa",),
           (("visual.", "vision"), ("text.", "text"), ("text_decoder.", "text_decoder")), media=PER_ROW_IMAGES,
           **OPEN_CLIP),
)

# Plain language models: every causal or seq2seq LM of transformers (Llama, GPT-2, OPT, T5, BART, ...).
CAUSAL_LM = Family("causal LM", (), DECODER_ONLY_LM, prompt_format="lm")
SEQ2SEQ_LM = Family("seq2seq LM", (), ENCODER_DECODER_LM, prompt_format="lm")
LORA_BY_LM = {"gpt2": r".*\.c_attn$", "t5": r".*\.(q|v)$"}  # model_type -> LoRA targets of a plain LM
POSITIONS_FROM_MASK = ("opt",)  # causal LMs that number positions from the attention mask (a cumsum), not the cache
ADAPTER_BY_LM = {"gpt2": r".*\.mlp\.c_proj$", "t5": r".*\.DenseReluDense\.wo$", "opt": r".*\.fc2$"}

BY_KEY = {key: family for family in FAMILIES for key in family.keys}
