"""Tiny random models of every family mmprefix names, each with its real processor built offline, for the family
test matrix (tests/test_families.py) and the compatibility table (benchmarks/compatibility.py).

Sizes: hidden 32, 2 layers, 4 heads (2 key/value heads in the language models), 32 px images. Tokenizers are
word-level over the synthetic world's words plus each family's special tokens (`word_tokenizer`), so that the
real processor classes (LlavaProcessor, Qwen2VLProcessor, ...) run offline and insert the family's image tokens.
"""

from __future__ import annotations

import dataclasses
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
    output: str = "logits"
    generation: str | None = "decoder"
    grow: dict = dataclasses.field(default_factory=dict)
    targets: list | None = None
    prompt: bool = True
    text_tower: str = "lm"  # a tower that reads the text (init="text" must reach it with that text)
    positions: bool = True  # generate() numbers a left-padded prompt from its mask (False: the model does itself)


def seeded(build: Callable[[], Any]) -> Callable[[], Any]:
    def make():
        torch.manual_seed(0)
        return build().eval()

    return make


def processed(prompts: Sequence[str] = PROMPTS, size: int = 32, **extra) -> Callable[[Any], dict]:
    """Forward inputs from the family's processor: two images and two prompts, padded."""

    def inputs(processor) -> dict:
        batch = processor(images=images(len(prompts), size), text=list(prompts), return_tensors="pt", padding=True, **extra)
        return dict(batch)

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


IMAGE_FIRST = [f"<image> {p}" for p in PROMPTS]

CASES: dict[str, Case] = {
    "llava": Case(seeded(llava), llava_processor, processed(IMAGE_FIRST), {("vision", "self"): 1, ("lm", "self"): 2}),
    "llava_next": Case(seeded(llava_next), llava_next_processor, processed(IMAGE_FIRST),
                       {("vision", "self"): 1, ("lm", "self"): 2}),
    "llava_onevision": Case(seeded(llava_onevision), llava_onevision_processor, processed(IMAGE_FIRST),
                            {("vision", "self"): 2, ("lm", "self"): 2}),
}
