"""Tiny random models of every family mmprefix names, each with its real processor built offline, for the family
test matrix (tests/core/test_families.py) and the compatibility table (benchmarks/compatibility.py).

Sizes: hidden 32, 2 layers, 4 heads (2 key/value heads in the language models), 32 px images. Tokenizers are
word-level over the synthetic world's words plus each family's special tokens (`word_tokenizer`), so that the
real processor classes (LlavaProcessor, Qwen2VLProcessor, ...) run offline and insert the family's image tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import transformers as tf
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

import tiny

WORDS = ["photo", "image", "this", "describe", "picture", "caption", "en", "answer"]
VISION = dict(tiny.VISION)
LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=512, initializer_range=0.2)
PROMPTS = ("what color is the shape", "describe this image")


def word_tokenizer(specials: Sequence[str] = (), bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>",
                   unk: str = "<unk>", add_bos: bool = True, **named: str) -> tf.PreTrainedTokenizerFast:
    """A word-level fast tokenizer over the synthetic world's words; ``specials`` are added as special tokens
    (never split), ``named`` ones (``image_token="<image>"``) also become tokenizer attributes."""
    from mmprefix.embedded import text

    tokens = [pad, unk, bos, eos, *dict.fromkeys([*specials, *named.values()])]
    vocab = {t: i for i, t in enumerate(tokens + sorted(set(text.words()) | set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                      unk_token=unk, padding_side="left", extra_special_tokens=named or None)


def chat_template(image: str) -> str:
    """A chat template in the families' shape: user turn, the image placeholder where the family puts it, the
    text, then the assistant's turn (in words the tiny vocabulary knows)."""
    return ("{% for m in messages %}{% if m['role'] == 'user' %}question : {% else %}answer : {% endif %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image + " {% else %}{{ c['text'] }} {% endif %}"
            "{% endfor %}{% endfor %}{% if add_generation_prompt %}answer :{% endif %}")


def lm_config(tokenizer, **overrides) -> dict:
    """Language-model config fields for a vocabulary that holds every token of ``tokenizer``."""
    return dict(LM, vocab_size=len(tokenizer) + 4, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)


def images(count: int = 2, size: int = 32, seed: int = 5) -> list[Image.Image]:
    """Random RGB images (distinct per row, so that rows differ)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@dataclasses.dataclass
class Case:
    """One class in the family matrix.

    ``build`` makes the model (seeded), ``processor`` its real processor, ``inputs`` a forward batch of two rows
    (labels included where the model scores), ``output`` the per-row tensor to compare. ``sites`` is what the
    tower tables must find: {(tower, kind): count}. ``generation`` is "decoder" (decoder-only: new tokens follow
    ``input_ids``), "seq2seq" (a decoder started from ``decoder_start_token_id``) or None; ``grow`` says how
    inputs aligned with ``input_ids`` extend by one generated token (a fill value, or "last": repeat the last
    column). ``targets``: the prefix's targets (None: every site). ``prompt``: a soft prompt applies."""

    build: Callable[[], Any]
    processor: Callable[[], Any] | None
    inputs: Callable[[Any], dict]
    sites: dict
    output: str | Callable = "logits"  # the output's attribute, or a function of the output
    generation: str | None = "decoder"
    grow: dict = dataclasses.field(default_factory=dict)
    targets: list | None = None
    prompt: bool = True
    text_tower: str = "lm"  # a tower that reads the text (init="text" must reach it with that text)
    per_row: bool = True  # the output has one row per sample (BLIP-VQA's is one loss for the batch)
    suppress: tuple = ()  # tokens generation never picks (default: the processor's added tokens but end of text)
    positions: int | None = 0  # generate() numbers a left-padded prompt from its mask, from this (None: the model does)
    routable: list | None = None  # targets that per-row routing can reach, where some tower is refused
    beams: bool = True  # False: the model's own beam search fails (tests/core/test_families.py shows it on the bare model)
    since: str | None = None  # the transformers version from which the bare model runs (older ones: its own bug)


def seeded(build: Callable[[], Any]) -> Callable[[], Any]:
    def make():
        torch.manual_seed(0)
        return build().eval()

    return make


