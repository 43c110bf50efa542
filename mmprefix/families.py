"""One record per model family: everything mmprefix knows about a family, in one place.

A record names the family's towers (module-name prefixes, under the model's ``base_model_prefix`` or not), what
counts as cross-attention beyond the usual names, attention whose output the model never reads (no gradient
could ever reach a prefix there), towers it cannot reach and why, where a soft prompt goes, which class to load
per task, LoRA's target modules, the prompt format of the recipes and evaluation (``data/formatting.py``), and,
for vision towers that do not see one image per text row, how images map to rows. Adding a family is one record
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

DEFAULT_LORA = r".*\.(q_proj|v_proj)$"  # Llama, Mistral, Qwen2, OPT, BART, and the LMs inside today's VLMs
# The feed-forward output projection a bottleneck adapter follows (mmprefix.adapters): CLIP-style vision and text
# towers (mlp.fc2) and Llama-style LMs (mlp.down_proj), so CLIP, LLaVA-style VLMs and most LMs.
DEFAULT_ADAPTER = r".*\.mlp\.(fc2|down_proj)$"


class Images(NamedTuple):
    """How the images of a call reach a vision tower whose batch is not one image per text row.

    ``"tiles"``: ``pixel_values`` is ``[rows, tiles, ...]`` and the tower sees every tile that is not all zeros
    (padding), row after row. ``"grid"``: every image of the batch is packed into one sequence cut by
    ``cu_seqlens`` (Qwen-VL); ``grid`` is the input holding each image's ``(t, h, w)`` patch grid and ``token``
    the config attribute of the image placeholder token, whose runs in ``input_ids`` count each row's images.
    """

    kind: str
    grid: str = "image_grid_thw"
    token: str = "image_token_id"
    towers: tuple[str, ...] = ("vision",)  # the towers whose batch is the images (or tiles), not the text rows


@dataclass(frozen=True)
class Family:
    """What mmprefix knows about one model family (see the module docstring)."""

    name: str
    keys: tuple[str, ...]  # config.model_type values, or qualified class names (open_clip)
    towers: tuple[tuple[str, str], ...]  # (module-name prefix, tower); the first matching prefix wins
    cross: tuple[str, ...] = ()  # fnmatch patterns on module names: cross-attention with no usual name
    unused: tuple[tuple[str, str], ...] = ()  # (module-name prefix, why the model never reads its output)
    refused: tuple[tuple[str, str], ...] = ()  # (tower, why mmprefix cannot reach its attention)
    # class name -> (token-embedding path or None for get_input_embeddings(), column, labels follow input_ids)
    prompt_inputs: dict[str, tuple[str | None, int, bool]] = field(default_factory=dict)
    aligned_inputs: tuple[str, ...] = ()  # inputs aligned with input_ids: a soft prompt inserts zeros there too
    tasks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task -> transformers classes to load
    lora: str = DEFAULT_LORA
    prompt_format: str | None = None  # "blip", "blip2", "chat", "paligemma"; None: "lm" (data/formatting.py)
    images: Images | None = None
    packed: tuple[str, ...] = ()  # towers whose attention runs once per image chunk of a packed sequence
    unroutable: tuple[tuple[str, str], ...] = ()  # (tower, why one call cannot give its rows different prefixes)
    image_first: tuple[str, ...] = ()  # towers that see the image's tokens in front of input_ids (GIT)
    prompt_filler: str = "pad_token_id"  # text-config attribute: the token id a soft prompt's placeholders hold
    adapter: str = DEFAULT_ADAPTER  # module names of the feed-forward output projections adapters follow


def _generation(*classes: str) -> dict[str, tuple[str, ...]]:
    return {"vqa": classes, "caption": classes}


def _contrastive(*classes: str) -> dict[str, tuple[str, ...]]:
    return {"classification": classes, "retrieval": classes}


VISION_LM = (("vision_tower.", "vision"), ("multi_modal_projector.", "projector"), ("language_model.", LANGUAGE_MODEL))
UNUSED_VISION_HEAD = (("vision_tower.head.", "the model reads the vision tower's patch features, not its pooled output"),)


def _vision_lm(name: str, *classes: str, unused=UNUSED_VISION_HEAD, **options) -> Family:
    """A LLaVA-style record: vision tower, projector, language model; chat-template prompts."""
    conditional = classes[0]
    return Family(
        name, (name,), options.pop("towers", VISION_LM), unused=unused,
        prompt_inputs={c: (None, 0, c == conditional) for c in classes}, tasks=_generation(conditional),
        prompt_format=options.pop("prompt_format", "chat"), **options,
    )


FAMILIES: tuple[Family, ...] = (
    Family("clip", ("clip",), (("vision_model.", "vision"), ("text_model.", "text")),
           prompt_inputs={"CLIPModel": ("text_model.embeddings.token_embedding", 1, False),
                          "CLIPTextModel": (None, 1, False), "CLIPTextModelWithProjection": (None, 1, False)},
           tasks=_contrastive("CLIPModel")),
    # The pooling head is a learned probe attending to the patches: cross-attention, like CoCa's pooler.
    Family("siglip", ("siglip", "siglip2"), (("vision_model.", "vision"), ("text_model.", "text")),
           cross=("*head.attention",), tasks=_contrastive("SiglipModel", "Siglip2Model"),
           prompt_inputs={c: ("text_model.embeddings.token_embedding", 0, False) for c in ("SiglipModel", "Siglip2Model")}),
    Family("blip", ("blip",), (("vision_model.", "vision"), ("text_encoder.", "text_encoder"),
                                ("text_decoder.", "text_decoder")),
           prompt_inputs={"BlipForConditionalGeneration": (None, 1, True), "BlipForQuestionAnswering": (None, 1, False),
                          "BlipForImageTextRetrieval": (None, 1, False)},
           tasks={"vqa": ("BlipForQuestionAnswering",), "caption": ("BlipForConditionalGeneration",)},
           lora=r".*\.(query|value|qkv)$", prompt_format="blip",
           adapter=r".*(\.mlp\.fc2|\.layer\.\d+\.output\.dense)$"),  # vision MLP; text FFN, not attention output
    Family("blip-2", ("blip-2",), (("vision_model.", "vision"), ("qformer.", "qformer"), ("language_model.", LANGUAGE_MODEL)),
           prompt_inputs={"Blip2ForConditionalGeneration": (None, 0, True), "Blip2Model": (None, 0, False)},
           tasks=_generation("Blip2ForConditionalGeneration"), lora=r".*\.(query|value|qkv|q_proj|v_proj)$",
           prompt_format="blip2"),
    Family("instructblip", ("instructblip",),
           (("vision_model.", "vision"), ("qformer.", "qformer"), ("language_model.", LANGUAGE_MODEL)),
           prompt_inputs={"InstructBlipForConditionalGeneration": (None, 0, True)},
           tasks=_generation("InstructBlipForConditionalGeneration"), lora=r".*\.(query|value|qkv|q_proj|v_proj)$",
           prompt_format="blip2"),
    # GIT: a CLIP image encoder, and one text transformer over [image tokens; text] (hand-written attention).
    Family("git", ("git",), (("image_encoder.", "vision"), ("encoder.", "lm")),
           prompt_inputs={"GitForCausalLM": (None, 1, True)}, tasks=_generation("GitForCausalLM"), image_first=("lm",),
           lora=r".*\.(q_proj|v_proj|query|value)$"),
    _vision_lm("llava", "LlavaForConditionalGeneration", "LlavaModel"),
    _vision_lm("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextModel", images=Images("tiles")),
    _vision_lm("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel",
               images=Images("tiles")),
    _vision_lm("paligemma", "PaliGemmaForConditionalGeneration", "PaliGemmaModel",
               aligned_inputs=("token_type_ids",), prompt_format="paligemma"),
    _vision_lm("gemma3", "Gemma3ForConditionalGeneration", "Gemma3Model", aligned_inputs=("token_type_ids",)),
    _vision_lm("mistral3", "Mistral3ForConditionalGeneration", "Mistral3Model", unused=(),
               unroutable=(("vision", "Pixtral attends over every image of the batch in one sequence with a "
                                      "block-diagonal mask"),)),
    _vision_lm("internvl", "InternVLForConditionalGeneration", "InternVLModel", unused=()),
    _vision_lm("idefics2", "Idefics2ForConditionalGeneration", "Idefics2Model", unused=(),
               towers=(("vision_model.", "vision"), ("connector.", "resampler"), ("text_model.", LANGUAGE_MODEL)),
               cross=("*perceiver_resampler.layers.*",), images=Images("tiles", towers=("vision", "resampler"))),
    _vision_lm("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Model", unused=(),
               towers=(("vision_model.", "vision"), ("connector.", "projector"), ("text_model.", LANGUAGE_MODEL)),
               images=Images("tiles")),
    _vision_lm("smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMModel", unused=(),
               towers=(("vision_model.", "vision"), ("connector.", "projector"), ("text_model.", LANGUAGE_MODEL)),
               images=Images("tiles")),
    *(
        _vision_lm(name, conditional, base, unused=(), towers=(("visual.", "vision"), ("language_model.", LANGUAGE_MODEL)),
                   images=Images("grid"), packed=("vision",), aligned_inputs=("mm_token_type_ids",))
        for name, conditional, base in (
            ("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
            ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
            ("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLModel"),
        )
    ),
    # Llama 3.2 Vision: a tiled local vision transformer, a global one, and cross-attention layers in the LM.
    _vision_lm("mllama", "MllamaForConditionalGeneration", "MllamaModel", unused=(),
               towers=(("vision_model.transformer.", "vision"), ("vision_model.global_transformer.", "vision_global"),
                       ("multi_modal_projector.", "projector"), ("language_model.", LANGUAGE_MODEL)),
               aligned_inputs=("cross_attention_mask",)),
    _vision_lm("kosmos-2", "Kosmos2ForConditionalGeneration", "Kosmos2Model", unused=(),
               towers=(("vision_model.", "vision"), ("image_to_text_projection.", "projector"), ("text_model.", "lm")),
               cross=("*x_attn",), aligned_inputs=("image_embeds_position_mask",),
               prompt_filler="bos_token_id"),  # its positions count every token that is not padding
    Family("florence2", ("florence2",), (("vision_tower.", "vision"), ("language_model.", LANGUAGE_MODEL)),
           refused=(("vision", "its DaViT channel attention attends over channels, with the number of image tokens as "
                     "head size (it changes with the image size), so a prefix has no fixed shape there"),),
           prompt_inputs={"Florence2ForConditionalGeneration": (None, 0, False)}),
    Family("vit", ("vit",), (("", "vision"),)),
    Family("vision-encoder-decoder", ("vision-encoder-decoder",), (("encoder.", "vision"), ("decoder.", "text_decoder"))),
    Family("whisper", ("whisper",), (("encoder.", "audio"), ("decoder.", "text_decoder"))),
    Family("open_clip CLIP", ("open_clip.model.CLIP",), (("visual.", "vision"), ("transformer.", "text")),
           adapter=r".*\.mlp\.c_proj$"),
    Family("open_clip CustomTextCLIP", ("open_clip.model.CustomTextCLIP",), (("visual.", "vision"), ("text.", "text"))),
    Family("open_clip CoCa", ("open_clip.coca_model.CoCa",),
           (("visual.", "vision"), ("text.", "text"), ("text_decoder.", "text_decoder"))),
)

# Plain language models: every causal or seq2seq LM of transformers (Llama, GPT-2, OPT, T5, BART, ...).
CAUSAL_LM = Family("causal LM", (), DECODER_ONLY_LM, prompt_format="lm")
SEQ2SEQ_LM = Family("seq2seq LM", (), ENCODER_DECODER_LM, prompt_format="lm")
LORA_BY_LM = {"gpt2": r".*\.c_attn$", "t5": r".*\.(q|v)$"}  # model_type -> LoRA targets of a plain LM
ADAPTER_BY_LM = {"gpt2": r".*\.mlp\.c_proj$", "t5": r".*\.DenseReluDense\.wo$", "opt": r".*\.fc2$"}

BY_KEY = {key: family for family in FAMILIES for key in family.keys}
