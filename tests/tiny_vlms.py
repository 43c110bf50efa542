"""Tiny random models of the VLM classes issue 25 adds to the family matrix, and routing batches for every VLM.

Same conventions as ``tiny_families.py`` (hidden 32, 2 layers, 4 heads, word-level tokenizers, each class's real
processor built offline). ``CASES``: name -> `Case` (a two-row batch from the processor). ``ROUTING``: name ->
{case: callable(processor) -> batch} for the routing cases the model accepts: ``two_images`` (row 0 two images,
row 1 text only), ``image_video`` (row 0 an image, row 1 a video), ``sizes`` (two images of different sizes),
``audio_image`` (row 0 audio, row 1 an image), ``video_text`` (row 0 a video, row 1 text only: for models that cannot
batch images with videos), ``two_and_one`` (two images and one: Mllama cannot batch a row without images).

Importing this module adds ``CASES`` to ``tiny_families.CASES`` (the family matrix); ``tiny_families`` imports it at
its end, so either module can be imported first.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
import transformers as tf

import tiny_families
from tiny_families import VISION, Case, chat_template, images, lm_config, seeded, word_tokenizer

PROMPTS = ("what color is the shape", "describe this image")


def frames(count: int = 4, size: int = 32, seed: int = 7) -> np.ndarray:
    """A random video: ``count`` RGB frames, [frames, height, width, 3] uint8."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def call(processor, text: Sequence[str], **inputs) -> dict:
    """The processor's batch (left padding: the tokenizers' side), as a plain dict; bfloat16 pixels (Llama 4's
    processor rescales in bfloat16) in float32, the tiny models' dtype."""
    batch = dict(processor(text=list(text), return_tensors="pt", padding=True, **inputs))
    return {k: v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v for k, v in batch.items()}


def two_images(marker: str, nested: bool = False, size: int = 32) -> Callable[[object], dict]:
    """Row 0: two images (``marker`` twice), row 1: text only (``nested``: the images as one list per row)."""

    def build(processor) -> dict:
        pictures = images(2, size)
        text = [f"{marker} {marker} {PROMPTS[0]}", PROMPTS[1]]
        return call(processor, text, images=[pictures, []] if nested else pictures)

    return build


def two_images_apart(marker: str, nested: bool = False) -> Callable[[object], dict]:
    """As `two_images`, with a word between the two images: their placeholder runs do not touch."""

    def build(processor) -> dict:
        pictures = images(2)
        text = [f"{marker} and {marker} {PROMPTS[0]}", PROMPTS[1]]
        return call(processor, text, images=[pictures, []] if nested else pictures)

    return build


def two_and_one(marker: str, nested: bool = False) -> Callable[[object], dict]:
    """Row 0: two images, row 1: one (Mllama's processor cannot batch a row without images: its aspect ratios
    then have fewer rows than its pixels)."""

    def build(processor) -> dict:
        pictures = images(3)
        text = [f"{marker} {marker} {PROMPTS[0]}", f"{marker} {PROMPTS[1]}"]
        return call(processor, text, images=[pictures[:2], pictures[2:]] if nested else pictures)

    return build


def sizes(marker: str, nested: bool = False, shapes=((32, 32), (32, 64))) -> Callable[[object], dict]:
    """Two rows, one image each, of different sizes (``shapes``: (height, width))."""

    def build(processor) -> dict:
        pictures = [images(1, seed=5 + i)[0].resize((w, h)) for i, (h, w) in enumerate(shapes)]
        text = [f"{marker} {p}" for p in PROMPTS]
        return call(processor, text, images=[[p] for p in pictures] if nested else pictures)

    return build


QWEN_VIDEO_SIZE = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32}  # pixels per frame: 32 px frames stay 32 px


def image_video(image_marker: str, video_marker: str, nested: bool = False, count: int = 4,
                **videos_kwargs) -> Callable[[object], dict]:
    """Row 0: an image, row 1: a video of ``count`` frames (``videos_kwargs``: for the video processor)."""

    def build(processor) -> dict:
        text = [f"{image_marker} {PROMPTS[0]}", f"{video_marker} {PROMPTS[1]}"]
        picture = images(1)
        return call(processor, text, images=[picture, []] if nested else picture, videos=[frames(count)],
                    **({"videos_kwargs": videos_kwargs} if videos_kwargs else {}))

    return build


