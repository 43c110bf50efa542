"""Tiny served models for the serving tests: random BLIP heads and CLIP over the embedded tokenizers, prefixes
saved in a folder, images as data URIs."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import torch
import transformers as tf
from PIL import Image

import tiny
from mmprefix import PrefixConfig, PrefixModel, add_prefix
from mmprefix.evaluation import decode
from mmprefix.serving import Engine
from mmprefix.serving.models import share_weights

# name -> (head, seed, number of slots); 'cap' only fits the captioning head (no question encoder sites)
VQA_PREFIXES = {"red": 1, "green": 2, "blue": 3}
CAPTION_PREFIXES = {"cap": 4}
QUESTIONS = ["what color is the circle?", "what is the color?", "what is red?", "a photo of the red circle?"]


def blip_heads(seed: int = 0):
    """The VQA and captioning heads of one random BLIP, sharing their weights."""
    vqa = tiny.world_blip(tf.BlipForQuestionAnswering, seed=seed)
    caption = tiny.world_blip(tf.BlipForConditionalGeneration, seed=seed)
    share_weights(vqa, caption)
    return vqa, caption


def save_prefixes(folder, heads=None) -> dict[str, str]:
    """Random prefixes with visible effects, saved as ``folder/<name>``; ``{name: head}``."""
    vqa, caption = heads or blip_heads()
    out = {}
    for names, model, head in ((VQA_PREFIXES, vqa, "vqa"), (CAPTION_PREFIXES, caption, "caption")):
        for name, seed in names.items():
            torch.manual_seed(seed)
            pm = add_prefix(model, PrefixConfig(num_virtual_tokens=2 + seed, init_std=1.0), name=name)
            pm.save_prefix(folder / name)
            pm.remove_prefix()
            out[name] = head
    return out


def blip_engines(**limits) -> list[Engine]:
    vqa, caption = blip_heads()
    processor = tiny.world_blip_processor()
    return [Engine(PrefixModel(vqa), processor, "blip-vqa", **limits),
            Engine(PrefixModel(caption), processor, "blip-caption", **limits)]


def reference(head: str, prefix: str | None, folder):
    """A fresh head with only ``prefix`` on it (or none): what a request must equal, with no routing involved."""
    vqa, caption = blip_heads()
    model = PrefixModel(vqa if head == "vqa" else caption)
    if prefix is not None:
        model.load_prefix(prefix, folder / prefix)
    return model


def image(seed: int, size: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def data_uri(picture: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    picture.save(buffer, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def expected_answer(folder, prefix: str | None, seed: int, question: str | None = QUESTIONS[0], **settings) -> str:
    """The answer (or, without a question, the caption) of a head carrying only ``prefix``, for ``image(seed)``."""
    model = reference("vqa" if question else "caption", prefix, folder)
    processor = tiny.world_blip_processor()
    if question:
        return decode.answer_questions(model, processor, [image(seed)], [question], **settings)[0]
    return decode.caption_images(model, processor, [image(seed)], **settings)[0]


class ThreadServer:
    """uvicorn in a thread on 127.0.0.1, on a free port; ``with ThreadServer(app) as server: server.port``."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
