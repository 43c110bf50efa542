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
MIXED_QUESTIONS = ["what is red?", "what color is the circle?", "how many shapes are there on the left?", "what?"]


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
    """uvicorn in a thread on 127.0.0.1, on a free port; ``with ThreadServer(app) as server: server.port``. With
    ``service``: the server ``mmprefix serve`` runs, which drains the service on SIGTERM (``server.handle_exit``)."""

    def __init__(self, app, service=None) -> None:
        import uvicorn

        from mmprefix.serving.server import draining_server

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = draining_server(config, service) if service is not None else uvicorn.Server(config)
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


class HeldBack:
    """Stands in for a serving worker's condition: the thread named ``name`` stops on its way into the lock
    (``arrived`` is set) until ``go`` is set, having read whatever it reads before taking it, while the worker
    and every other thread go through at once."""

    def __init__(self, worker, name: str) -> None:
        self.condition, self.name = worker._condition, name
        self.arrived, self.go = threading.Event(), threading.Event()
        worker._condition = self

    def __enter__(self):
        if threading.current_thread().name == self.name:
            self.arrived.set()
            assert self.go.wait(60)
        return self.condition.__enter__()

    def __exit__(self, *exc):
        return self.condition.__exit__(*exc)

    def __getattr__(self, name):  # wait, notify_all: the real condition's
        return getattr(self.condition, name)


class StepGate:
    """Wraps an engine's stepper: records each prefill's rows (and, with ``worker``, how many rows were decoding
    then: rows that join mid-decode) and each step's rows, padding and cross-attention padding; with ``at``,
    holds the decoding thread at its ``at``-th step (``reached`` is set) until ``release`` is set, so that
    requests are mid-decode for as long as a test needs."""

    def __init__(self, engine, at: int | None = None, worker=None) -> None:
        self.inner, self.eos, self.at, self.worker = engine.stepper, engine.stepper.eos, at, worker
        self.prefills, self.steps, self.joined_running = [], [], []
        self.reached, self.release = threading.Event(), threading.Event()
        engine.stepper = self

    def prefill(self, inputs, route):
        self.prefills.append(len(inputs))
        if self.worker is not None:
            self.joined_running.append(self.worker.running)
        return self.inner.prefill(inputs, route)

    def step(self, tokens, positions, rows, route):
        self.steps.append((len(tokens), rows.padded(), rows.cross_padded()))
        if len(self.steps) == self.at:
            self.reached.set()
            assert self.release.wait(300)
        return self.inner.step(tokens, positions, rows, route)


def endless_caption_engines(**limits) -> list[Engine]:
    """`blip_engines` whose captioning decoder never ends a caption early: rows decode to their token limit."""
    engines = blip_engines(**limits)
    head = engines[1].model.base_model
    with torch.no_grad():
        head.text_decoder.cls.predictions.bias[head.config.text_config.sep_token_id] = -1e4
    return engines


# -- the embedded LLaVA: a chat-template VLM ---------------------------------------------------------------------
LLAVA_PREFIXES = {"la": 1, "lb": 2}


def save_llava_prefixes(folder) -> None:
    from mmprefix.embedded import load_backbone

    model, _ = load_backbone("llava")
    for name, seed in LLAVA_PREFIXES.items():
        torch.manual_seed(seed)
        pm = add_prefix(model, PrefixConfig(num_virtual_tokens=2 + seed, init_std=0.5), name=name)
        pm.save_prefix(folder / name)
        pm.remove_prefix()


def llava_engine(**limits) -> Engine:
    from mmprefix.embedded import load_backbone

    model, processor = load_backbone("llava")
    return Engine(PrefixModel(model), processor, "llava", **limits)


def one_turn(text: str) -> list[dict]:
    """A user turn with an image, then ``text``: how the evaluation asks a chat VLM (``formatting.chat_prompt``)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def llava_alone(folder, prefix: str | None, messages, images, max_new_tokens: int = 8) -> tuple[str, int, int]:
    """``(answer, generated tokens with the one that ended it, prompt tokens)`` of a conversation on a fresh
    embedded LLaVA carrying only ``prefix``, through the processor's chat template and ``generate``."""
    from mmprefix.embedded import load_backbone

    model, processor = load_backbone("llava")
    model = PrefixModel(model)
    if prefix is not None:
        model.load_prefix(prefix, folder / prefix)
    text = processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    inputs = processor(images=list(images) or None, text=[text], return_tensors="pt")
    tokenizer = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)[0, inputs["input_ids"].shape[1] :].tolist()
    count = out.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in out else len(out)
    return decode._decode(tokenizer, torch.tensor([out]))[0], count, inputs["input_ids"].shape[1]