def processed(prompts: Sequence[str] = PROMPTS, size: int = 32, nested: bool = False, drop: Sequence[str] = (),
              **extra) -> Callable[[Any], dict]:
    """Forward inputs from the family's processor: two images and two prompts, padded (``nested``: the images
    as one list per row; ``drop``: outputs the model's generate does not take)."""

    def inputs(processor) -> dict:
        pictures = images(len(prompts), size)
        pictures = [[p] for p in pictures] if nested else pictures
        batch = processor(images=pictures, text=list(prompts), return_tensors="pt", padding=True, **extra)
        return {k: v for k, v in batch.items() if k not in drop}

    return inputs


# -- LLaVA family ------------------------------------------------------------------------------------------------
def _llava_tokenizer():
    return word_tokenizer(image_token="<image>")


def llava():
    tokenizer = _llava_tokenizer()
    config = tf.LlavaConfig(vision_config=dict(VISION, model_type="clip_vision_model"),
                            text_config=lm_config(tokenizer, model_type="llama"),
                            image_token_id=tokenizer.image_token_id, vision_feature_layer=-2)
    return tf.LlavaForConditionalGeneration(config)


def llava_processor():
    return tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(size={"shortest_edge": 32},
                                                                   crop_size={"height": 32, "width": 32}),
                             tokenizer=_llava_tokenizer(), patch_size=8, vision_feature_select_strategy="default",
                             num_additional_image_tokens=1, chat_template=chat_template("<image>"))




def _next_image_processor(cls=tf.LlavaNextImageProcessor):
    return cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 64], [64, 32]])


def llava_next():
    tokenizer = _llava_tokenizer()
    config = tf.LlavaNextConfig(vision_config=dict(VISION, model_type="clip_vision_model"),
                                text_config=lm_config(tokenizer, model_type="llama"), image_token_id=tokenizer.image_token_id,
                                image_grid_pinpoints=[[32, 64], [64, 32]], vision_feature_layer=-2)
    return tf.LlavaNextForConditionalGeneration(config)


def llava_next_processor():
    return tf.LlavaNextProcessor(image_processor=_next_image_processor(), tokenizer=_llava_tokenizer(), patch_size=8,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=chat_template("<image>"))


def _onevision_tokenizer():
    return word_tokenizer(image_token="<image>", video_token="<video>")


def llava_onevision():
    tokenizer = _onevision_tokenizer()
    config = tf.LlavaOnevisionConfig(vision_config=dict(VISION, model_type="siglip_vision_model"),
                                     text_config=lm_config(tokenizer, model_type="qwen2"),
                                     image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.video_token_id,
                                     image_grid_pinpoints=[[32, 64], [64, 32]], vision_feature_layer=-1)
    return tf.LlavaOnevisionForConditionalGeneration(config)


def llava_onevision_processor():
    return tf.LlavaOnevisionProcessor(image_processor=_next_image_processor(tf.LlavaOnevisionImageProcessor),
                                      tokenizer=_onevision_tokenizer(), num_image_tokens=16,
                                      vision_feature_select_strategy="full", chat_template=chat_template("<image>"),
                                      video_processor=tf.LlavaOnevisionVideoProcessor())


def _paligemma_tokenizer():
    return word_tokenizer(image_token="<image>")


def paligemma():
    tokenizer = paligemma_processor().tokenizer  # the processor adds location and segmentation tokens
    config = tf.PaliGemmaConfig(vision_config=dict(VISION, model_type="siglip_vision_model", projection_dim=32),
                                text_config=lm_config(tokenizer, model_type="gemma", head_dim=8),
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=32)
    return tf.PaliGemmaForConditionalGeneration(config)


def paligemma_processor():
    images = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    images.image_seq_length = 16
    return tf.PaliGemmaProcessor(image_processor=images, tokenizer=_paligemma_tokenizer())


def _gemma3_tokenizer():
    return word_tokenizer(image_token="<image_soft_token>", boi_token="<start_of_image>", eoi_token="<end_of_image>")


def gemma3():
    tokenizer = _gemma3_tokenizer()
    config = tf.Gemma3Config(vision_config=dict(VISION, vision_use_head=False),
                             text_config=lm_config(tokenizer, head_dim=8, sliding_window=8, layer_types=None),
                             mm_tokens_per_image=4, image_token_id=tokenizer.image_token_id,
                             boi_token_id=tokenizer.boi_token_id, eoi_token_id=tokenizer.eoi_token_id)
    model = tf.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # starts at zero: no image would reach the language model
        model.model.multi_modal_projector.mm_input_projection_weight.normal_()
    return model