# -- Llama 4 -------------------------------------------------------------------------------------------------------
LLAMA4_TOKENS = dict(image_token="<|image|>", start_of_image_token="<|image_start|>", end_of_image_token="<|image_end|>",
                     patch_token="<|patch|>", tile_x_separator_token="<|tile_x_separator|>",
                     tile_y_separator_token="<|tile_y_separator|>")


def _llama4_tokenizer():
    return word_tokenizer(list(LLAMA4_TOKENS.values()))


def llama4():
    tokenizer = _llama4_tokenizer()
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in LLAMA4_TOKENS.items()}
    # intermediate_size: also the pixel-shuffle MLP's input, hidden_size / pixel_shuffle_ratio**2
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    text = lm_config(tokenizer, intermediate_size_mlp=64, head_dim=8, num_local_experts=2, attention_chunk_size=64,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    config = tf.Llama4Config(vision_config=vision, text_config=text, image_token_id=ids["patch_token"],
                             boi_token_index=ids["start_of_image_token"], eoi_token_index=ids["end_of_image_token"])
    return tf.Llama4ForConditionalGeneration(config)


def llama4_processor():
    images_ = tf.Llama4ImageProcessor(size={"height": 32, "width": 32}, max_patches=4)
    return tf.Llama4Processor(image_processor=images_, tokenizer=_llama4_tokenizer(), patch_size=8,
                              pixel_shuffle_ratio=0.5, chat_template=chat_template("<|image|>"))


# -- Aya Vision, Cohere2-Vision (SigLIP tiles, pixel shuffle, Cohere2 LM) ---------------------------------------------
AYA_TOKENS = ["<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE_GLOBAL",
              *(f"TILE_{i}" for i in range(1, 5))]
COHERE2 = dict(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
SIGLIP = dict(VISION, model_type="siglip_vision_model")


def _aya_tokenizer():
    return word_tokenizer(AYA_TOKENS)


def aya_vision():
    tokenizer = _aya_tokenizer()
    config = tf.AyaVisionConfig(vision_config=SIGLIP, text_config=lm_config(tokenizer, model_type="cohere2", **COHERE2),
                                image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2)
    return tf.AyaVisionForConditionalGeneration(config)


def aya_vision_processor():
    images_ = tf.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4)
    return tf.AyaVisionProcessor(image_processor=images_, tokenizer=_aya_tokenizer(), patch_size=8, img_size=32,
                                 downsample_factor=2, chat_template=chat_template("<image>"))


def _cohere2_vision_tokenizer():
    return word_tokenizer(image_token="<image>", boi_token="<|START_OF_IMG|>", eoi_token="<|END_OF_IMG|>",
                          img_line_break_token="<|IMG_LINE_BREAK|>")


def cohere2_vision():
    tokenizer = _cohere2_vision_tokenizer()
    config = tf.Cohere2VisionConfig(vision_config=SIGLIP,
                                    text_config=lm_config(tokenizer, model_type="cohere2", **COHERE2),
                                    image_token_id=tokenizer.image_token_id, downsample_factor=2,
                                    alignment_intermediate_size=64)
    return tf.Cohere2VisionForConditionalGeneration(config)


def cohere2_vision_processor():
    # patch_size: image tokens per tile side (32 px / SigLIP's 8 px patches / downsample 2)
    images_ = tf.Cohere2VisionImageProcessor(size={"height": 32, "width": 32}, max_patches=4, patch_size=2)
    return tf.Cohere2VisionProcessor(image_processor=images_, tokenizer=_cohere2_vision_tokenizer(),
                                     chat_template=chat_template("<image>"))


# -- Ovis2 (AIMv2 tiles, a visual embedding table) ------------------------------------------------------------------
OVIS2_INDICATORS = ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]


def _ovis2_tokenizer():
    return word_tokenizer(["<image>", "<IMG_ATOM>", *OVIS2_INDICATORS])


def ovis2():
    tokenizer = _ovis2_tokenizer()
    vision = dict(VISION, hidden_stride=2, vocab_size=64, num_visual_indicator_tokens=len(OVIS2_INDICATORS))
    text = lm_config(tokenizer, model_type="qwen2")
    config = tf.Ovis2Config(vision_config=vision, text_config=text, hidden_size=32, vocab_size=text["vocab_size"],
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_ATOM>"),
                            visual_indicator_token_ids=tokenizer.convert_tokens_to_ids(OVIS2_INDICATORS))
    return tf.Ovis2ForConditionalGeneration(config)


