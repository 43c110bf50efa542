"""The embedded default: tiny backbones pretrained on the synthetic world, shipped with the package.

``load_backbone(name)`` returns ``(model, processor)`` for ``"blip"`` (heads ``"vqa"`` and ``"caption"``, one
shared vision tower and text decoder), ``"blip2"`` (OPT language model), ``"clip"``, ``"lm"`` (a Llama-style
causal LM with grouped-query attention) and ``"llava"`` (the ``clip`` vision tower, a projector and the ``lm``
language model, LLaVA-style). The weights (a few MB each, safetensors) were made by
``python -m mmprefix.embedded.pretrain NAME`` and are shipped rather than built on first use because
pretraining takes minutes of CPU per backbone; the script stays in the package so anyone can rebuild them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import transformers as tf

from . import text

ASSETS = Path(__file__).parent / "assets"
IMAGE_SIZE = {"height": 64, "width": 64}
IMAGE_PROCESSOR = dict(size=IMAGE_SIZE)
QUERY_TOKENS = 8


def blip_processor() -> tf.BlipProcessor:
    return tf.BlipProcessor(image_processor=tf.BlipImageProcessor(**IMAGE_PROCESSOR), tokenizer=text.bert_tokenizer())


def blip2_processor() -> tf.Blip2Processor:
    return tf.Blip2Processor(image_processor=tf.BlipImageProcessor(**IMAGE_PROCESSOR), tokenizer=text.lm_tokenizer(),
                             num_query_tokens=QUERY_TOKENS)


def clip_processor() -> tf.CLIPProcessor:
    """CLIP pools its text at </s> and has absolute positions: its text is padded on the right."""
    images = tf.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size=IMAGE_SIZE)
    tokenizer = text.lm_tokenizer(append_eos=True)
    tokenizer.padding_side = "right"
    return tf.CLIPProcessor(image_processor=images, tokenizer=tokenizer)


# The embedded LLaVA's chat template, in the world's words: one user turn, the image, the text, then "answer :".
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}question : {% else %}answer : {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}answer :{% endif %}"
)


def llava_processor() -> tf.LlavaProcessor:
    """CLIP's image processor (64 px) and the language models' tokenizer; each image becomes 64 ``<image>`` tokens
    (one per patch; the CLS token is dropped, as LLaVA does)."""
    images = tf.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size=IMAGE_SIZE)
    tokenizer = text.lm_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)  # in the vocabulary already: now never split
    return tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=CHAT_TEMPLATE)


class Backbone(NamedTuple):
    """One shipped backbone: its heads (model classes on the same weights; the first is the default), the class
    that loads its processor, and the head that does each task it is used for (the first task: what it serves)."""

    heads: dict[str, type]
    processor: type
    tasks: dict[str, str]


_ONE = "default"  # the head of a backbone that has one
BACKBONES = {
    "blip": Backbone({"vqa": tf.BlipForQuestionAnswering, "caption": tf.BlipForConditionalGeneration},
                     tf.BlipProcessor, {"vqa": "vqa", "caption": "caption"}),
    "blip2": Backbone({_ONE: tf.Blip2ForConditionalGeneration}, tf.Blip2Processor, {"vqa": _ONE, "caption": _ONE}),
    "clip": Backbone({_ONE: tf.CLIPModel}, tf.CLIPProcessor, {"classification": _ONE, "retrieval": _ONE}),
    "lm": Backbone({_ONE: tf.LlamaForCausalLM}, tf.AutoTokenizer, {"text": _ONE}),
    "llava": Backbone({_ONE: tf.LlavaForConditionalGeneration}, tf.LlavaProcessor, {"vqa": _ONE, "caption": _ONE}),
}


def backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown embedded backbone {name!r}; choose from {sorted(BACKBONES)}")
    return BACKBONES[name]


def backbone_dir(name: str) -> Path:
    backbone(name)
    return ASSETS / name


def head_for(name: str, task: str) -> str | None:
    """The head of backbone ``name`` that does ``task`` (None: its default head)."""
    return backbone(name).tasks.get(task)


def load_backbone(name: str, head: str | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` of an embedded backbone, in eval mode (for ``"lm"`` the processor is its tokenizer)."""
    folder = backbone_dir(name)
    heads, processor_class, _ = BACKBONES[name]
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the embedded backbone {name!r} is not in {folder}; rebuild it with python -m mmprefix.embedded.pretrain {name}"
        )
    head = head or next(iter(heads))
    if head not in heads:
        raise ValueError(f"backbone {name!r} has heads {sorted(heads)}, not {head!r}")
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # the caption head reads only part of the shared BLIP weights: no warnings
    try:
        model = heads[head].from_pretrained(folder)
    finally:
        tf.logging.set_verbosity(verbosity)
    return model.eval(), processor_class.from_pretrained(folder)