def gemma3_processor():
    images = tf.Gemma3ImageProcessor(size={"height": 32, "width": 32})
    return tf.Gemma3Processor(image_processor=images, tokenizer=_gemma3_tokenizer(), image_seq_length=4,
                              chat_template=chat_template("<start_of_image>"))


def _pixtral_tokenizer():
    return word_tokenizer(image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")


def mistral3():
    tokenizer = _pixtral_tokenizer()
    vision = dict(VISION, model_type="pixtral", head_dim=8, image_size=32, patch_size=8)
    config = tf.Mistral3Config(vision_config=vision, text_config=lm_config(tokenizer, model_type="mistral"),
                               image_token_id=tokenizer.image_token_id, spatial_merge_size=2, vision_feature_layer=-1)
    return tf.Mistral3ForConditionalGeneration(config)


def mistral3_processor():
    images = tf.PixtralImageProcessor(size={"longest_edge": 32}, patch_size=8)
    return tf.PixtralProcessor(image_processor=images, tokenizer=_pixtral_tokenizer(), patch_size=8,
                               spatial_merge_size=2, chat_template=chat_template("[IMG]"))


def _internvl_tokenizer():
    return word_tokenizer(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                          video_token="<video>")


def internvl():
    tokenizer = _internvl_tokenizer()
    config = tf.InternVLConfig(vision_config=dict(VISION, image_size=[32, 32], patch_size=[8, 8]),
                               text_config=lm_config(tokenizer, model_type="qwen2"),
                               image_token_id=tokenizer.context_image_token_id, downsample_ratio=0.5)
    return tf.InternVLForConditionalGeneration(config)


def internvl_processor():
    images = tf.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=False)
    return tf.InternVLProcessor(image_processor=images, tokenizer=_internvl_tokenizer(), image_seq_length=4,
                                video_processor=tf.InternVLVideoProcessor(), chat_template=chat_template("<IMG_CONTEXT>"))


def _idefics_tokenizer():
    return word_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])


def idefics2():
    tokenizer = _idefics_tokenizer()
    config = tf.Idefics2Config(vision_config=dict(VISION), text_config=lm_config(tokenizer, model_type="mistral"),
                               perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=2,
                                                     resampler_n_heads=4, resampler_head_dim=8, num_key_value_heads=2),
                               image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    return tf.Idefics2ForConditionalGeneration(config)


def idefics2_processor():
    images = tf.Idefics2ImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}, do_image_splitting=False)
    return tf.Idefics2Processor(image_processor=images, tokenizer=_idefics_tokenizer(), image_seq_len=4,
                                chat_template=chat_template("<image>"))


def idefics3(cls=tf.Idefics3ForConditionalGeneration, config_class=tf.Idefics3Config):
    tokenizer = _idefics_tokenizer()
    config = config_class(vision_config=dict(VISION), text_config=lm_config(tokenizer, model_type="llama"),
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2)
    return cls(config)


def idefics3_processor(cls=tf.Idefics3Processor, images=tf.Idefics3ImageProcessor, **videos):
    images = images(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    return cls(image_processor=images, tokenizer=_idefics_tokenizer(), image_seq_len=4,
               chat_template=chat_template("<image>"), **videos)


def smolvlm():
    return idefics3(tf.SmolVLMForConditionalGeneration, tf.SmolVLMConfig)


def smolvlm_processor():
    return idefics3_processor(tf.SmolVLMProcessor, tf.SmolVLMImageProcessor, video_processor=tf.SmolVLMVideoProcessor())


def _qwen_tokenizer():
    return word_tokenizer(["<|vision_start|>", "<|vision_end|>"], image_token="<|image_pad|>", video_token="<|video_pad|>")


QWEN_VISION = dict(depth=2, hidden_size=32, embed_dim=32, num_heads=4, mlp_ratio=2, intermediate_size=64, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32)


def qwen_vl(version: str = "2"):
    """Qwen2-VL, Qwen2.5-VL (window attention in layer 0, full attention in layer 1) or Qwen3-VL."""
    tokenizer = _qwen_tokenizer()
    rope = dict(rope_type="default", mrope_section=[1, 1, 2])
    classes = {
        "2": (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, {}, {}),
        "2.5": (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration,
                dict(window_size=16, fullatt_block_indexes=[1]), {}),
        "3": (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration,
              dict(num_position_embeddings=64, deepstack_visual_indexes=[0]), dict(head_dim=8)),
    }
    config_class, model_class, vision, text = classes[version]
    config = config_class(vision_config=dict(QWEN_VISION, **vision),
                          text_config=lm_config(tokenizer, rope_scaling=rope, rope_parameters=dict(rope, rope_theta=10000.0), **text),
                          image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.video_token_id,
                          vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
                          vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    return model_class(config)


def qwen_vl_processor(version: str = "2"):
    images = tf.Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=4, merge_size=2,
                                      temporal_patch_size=2)
    videos = tf.Qwen3VLVideoProcessor if version == "3" else tf.Qwen2VLVideoProcessor
    processor = {"2": tf.Qwen2VLProcessor, "2.5": tf.Qwen2_5_VLProcessor, "3": tf.Qwen3VLProcessor}[version]
    return processor(image_processor=images, tokenizer=_qwen_tokenizer(), video_processor=videos(patch_size=4, merge_size=2),
                     chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))