def ovis2_processor():
    images_ = tf.Ovis2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4)
    return tf.Ovis2Processor(image_processor=images_, tokenizer=_ovis2_tokenizer(), image_seq_length=4,
                             chat_template=chat_template("<image>"))


# -- Fuyu (no vision transformer: patches go through a linear layer into the Persimmon LM) ---------------------------
FUYU_TOKENS = ["|SPEAKER|", "|NEWLINE|", "<0x04>"]


def _fuyu_tokenizer():
    """Word-level like the others, but every text starts with SentencePiece's "▁", which Fuyu's processor drops
    from the encoding of the image placeholders (its image tokens are plain words here, not added tokens, so that
    the "▁" goes in front of them too)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    words = ["<pad>", "<unk>", "<s>", "</s>", "▁", *FUYU_TOKENS]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words + list(word_tokenizer().get_vocab())))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Prepend("▁")
    pattern = "|".join(map(re.escape, words[4:]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(rf"{pattern}|\w+|[^\w\s]"), "removed", invert=True)
    backend.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in words[:4]])
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", padding_side="left")


def fuyu():
    tokenizer = _fuyu_tokenizer()
    text = lm_config(tokenizer, model_type="persimmon", rope_parameters=dict(rope_type="default", rope_theta=25000.0,
                                                                           partial_rotary_factor=0.5))
    text.pop("num_key_value_heads")
    config = tf.FuyuConfig(text_config=text, image_size=32, patch_size=8,
                           image_token_id=tokenizer.convert_tokens_to_ids("|SPEAKER|"))
    return tf.FuyuForCausalLM(config)


def fuyu_processor():
    images_ = tf.FuyuImageProcessor(size={"height": 32, "width": 32}, patch_size={"height": 8, "width": 8})
    return tf.FuyuProcessor(image_processor=images_, tokenizer=_fuyu_tokenizer())


def fuyu_inputs(pictures: list) -> Callable[[object], dict]:
    """Fuyu's processor puts each row's image (or none: ``[]``) in front of its text itself."""

    def build(processor) -> dict:
        return call(processor, PROMPTS, images=pictures, return_legacy_image_output=False)

    return build


# -- LLaVA-NeXT-Video (LLaVA-NeXT's tiles for images, pooled frames for videos) ----------------------------------------
NEXT_VIDEO_PINPOINTS = [[32, 32], [32, 64], [64, 32]]  # a 32 px square image takes 2 tiles, a 32x64 one 3


def _next_video_tokenizer():
    return word_tokenizer(image_token="<image>", video_token="<video>")


def llava_next_video():
    tokenizer = _next_video_tokenizer()
    config = tf.LlavaNextVideoConfig(vision_config=dict(VISION, model_type="clip_vision_model"),
                                     text_config=lm_config(tokenizer, model_type="llama"),
                                     image_token_index=tokenizer.image_token_id,
                                     video_token_index=tokenizer.video_token_id,
                                     image_grid_pinpoints=NEXT_VIDEO_PINPOINTS, vision_feature_layer=-2)
    return tf.LlavaNextVideoForConditionalGeneration(config)


def llava_next_video_processor():
    videos = tf.LlavaNextVideoVideoProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images_ = tf.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         image_grid_pinpoints=NEXT_VIDEO_PINPOINTS)
    return tf.LlavaNextVideoProcessor(video_processor=videos, image_processor=images_, tokenizer=_next_video_tokenizer(),
                                      patch_size=8, vision_feature_select_strategy="default",
                                      num_additional_image_tokens=1, chat_template=chat_template("<image>"))


# -- GLM-4V, GLM-4.1V-MoE (Qwen-VL-like packed vision tower; a video's frames use the image token) ---------------------
GLM_TOKENS = ["<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"]
GLM_VISION = dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=4, image_size=32,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32)
GLM_ROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2], partial_rotary_factor=1.0)


def _glm4v_tokenizer():
    return word_tokenizer(GLM_TOKENS, image_token="<|image|>", video_token="<|video|>")


def _glm_ids(tokenizer) -> dict:
    ids = dict(zip(("image_start_token_id", "image_end_token_id", "video_start_token_id", "video_end_token_id"),
                   tokenizer.convert_tokens_to_ids(GLM_TOKENS)))
    return dict(ids, image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.video_token_id)


def glm4v(model_class=tf.Glm4vForConditionalGeneration, config_class=tf.Glm4vConfig, **text):
    tokenizer = _glm4v_tokenizer()
    config = config_class(vision_config=GLM_VISION, text_config=lm_config(tokenizer, rope_parameters=GLM_ROPE, **text),
                          **_glm_ids(tokenizer))
    return model_class(config)


def glm4v_processor():
    images_ = tf.Glm4vImageProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=4, merge_size=2,
                                     temporal_patch_size=2)
    videos = tf.Glm4vVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 4},
                                    max_image_size={"longest_edge": 32 * 32 * 4}, patch_size=4, merge_size=2,
                                    temporal_patch_size=2, do_sample_frames=False)
    return tf.Glm4vProcessor(image_processor=images_, tokenizer=_glm4v_tokenizer(), video_processor=videos,
                             chat_template=chat_template("<|begin_of_image|><|image|><|end_of_image|>"))


def glm4v_moe():
    return glm4v(tf.Glm4vMoeForConditionalGeneration, tf.Glm4vMoeConfig, n_routed_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1)


def glm4v_moe_processor():
    return glm4v_processor()


def video_text(video_marker: str, count: int = 4, **videos_kwargs) -> Callable[[object], dict]:
    """Row 0: a video of ``count`` frames, row 1: text only (for models that cannot mix images and videos in a
    batch: GLM-4V counts a video's frames as image tokens, SmolVLM's processor drops the images)."""

    def build(processor) -> dict:
        return call(processor, [f"{video_marker} {PROMPTS[0]}", PROMPTS[1]], videos=[frames(count)],
                    **({"videos_kwargs": videos_kwargs} if videos_kwargs else {}))

    return build


# -- Qwen2.5-Omni's thinker (packed vision tower for images and videos, packed Whisper-like audio tower) ---------------
OMNI_TOKENS = dict(image_token="<|IMAGE|>", audio_token="<|AUDIO|>", video_token="<|VIDEO|>",
                   vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
                   audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
AUDIO = dict(sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=64)  # 1 s of audio: 100 mel frames


def _omni_tokenizer():
    return word_tokenizer(["user"], **OMNI_TOKENS)


def qwen2_5_omni():
    tokenizer = _omni_tokenizer()
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in OMNI_TOKENS.items()}
    vision = dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
    audio = dict(num_mel_bins=8, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 output_dim=32, n_window=10, max_source_positions=64)
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])
    config = tf.Qwen2_5OmniThinkerConfig(
        audio_config=audio, vision_config=vision, text_config=lm_config(tokenizer, rope_parameters=rope),
        image_token_index=ids["image_token"], video_token_index=ids["video_token"], audio_token_index=ids["audio_token"],
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
        audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
        user_token_id=tokenizer.convert_tokens_to_ids("user"))
    return tf.Qwen2_5OmniThinkerForConditionalGeneration(config)


def qwen2_5_omni_processor():
    images_ = tf.Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=4, merge_size=2,
                                       temporal_patch_size=2)
    videos = tf.Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, size=QWEN_VIDEO_SIZE)
    features = tf.WhisperFeatureExtractor(feature_size=8, **AUDIO)
    return tf.Qwen2_5OmniProcessor(image_processor=images_, video_processor=videos, feature_extractor=features,
                                   tokenizer=_omni_tokenizer(),
                                   chat_template=chat_template("<|vision_bos|><|IMAGE|><|vision_eos|>"))


def sound(count: int = 1, seconds: float = 1.0, seed: int = 3) -> list[np.ndarray]:
    """Random 16 kHz audio clips."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(16000 * seconds)).astype(np.float32) for _ in range(count)]


def audio_image(audio_marker: str, image_marker: str, nested: bool = False) -> Callable[[object], dict]:
    """Row 0: an audio clip, row 1: an image."""

    def build(processor) -> dict:
        text = [f"{audio_marker} {PROMPTS[0]}", f"{image_marker} {PROMPTS[1]}"]
        picture = images(1)
        return call(processor, text, images=[picture] if nested else picture, audio=sound(1))

    return build


# -- Phi-4-multimodal (SigLIP crops and a Conformer audio encoder inside the embedding layer) -------------------------
def _phi4_tokenizer():
    return word_tokenizer(image_token="<|image|>", audio_token="<|audio|>")


def phi4_multimodal():
    tokenizer = _phi4_tokenizer()
    # 32 px crops of 1 px patches: the processor counts image tokens for a 32x32 patch grid (16x16 after pooling)
    vision = dict(VISION, patch_size=1, crop_size=32, image_token_id=tokenizer.image_token_id, feature_layer=-2)
    audio = dict(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=4, ext_pw_out_channel=32,
                 depthwise_separable_out_channel=32, nemo_conv_channels=32, input_size=16, time_reduction=8,
                 left_chunk=2, audio_token_id=tokenizer.audio_token_id, feature_layer=-2)
    text = lm_config(tokenizer, rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75),
                     max_position_embeddings=2048)  # an image takes 545 tokens
    config = tf.Phi4MultimodalConfig(vision_config=vision, audio_config=audio, **text)
    return tf.Phi4MultimodalForCausalLM(config)