def _mllama_tokenizer():
    return word_tokenizer(["<|image|>", "<|python_tag|>"])


def mllama():
    tokenizer = _mllama_tokenizer()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=2, attention_heads=4,
                  image_size=32, patch_size=8, vision_output_dim=64, intermediate_layers_indices=[0], max_num_tiles=2,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], initializer_range=0.2)
    text = lm_config(tokenizer, num_hidden_layers=4, cross_attention_layers=[1, 3], rope_scaling=None)
    config = tf.MllamaConfig(vision_config=vision, text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"))
    model = tf.MllamaForConditionalGeneration(config)
    with torch.no_grad():  # the cross-attention gates start closed: no image would reach the text
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(1.0)
    return model


def mllama_processor():
    images = tf.MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=2)
    return tf.MllamaProcessor(image_processor=images, tokenizer=_mllama_tokenizer(), chat_template=chat_template("<|image|>"))


def _kosmos2_tokenizer():
    return word_tokenizer(bos="<s>", eos="</s>")


def kosmos2():
    tokenizer = kosmos2_processor().tokenizer  # the processor adds its grounding tokens
    config = tf.Kosmos2Config(vision_config=dict(VISION), latent_query_num=64,  # the processor's image tokens
                              text_config=dict(vocab_size=len(tokenizer) + 4, embed_dim=32, layers=2, attention_heads=4,
                                               ffn_dim=64, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return tf.Kosmos2ForConditionalGeneration(config)


def kosmos2_processor():
    images = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tf.Kosmos2Processor(image_processor=images, tokenizer=_kosmos2_tokenizer(), num_patch_index_tokens=16)


def git():
    from mmprefix.embedded import text

    tokenizer = text.bert_tokenizer()
    config = tf.GitConfig(vision_config=dict(VISION), vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                          bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=0)
    return tf.GitForCausalLM(config)


def git_processor():
    from mmprefix.embedded import text

    images = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = text.bert_tokenizer()
    tokenizer.padding_side = "left"
    return tf.GitProcessor(image_processor=images, tokenizer=tokenizer)


BART = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, forced_eos_token_id=None,
            forced_bos_token_id=None, init_std=0.2)


def seq2seq_config(tokenizer, **overrides) -> dict:
    return dict(BART, vocab_size=len(tokenizer) + 4, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id, **overrides)


def _seq2seq_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.padding_side = "right"
    return tokenizer


def bart(cls=tf.BartForConditionalGeneration, config_class=tf.BartConfig):
    return cls(config_class(**seq2seq_config(_seq2seq_tokenizer())))


def mbart():
    return bart(tf.MBartForConditionalGeneration, tf.MBartConfig)


def text_inputs(processor) -> dict:
    """A seq2seq batch: two prompts (right padding) and two targets."""
    batch = dict(processor(text=list(PROMPTS), return_tensors="pt", padding=True))
    batch["labels"] = processor(text=["a red circle", "two shapes"], return_tensors="pt", padding=True)["input_ids"]
    return batch


def _florence2_tokenizer():
    tokenizer = word_tokenizer(image_token="<image>")
    tokenizer.padding_side = "right"
    return tokenizer


def florence2():
    tokenizer = _florence2_tokenizer()
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
                  embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4], window_size=2, projection_dim=32,
                  drop_path_rate=0.0)
    config = tf.Florence2Config(vision_config=vision, text_config=seq2seq_config(tokenizer, model_type="bart"),
                                image_token_id=tokenizer.image_token_id)
    return tf.Florence2ForConditionalGeneration(config)