def phi4_multimodal_processor():
    images_ = tf.Phi4MultimodalImageProcessor(size={"height": 32, "width": 32}, patch_size=1, dynamic_hd=4)
    features = tf.Phi4MultimodalFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, n_fft=512,
                                                 win_length=400, audio_compression_rate=8)
    return tf.Phi4MultimodalProcessor(image_processor=images_, audio_processor=features, tokenizer=_phi4_tokenizer(),
                                      chat_template=chat_template("<|image|>"))


# -- DeepSeek-VL (SigLIP, whose pooling head the model never reads) and DeepSeek-VL-Hybrid (plus a SAM encoder) -------
def _deepseek_tokenizer():
    return word_tokenizer(image_token="<image_placeholder>")


def deepseek_vl():
    tokenizer = _deepseek_tokenizer()
    config = tf.DeepseekVLConfig(vision_config=SIGLIP, text_config=lm_config(tokenizer, model_type="llama"),
                                 image_token_id=tokenizer.image_token_id)
    return tf.DeepseekVLForConditionalGeneration(config)


def deepseek_vl_processor():
    images_ = tf.DeepseekVLImageProcessor(size={"height": 32, "width": 32})
    return tf.DeepseekVLProcessor(image_processor=images_, tokenizer=_deepseek_tokenizer(), num_image_tokens=16,
                                  chat_template=chat_template("<image_placeholder>"))


# SAM on 64 px images of 8 px patches: 8x8 tokens, windows of 4x4 in layer 0, global attention in layer 1
SAM = dict(hidden_size=32, output_channels=8, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8,
           window_size=4, global_attn_indexes=[1], mlp_dim=64, initializer_range=0.02)


def deepseek_vl_hybrid():
    tokenizer = _deepseek_tokenizer()
    config = tf.DeepseekVLHybridConfig(vision_config=SIGLIP, high_res_vision_config=SAM,
                                       text_config=lm_config(tokenizer, model_type="llama"),
                                       image_token_id=tokenizer.image_token_id)
    model = tf.DeepseekVLHybridForConditionalGeneration(config)
    with torch.no_grad():  # starts at zero: the SAM layer before the neck would get no gradient through it
        model.model.high_res_vision_alpha.fill_(1.0)
    return model


def deepseek_vl_hybrid_processor():
    images_ = tf.DeepseekVLHybridImageProcessor(size={"height": 32, "width": 32}, high_res_size={"height": 64, "width": 64})
    return tf.DeepseekVLHybridProcessor(image_processor=images_, tokenizer=_deepseek_tokenizer(), num_image_tokens=16,
                                        chat_template=chat_template("<image_placeholder>"))


# -- Chameleon (a VQ-VAE turns images into discrete tokens of the LM's vocabulary: no vision attention) ---------------
def _chameleon_tokenizer():
    codes = ["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z" for i in range(16)]  # code i's BPE name
    return word_tokenizer(["<racm3:break>", "<eoss>", *codes], image_token="<image>")


def chameleon():
    tokenizer = _chameleon_tokenizer()
    vq = dict(embed_dim=32, num_embeddings=16, latent_channels=32, resolution=32, base_channels=32,
              channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=None)  # 32 px -> 4x4 codes
    text = lm_config(tokenizer, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    config = tf.ChameleonConfig(**text, vq_config=vq, vocabulary_map=tokenizer.get_vocab())
    return tf.ChameleonForConditionalGeneration(config)


def chameleon_processor():
    images_ = tf.ChameleonImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = tf.ChameleonProcessor(image_processor=images_, tokenizer=_chameleon_tokenizer(), image_seq_length=16)
    processor.chat_template = chat_template("<image>")  # its __init__ takes none
    return processor


def small_frames(build: Callable[[object], dict]) -> Callable[[object], dict]:
    """SmolVLM's video processor resizes frames to its own ``max_image_size`` whatever the call asks (364 px in
    tiny_families' processor): ``build`` with a copy of the processor whose frames stay 32 px."""

    def small(processor) -> dict:
        processor = copy.copy(processor)
        processor.video_processor = tf.SmolVLMVideoProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
        return build(processor)

    return small


# -- the matrix entries and routing batches ---------------------------------------------------------------------------
def two_rows(marker: str, nested: bool = False) -> Callable[[object], dict]:
    """The standard batch: one image per row, ``marker`` where the image goes."""

    def build(processor) -> dict:
        pictures = images(2)
        return call(processor, [f"{marker} {p}" for p in PROMPTS], images=[[p] for p in pictures] if nested else pictures)

    return build


LLAMA4_IMAGE = "<|image|>"
QWEN_IMAGE, QWEN_VIDEO = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
OMNI_IMAGE, OMNI_VIDEO = "<|vision_bos|><|IMAGE|><|vision_eos|>", "<|vision_bos|><|VIDEO|><|vision_eos|>"
OMNI_AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"
GLM_IMAGE, GLM_VIDEO = "<|begin_of_image|><|image|><|end_of_image|>", "<|begin_of_video|><|video|><|end_of_video|>"


def _image_routing(marker: str, nested: bool = False) -> dict:
    return {"two_images": two_images(marker, nested), "sizes": sizes(marker, nested)}


def _qwen_routing(image: str, video: str, **videos) -> dict:
    return {**_image_routing(image), "image_video": image_video(image, video, size=QWEN_VIDEO_SIZE, **videos)}


ROUTING: dict[str, dict[str, Callable[[object], dict]]] = {
    # the classes already in tiny_families.CASES
    "llava": _image_routing("<image>"),
    "llava_next": {**_image_routing("<image>"), "two_images_apart": two_images_apart("<image>")},
    # nested: the processor then knows row 0 has two images (batch_num_images), and such images get no anyres tiles
    "llava_onevision": {**_image_routing("<image>"), "two_images": two_images("<image>", nested=True),
                        "two_images_apart": two_images_apart("<image>", nested=True),
                        "image_video": image_video("<image>", "<video>", size={"height": 32, "width": 32})},
    "paligemma": {"two_images": two_images("", nested=True), "sizes": sizes("", nested=True)},
    "gemma3": _image_routing("<start_of_image>", nested=True),
    "mistral3": _image_routing("[IMG]"),
    "internvl": {**_image_routing("<IMG_CONTEXT>"),
                 "image_video": image_video("<IMG_CONTEXT>", "<video>", size={"height": 32, "width": 32})},
    "idefics2": _image_routing("<image>", nested=True),
    "idefics3": _image_routing("<image>", nested=True),
    "smolvlm": {**_image_routing("<image>", nested=True),
                "video_text": small_frames(video_text("<video>"))},
    "qwen2_vl": _qwen_routing(QWEN_IMAGE, QWEN_VIDEO),
    "qwen2_5_vl": _qwen_routing(QWEN_IMAGE, QWEN_VIDEO),
    "qwen3_vl": _qwen_routing(QWEN_IMAGE, QWEN_VIDEO),
    "mllama": {"two_and_one": two_and_one("<|image|>", nested=True), "sizes": sizes("<|image|>", nested=True)},
    # the classes of this module
    "llama4": _image_routing(LLAMA4_IMAGE),
    "aya_vision": _image_routing("<image>"),
    "cohere2_vision": _image_routing("<image>"),
    "ovis2": _image_routing("<image>"),
    "fuyu": {"sizes": fuyu_inputs([images(1)[0], images(1, seed=6)[0].resize((16, 32))])},
    "llava_next_video": {**_image_routing("<image>"), "image_video": image_video("<image>", "<video>", count=2),
                         "two_images_apart": two_images_apart("<image>")},
    "glm4v": {**_image_routing(GLM_IMAGE), "video_text": video_text(GLM_VIDEO)},
    "glm4v_moe": {**_image_routing(GLM_IMAGE), "video_text": video_text(GLM_VIDEO)},
    "qwen2_5_omni": {**_qwen_routing(OMNI_IMAGE, OMNI_VIDEO), "audio_image": audio_image(OMNI_AUDIO, OMNI_IMAGE)},
    "phi4_multimodal": {**_image_routing("<|image|>"), "audio_image": audio_image("<|audio|>", "<|image|>"),
                        "two_images_apart": two_images_apart("<|image|>")},
    "deepseek_vl": {"two_images": two_images("<image_placeholder>")},
    "deepseek_vl_hybrid": {"two_images": two_images("<image_placeholder>")},
    "chameleon": {"two_images": two_images("<image>")},
}


VISION_LM = {("vision", "self"): 2, ("lm", "self"): 2}
# Every tower named for what it is, attention whose output the model never reads left out. A soft prompt needs a
# record (where its text input is): the classes the generic fallback covers take none.
RECORDED = ("llava_next_video", "glm4v", "glm4v_moe", "qwen2_5_omni", "phi4_multimodal", "deepseek_vl", "deepseek_vl_hybrid")
CASES: dict[str, Case] = {
    name: Case(seeded(globals()[name]), globals()[f"{name}_processor"], inputs, sites,
               **{"prompt": name in RECORDED, **options})
    for name, inputs, sites, options in (
        # transformers 5.24's own Llama4ForConditionalGeneration.forward fails ("no attribute 'image_outputs'")
        ("llama4", two_rows(LLAMA4_IMAGE), VISION_LM, dict(since="5.25")),
        # SigLIP's pooling head (vision_tower.head.attention) is never read: left out
        ("aya_vision", two_rows("<image>"), VISION_LM, {}),
        ("cohere2_vision", two_rows("<image>"), VISION_LM, {}),
        ("ovis2", two_rows("<image>"), VISION_LM, {}),
        # patches reach the LM through a linear layer; transformers' own beam search fails on Fuyu
        ("fuyu", fuyu_inputs(images(2)), {("lm", "self"): 2}, dict(beams=False)),
        ("llava_next_video", two_rows("<image>"), {("vision", "self"): 1, ("lm", "self"): 2}, {}),  # feature layer -2
        ("glm4v", two_rows(GLM_IMAGE), VISION_LM, dict(grow={"mm_token_type_ids": 0}, positions=None)),
        ("glm4v_moe", two_rows(GLM_IMAGE), VISION_LM, dict(grow={"mm_token_type_ids": 0}, positions=None)),
        # audio beside an image: every tower runs (a prefix on a tower the call does not run gets no gradient)
        # its audio tower cannot be routed per row (its record says why): rows route through the other towers
        ("qwen2_5_omni", audio_image(OMNI_AUDIO, OMNI_IMAGE), {("audio", "self"): 2, **VISION_LM},
         dict(positions=None, routable=["vision", "lm"])),
        # vision layer 1 (after feature_layer=-2) and the SigLIP head are never read
        ("phi4_multimodal", audio_image("<|audio|>", "<|image|>"),
         {("vision", "self"): 1, ("audio", "self"): 2, ("lm", "self"): 2}, {}),
        ("deepseek_vl", two_rows("<image_placeholder>"), VISION_LM, {}),
        # SAM's attention (high_res_vision) is not reachable: add_prefix without targets refuses, naming it
        ("deepseek_vl_hybrid", two_rows("<image_placeholder>"), VISION_LM, dict(targets=["vision", "lm"])),
        ("chameleon", two_rows("<image>"), {("lm", "self"): 2}, {}),  # images are VQ tokens: only the LM attends
    )
}

tiny_families.CASES.update(CASES)