def florence2_processor():
    images = tf.CLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    images.image_seq_length = 17
    return tf.Florence2Processor(image_processor=images, tokenizer=_florence2_tokenizer())


def siglip(cls=tf.SiglipModel, config_class=tf.SiglipConfig, vision=()):
    tokenizer = word_tokenizer(add_bos=False)
    text = dict(tiny.TEXT, vocab_size=len(tokenizer) + 4, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=64,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return cls(config_class(text_config=text, vision_config=dict(VISION, **dict(vision))))


def siglip_processor():
    tokenizer = word_tokenizer(add_bos=False)
    tokenizer.padding_side = "right"
    return tf.SiglipProcessor(image_processor=tf.SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)


def siglip2():
    return siglip(tf.Siglip2Model, tf.Siglip2Config, vision=dict(num_patches=256, patch_size=16))  # the processor's defaults


def siglip2_processor():
    tokenizer = word_tokenizer(add_bos=False)
    tokenizer.padding_side = "right"
    return tf.Siglip2Processor(image_processor=tf.Siglip2ImageProcessor(), tokenizer=tokenizer)


def contrastive_inputs(processor, **extra) -> dict:
    return dict(processor(images=images(2), text=list(PROMPTS), return_tensors="pt", padding="max_length", max_length=8,
                          **extra))



def embeddings(output) -> torch.Tensor:
    """One row per sample of a contrastive model: its image and text embeddings side by side."""
    return torch.cat([output.image_embeds, output.text_embeds], dim=-1)


def vit():
    return tf.ViTModel(tf.ViTConfig(**VISION))


def vit_processor():
    return tf.ViTImageProcessor(size={"height": 32, "width": 32})


def vision_encoder_decoder():
    tokenizer = _seq2seq_tokenizer()
    decoder = tf.GPT2Config(vocab_size=len(tokenizer) + 4, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            add_cross_attention=True, is_decoder=True, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(tf.ViTConfig(**VISION), decoder)
    config.decoder_start_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return tf.VisionEncoderDecoderModel(config)


def vision_encoder_decoder_processor():
    return tf.TrOCRProcessor(image_processor=vit_processor(), tokenizer=_seq2seq_tokenizer())


def image_to_text_inputs(processor) -> dict:
    return dict(processor(images=images(2), text=["a red circle", "two shapes"], return_tensors="pt", padding=True))


def whisper():
    tokenizer = _seq2seq_tokenizer()
    config = tf.WhisperConfig(**seq2seq_config(tokenizer, num_mel_bins=8, max_source_positions=50, max_target_positions=64),
                              suppress_tokens=None, begin_suppress_tokens=None)
    return tf.WhisperForConditionalGeneration(config)


def whisper_processor():
    features = tf.WhisperFeatureExtractor(feature_size=8, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=64)
    return tf.WhisperProcessor(feature_extractor=features, tokenizer=_seq2seq_tokenizer())


def audio_inputs(processor) -> dict:
    rng = np.random.default_rng(3)
    audio = [rng.standard_normal(16000).astype(np.float32) for _ in range(2)]
    batch = dict(processor(audio=audio, sampling_rate=16000, return_tensors="pt"))
    batch["labels"] = processor(text=["a red circle", "two shapes"], return_tensors="pt", padding=True)["input_ids"]
    return batch


def tiny_seq2seq_sites() -> dict:
    return {("lm_encoder", "self"): 2, ("lm_decoder", "self"): 2, ("lm_decoder", "cross"): 2}


IMAGE_FIRST = [f"<image> {p}" for p in PROMPTS]
SEQ2SEQ_SITES = tiny_seq2seq_sites()

CASES: dict[str, Case] = {
    "llava": Case(seeded(llava), llava_processor, processed(IMAGE_FIRST), {("vision", "self"): 1, ("lm", "self"): 2}),
    "llava_next": Case(seeded(llava_next), llava_next_processor, processed(IMAGE_FIRST),
                       {("vision", "self"): 1, ("lm", "self"): 2}),
    "llava_onevision": Case(seeded(llava_onevision), llava_onevision_processor, processed(IMAGE_FIRST),
                            {("vision", "self"): 2, ("lm", "self"): 2}),
    "paligemma": Case(seeded(paligemma), paligemma_processor, processed(), {("vision", "self"): 2, ("lm", "self"): 2},
                      grow={"token_type_ids": 1}, positions=1),
    "gemma3": Case(seeded(gemma3), gemma3_processor, processed([f"<start_of_image> {p}" for p in PROMPTS], nested=True),
                   {("vision", "self"): 2, ("lm", "self"): 2}, grow={"token_type_ids": 0}),
    "mistral3": Case(seeded(mistral3), mistral3_processor, processed([f"[IMG] {p}" for p in PROMPTS]),
                     {("vision", "self"): 2, ("lm", "self"): 2}, routable=["lm"]),
    "internvl": Case(seeded(internvl), internvl_processor, processed([f"<IMG_CONTEXT> {p}" for p in PROMPTS]),
                     {("vision", "self"): 2, ("lm", "self"): 2}),
    **{name: Case(seeded(build), make, processed(IMAGE_FIRST, nested=True), sites)
       for name, build, make, sites in (
           ("idefics2", idefics2, idefics2_processor,
            {("vision", "self"): 2, ("resampler", "cross"): 2, ("lm", "self"): 2}),
           ("idefics3", idefics3, idefics3_processor, {("vision", "self"): 2, ("lm", "self"): 2}),
           ("smolvlm", smolvlm, smolvlm_processor, {("vision", "self"): 2, ("lm", "self"): 2}))},
    **{name: Case(seeded(functools.partial(qwen_vl, version)), functools.partial(qwen_vl_processor, version),
                  processed([f"<|vision_start|><|image_pad|><|vision_end|> {p}" for p in PROMPTS]),
                  {("vision", "self"): 2, ("lm", "self"): 2}, grow={"mm_token_type_ids": 0}, positions=None)
       for name, version in (("qwen2_vl", "2"), ("qwen2_5_vl", "2.5"), ("qwen3_vl", "3"))},
    "mllama": Case(seeded(mllama), mllama_processor, processed([f"<|image|> {p}" for p in PROMPTS], nested=True),
                   {("vision", "self"): 2, ("vision_global", "self"): 2, ("lm", "self"): [0, 2], ("lm", "cross"): [1, 3]},
                   grow={"cross_attention_mask": "last"}),
    # Prompts of one length: Kosmos-2 numbers positions by non-padding tokens in forward but not in cached
    # decoding, so its own generate() disagrees with its forward on left-padded rows (with or without a prefix).
    "kosmos2": Case(seeded(kosmos2), kosmos2_processor,
                    processed(["<grounding> what color is the shape", "<grounding> what size is the circle"]),
                    {("vision", "self"): 2, ("projector", "cross"): 1, ("lm", "self"): 2},
                    grow={"image_embeds_position_mask": 0}, positions=None),
    "git": Case(seeded(git), git_processor, processed(drop=("token_type_ids",)), {("vision", "self"): 2, ("lm", "self"): 2}),
    # Florence-2's DaViT vision tower is refused (the reason is in the error); its BART part carries prefixes.
    "florence2": Case(seeded(florence2), florence2_processor, processed(["<CAPTION>", "what color is the shape"]),
                      SEQ2SEQ_SITES, generation="seq2seq", targets=["lm_encoder", "lm_decoder"], text_tower="lm_encoder"),
    "siglip": Case(seeded(siglip), siglip_processor, contrastive_inputs,
                   {("vision", "self"): 2, ("vision", "cross"): 1, ("text", "self"): 2}, output=embeddings,
                   generation=None, text_tower="text"),
    "siglip2": Case(seeded(siglip2), siglip2_processor, contrastive_inputs,
                    {("vision", "self"): 2, ("vision", "cross"): 1, ("text", "self"): 2}, output=embeddings,
                    generation=None, text_tower="text"),
    "vit": Case(seeded(vit), vit_processor, lambda p: dict(p(images=images(2), return_tensors="pt")),
                {("vision", "self"): 2}, output="last_hidden_state", generation=None, prompt=False, text_tower="-"),
    "vision_encoder_decoder": Case(seeded(vision_encoder_decoder), vision_encoder_decoder_processor, image_to_text_inputs,
                                   {("vision", "self"): 2, ("text_decoder", "self"): 2, ("text_decoder", "cross"): 2},
                                   generation="seq2seq", prompt=False, text_tower="text_decoder"),
    "bart": Case(seeded(bart), _seq2seq_tokenizer, text_inputs, SEQ2SEQ_SITES, generation="seq2seq",
                 text_tower="lm_encoder"),
    "mbart": Case(seeded(mbart), _seq2seq_tokenizer, text_inputs, SEQ2SEQ_SITES, generation="seq2seq",
                  text_tower="lm_encoder"),
    "whisper": Case(seeded(whisper), whisper_processor, audio_inputs,
                    {("audio", "self"): 2, ("text_decoder", "self"): 2, ("text_decoder", "cross"): 2},
                    generation="seq2seq", prompt=False, text_tower="text_decoder"),
}


def _lm(model_type: str):
    config = tf.AutoConfig.for_model(model_type, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     **{k: v for k, v in LM.items() if k != "initializer_range"})
    return tf.AutoModelForCausalLM.from_config(config)


def left_padded() -> dict:
    """A decoder's batch of two, the first row left-padded (generation continues every row at its end)."""
    ids = tiny.tokens()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _earlier(family: str, sites: dict, processor=None, batch=None, **options) -> Case:
    """A family the tests covered before the matrix (tests/tiny.py builds it, with its own inputs)."""
    build, own_batch, read = tiny.FAMILIES[family]
    batch = batch or own_batch
    options = {"output": read, "suppress": (tiny.IMAGE_TOKEN,), **options}
    return Case(build, processor or (lambda: tiny.processor(family)), lambda _: batch(), sites, **options)


LM_SITES = {("lm", "self"): 2}
BLIP2_SITES = {("vision", "self"): 2, ("qformer", "self"): 2, ("qformer", "cross"): 2}
CASES.update({
    "clip": _earlier("clip", {("vision", "self"): 2, ("text", "self"): 2}, generation=None, text_tower="text",
                     output=embeddings),
    "clip_text": _earlier("clip_text", {("text", "self"): 2}, generation=None, text_tower="text"),
    "clip_vision_proj": _earlier("clip_vision_proj", {("vision", "self"): 2}, generation=None, prompt=False,
                                 text_tower="-"),
    "blip_caption": _earlier("blip_caption", {("vision", "self"): 2, ("text_decoder", "self"): 2,
                                              ("text_decoder", "cross"): 2}, tiny.blip_processor, generation=None,
                             text_tower="text_decoder"),
    "blip_vqa": _earlier("blip_vqa", {("vision", "self"): 2, ("text_encoder", "self"): 2, ("text_encoder", "cross"): 2,
                                      ("text_decoder", "self"): 2, ("text_decoder", "cross"): 2}, tiny.blip_processor,
                         generation=None, text_tower="text_encoder", per_row=False),
    "blip_retrieval": _earlier("blip_retrieval", {("vision", "self"): 2, ("text_encoder", "self"): 2,
                                                  ("text_encoder", "cross"): 2}, tiny.blip_processor, generation=None,
                               text_tower="text_encoder"),
    "blip2_opt": _earlier("blip2_opt", {**BLIP2_SITES, **LM_SITES}),
    "blip2_t5": _earlier("blip2_t5", {**BLIP2_SITES, **tiny_seq2seq_sites()}, generation="seq2seq",
                         text_tower="lm_encoder"),
    "instructblip": _earlier("instructblip", {**BLIP2_SITES, **LM_SITES}),
    "llama": _earlier("llama", LM_SITES, batch=left_padded),
    "gpt2": _earlier("gpt2", LM_SITES, batch=left_padded),
    "opt": _earlier("opt", LM_SITES, batch=left_padded),
    "t5": _earlier("t5", tiny_seq2seq_sites(), generation="seq2seq", text_tower="lm_encoder"),
    **{name: Case(seeded(functools.partial(_lm, name)), tiny.TinyProcessor,
                  lambda _: left_padded(), LM_SITES,
                  suppress=(tiny.IMAGE_TOKEN,))
       for name in ("mistral", "qwen2")},
})

# tiny_vlms adds the VLM classes the generic fallback covers and the newer records to CASES; it reuses the helpers
# above, so it is imported last, for that effect alone
importlib.import_module("tiny_vlms")
