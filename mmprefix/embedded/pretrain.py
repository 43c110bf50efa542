"""Pretrain the embedded default's tiny backbones on the synthetic world's pretraining formatting.

    python -m mmprefix.embedded.pretrain blip|blip2|clip|lm|llava [--steps N] [--out DIR]

This is how the weights shipped in ``mmprefix/embedded/assets/`` were made (CPU, deterministic seeds). Each
backbone learns only the pretraining half of the world (style-A captions; colour, shape and existence
questions, and for BLIP yes/no checks of sizes, counts and sides; record format A), so that the recipes' downstream
tasks are new to it. The run ends with the
pretraining-task scores, written to ``metrics.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import nn

from .. import evaluation
from ..data import formatting
from ..evaluation import decode
from ..data import load_image, read_samples, synthetic
from ..training import TrainConfig, train
from . import ASSETS, blip2_processor, blip_processor, clip_processor, llava_processor, text

WIDTH = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4)
VISION = dict(WIDTH, num_hidden_layers=4, image_size=synthetic.IMAGE_SIZE, patch_size=8, initializer_range=0.02)


def blip_model() -> tf.BlipForQuestionAnswering:
    tokenizer = text.bert_tokenizer()
    text_config = dict(WIDTH, num_hidden_layers=3, vocab_size=len(tokenizer), max_position_embeddings=40,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.sep_token_id,
                       sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    config = tf.BlipConfig(vision_config=VISION, text_config=text_config, image_text_hidden_size=64, projection_dim=64)
    return tf.BlipForQuestionAnswering(config)


def blip2_model() -> tf.Blip2ForConditionalGeneration:
    tokenizer = blip2_processor().tokenizer
    language = tf.OPTConfig(vocab_size=len(tokenizer), hidden_size=128, ffn_dim=256, num_hidden_layers=3,
                            num_attention_heads=4, word_embed_proj_dim=128, max_position_embeddings=64,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    qformer = dict(WIDTH, num_hidden_layers=2, cross_attention_frequency=1, vocab_size=len(tokenizer),
                   max_position_embeddings=40)
    config = tf.Blip2Config(vision_config=VISION, qformer_config=qformer, text_config=language.to_dict(),
                            num_query_tokens=8, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = tf.Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)  # transformers starts them at zero: no gradient to their keys
    return model


def clip_model() -> tf.CLIPModel:
    tokenizer = clip_processor().tokenizer
    text_config = dict(WIDTH, num_hidden_layers=3, vocab_size=len(tokenizer), max_position_embeddings=40,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return tf.CLIPModel(tf.CLIPConfig(vision_config=VISION, text_config=text_config, projection_dim=64))


def lm_model() -> tf.LlamaForCausalLM:
    tokenizer = text.lm_tokenizer()
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    return tf.LlamaForCausalLM(config)


def llava_model() -> tf.LlavaForConditionalGeneration:
    """The shipped ``clip`` vision tower and ``lm`` language model (weights loaded from the assets), joined by a
    new two-layer projector; like LLaVA-1.5 it reads the vision tower's second-to-last layer."""
    clip = tf.CLIPModel.from_pretrained(ASSETS / "clip")
    lm = tf.LlamaForCausalLM.from_pretrained(ASSETS / "lm")
    tokenizer = text.lm_tokenizer()
    config = tf.LlavaConfig(vision_config=clip.config.vision_config.to_dict(),
                            text_config=dict(lm.config.to_dict(), max_position_embeddings=128),
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                            vision_feature_select_strategy="default", tie_word_embeddings=True)
    model = tf.LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    return model


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[index]


class JointBlip(nn.Module):
    """BLIP's VQA and captioning heads on one vision tower and one text decoder, trained together."""

    def __init__(self, vqa: tf.BlipForQuestionAnswering) -> None:
        super().__init__()
        self.vqa = vqa
        self.caption = tf.BlipForConditionalGeneration(vqa.config)
        self.caption.vision_model, self.caption.text_decoder = vqa.vision_model, vqa.text_decoder

    def forward(self, vqa: dict, caption: dict) -> torch.Tensor:
        return self.vqa(**vqa).loss + self.caption(**caption).loss


class PromptedLoss(nn.Module):
    """A model whose batches are a list of sub-batches (several tasks per step): the summed loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batches: list[dict]) -> torch.Tensor:
        return sum(self.model(**batch).loss for batch in batches)


def world_samples(root: Path, split: str) -> dict[str, list]:
    return {
        "vqa": read_samples("vqa", root / f"vqa_pretrain_{split}.jsonl"),
        "verify": read_samples("vqa", root / f"vqa_verify_{split}.jsonl"),
        "captions": read_samples("caption", root / f"captions_a_{split}.jsonl"),
        "text": read_samples("text", root / f"text_a_{split}.jsonl"),
    }


def images_of(samples: list) -> dict[str, Any]:
    return {s.image: load_image(s.image) for s in samples}


VERIFY_STEPS = 2000  # BLIP's second stage: the yes/no checks join the questions


def pretrain_blip(root: Path, out: Path, steps: int) -> tuple[nn.Module, Any, dict[str, float]]:
    """Two stages: ``steps`` on captions and colour/shape/existence questions, then ``VERIFY_STEPS`` at half the
    learning rate with the yes/no checks of sizes, counts and sides added. (Learned together from the start, the
    checks stayed at chance and dragged the other questions down within the same 3000 steps.)"""
    processor = blip_processor()
    model = blip_model()
    data = world_samples(root, "train")
    images = images_of(data["captions"])
    caption_of = {s.image: s.captions[0] for s in data["captions"]}

    def collate(rows: list) -> dict:
        pictures = [images[r.image] for r in rows]
        return {
            "vqa": formatting.vqa_batch(model, processor, pictures, [r.question for r in rows], [r.answers[0] for r in rows]),
            "caption": formatting.caption_batch(model, processor, pictures, [caption_of[r.image] for r in rows]),
        }

    joint = JointBlip(model)
    train(joint, Rows(data["vqa"]), collate, _config(out, steps, 1e-3), loss_fn=lambda m, b: m(**b), save=_no_save)
    train(joint, Rows(data["vqa"] + data["verify"]), collate, _config(out / "verify", VERIFY_STEPS, 5e-4),
          loss_fn=lambda m, b: m(**b), save=_no_save)
    model.eval()
    return model, processor, evaluate_vision_language(model, joint.caption.eval(), processor, root, verify=True)


def question_and_caption_batches(model: nn.Module, processor: Any, data: dict) -> Any:
    """A collate function: each batch of question rows gives a VQA batch and a caption batch of the same images
    (their first caption), for `PromptedLoss`."""
    images = images_of(data["captions"])
    caption_of = {s.image: s.captions[0] for s in data["captions"]}

    def collate(rows: list) -> list[dict]:
        pictures = [images[r.image] for r in rows]
        return [
            formatting.vqa_batch(model, processor, pictures, [r.question for r in rows], [r.answers[0] for r in rows]),
            formatting.caption_batch(model, processor, pictures, [caption_of[r.image] for r in rows]),
        ]

    return collate


def pretrain_blip2(root: Path, out: Path, steps: int) -> tuple[nn.Module, Any, dict[str, float]]:
    processor = blip2_processor()
    model = blip2_model()
    data = world_samples(root, "train")
    collate = question_and_caption_batches(model, processor, data)
    train(PromptedLoss(model), Rows(data["vqa"]), collate, _config(out, steps, 1e-3), loss_fn=lambda m, b: m(b),
          save=_no_save)
    model.eval()
    return model, processor, evaluate_vision_language(model, model, processor, root)


def pretrain_llava(root: Path, out: Path, steps: int) -> tuple[nn.Module, Any, dict[str, float]]:
    """The vision tower stays as CLIP learned it; the projector and the language model learn the first half of
    the world through the chat template: captions, colour/shape/existence questions and the yes/no checks."""
    processor = llava_processor()
    model = llava_model()
    model.model.vision_tower.requires_grad_(False)
    data = world_samples(root, "train")
    collate = question_and_caption_batches(model, processor, data)
    train(PromptedLoss(model), Rows(data["vqa"] + data["verify"]), collate, _config(out, steps, 1e-3, batch_size=32),
          loss_fn=lambda m, b: m(b), save=_no_save)
    model.eval()
    return model, processor, evaluate_vision_language(model, model, processor, root, verify=True)


def hard_negative(caption: str, rng: random.Random) -> str:
    """A style-A caption with the same words bound differently: two objects swapped in order, or two objects'
    colours or shapes swapped, or (one object) its size or colour changed. Contrasting an image with these, not
    only with other images' captions, makes CLIP encode order and binding instead of a bag of attributes
    (NegCLIP, Yuksekgonul et al., 2023)."""
    head, listed = caption.split(": ")
    objects = [phrase.split() for phrase in listed.split(" and ")]  # ["a", size, colour, shape]
    while True:
        changed = [list(o) for o in objects]
        if len(changed) > 1:
            i, j = rng.sample(range(len(changed)), 2)
            field = rng.choice([None, 2, 3])  # None: swap the objects' places
            if field is None:
                changed[i], changed[j] = changed[j], changed[i]
            else:
                changed[i][field], changed[j][field] = changed[j][field], changed[i][field]
        else:
            field = rng.choice([1, 2])
            choices = list(synthetic.SIZES) if field == 1 else list(synthetic.COLORS)
            changed[0][field] = rng.choice([c for c in choices if c != changed[0][field]])
        negative = f"{head}: " + " and ".join(" ".join(o) for o in changed)
        if negative != caption:
            return negative


def clip_loss(model: tf.CLIPModel, batch: dict) -> torch.Tensor:
    """CLIP's symmetric contrastive loss, where each image also faces the hard negatives of every caption."""
    images = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    texts = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    images, texts = nn.functional.normalize(images, dim=-1), nn.functional.normalize(texts, dim=-1)
    n = len(images)
    logits = model.logit_scale.exp() * images @ texts.T  # n images x (n captions + n negatives)
    truth = torch.arange(n)
    return (nn.functional.cross_entropy(logits, truth) + nn.functional.cross_entropy(logits[:, :n].T, truth)) / 2


def pretrain_clip(root: Path, out: Path, steps: int) -> tuple[nn.Module, Any, dict[str, float]]:
    processor = clip_processor()
    model = clip_model()
    captions = world_samples(root, "train")["captions"]
    images = images_of(captions)
    rng = random.Random(0)

    def collate(rows: list) -> dict:
        texts = [r.captions[0] for r in rows]
        return dict(processor(text=texts + [hard_negative(t, rng) for t in texts],
                              images=[images[r.image] for r in rows], return_tensors="pt", padding=True))

    train(model, Rows(captions), collate, _config(out, steps, 1e-3), loss_fn=clip_loss, save=_no_save)
    model.eval()
    return model, processor, evaluate_clip(model, processor, root)


def lm_texts(data: dict[str, list]) -> list[tuple[str, str]]:
    """Everything the language model reads in pretraining: captions, question-answer pairs, records (A)."""
    pairs = [("", s.captions[0]) for s in data["captions"]]
    pairs += [(f"question: {s.question} answer:", s.answers[0]) for s in data["vqa"]]
    pairs += [(s.prompt, s.target) for s in data["text"]]
    return pairs


def pretrain_lm(root: Path, out: Path, steps: int) -> tuple[nn.Module, Any, dict[str, float]]:
    tokenizer = text.lm_tokenizer()
    model = lm_model()
    pairs = lm_texts(world_samples(root, "train"))

    def collate(rows: list) -> dict:
        return formatting.prompt_and_target(tokenizer, [p for p, _ in rows], [t for _, t in rows])

    train(model, Rows(pairs), collate, _config(out, steps, 2e-3), save=_no_save)
    model.eval()
    return model, tokenizer, evaluate_lm(model, tokenizer, root)


def evaluate_lm(model, tokenizer, root: Path) -> dict[str, float]:
    """Record (format A) to phrase, exact match on validation records."""
    samples = world_samples(root, "val")["text"][:200]
    outputs = decode.complete_texts(model, tokenizer, [s.prompt for s in samples])
    return {"record_exact_match": 100 * sum(o == s.target for o, s in zip(outputs, samples)) / len(samples)}


def evaluate_vision_language(vqa_model, caption_model, processor, root: Path, limit: int = 300,
                             verify: bool = False) -> dict[str, float]:
    """Pretraining-task scores on the validation split: VQA accuracy (per question type; with ``verify`` also
    that of the yes/no checks, apart) and captions' exact match and CIDEr, through the evaluation harness."""
    data = world_samples(root, "val")
    scores = _vqa_scores(vqa_model, processor, data["vqa"][:limit], "vqa_accuracy")
    if verify:
        scores.update(_vqa_scores(vqa_model, processor, data["verify"][:limit], "verify_accuracy"))
    images = data["captions"][:limit]
    captions, _ = evaluation.predict("caption", caption_model, processor, images, batch_size=50, progress=False)
    return {
        **scores,
        "caption_exact_match": 100 * sum(captions[s.image_id] == s.captions[0] for s in images) / len(images),
        "CIDEr": evaluation.score("caption", captions, images, meteor=False)["CIDEr"],
    }


def _vqa_scores(model, processor, questions: list, name: str) -> dict[str, float]:
    answers, _ = evaluation.predict("vqa", model, processor, questions, batch_size=50, progress=False)
    vqa = evaluation.score("vqa", answers, questions)
    by_type = {k.split("/", 1)[1]: v for k, v in vqa.items() if k.startswith("vqa_accuracy_by_question/")}
    return {name: vqa["vqa_accuracy"], **{f"vqa_accuracy_{kind}": value for kind, value in sorted(by_type.items())}}


@torch.no_grad()
def evaluate_clip(model, processor, root: Path) -> dict[str, float]:
    """Image-to-caption retrieval among validation images (chance: 1 / number of distinct captions)."""
    captions = world_samples(root, "val")["captions"][:300]
    images = [load_image(s.image) for s in captions]
    texts = sorted({s.captions[0] for s in captions})
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    logits = model(**inputs).logits_per_image
    truth = torch.tensor([texts.index(s.captions[0]) for s in captions])
    top1 = (logits.argmax(-1) == truth).float().mean().item()
    top5 = (logits.topk(5, dim=-1).indices == truth[:, None]).any(-1).float().mean().item()
    return {"caption_retrieval_top1": 100 * top1, "caption_retrieval_top5": 100 * top5, "chance_top1": 100 / len(texts)}


RESUME = False  # set by --resume: continue a killed pretraining run (same code and settings only)


def _config(out: Path, steps: int, lr: float, batch_size: int = 64) -> TrainConfig:
    return TrainConfig(output_dir=str(out / "run"), max_steps=steps, batch_size=batch_size, learning_rate=lr,
                       warmup_steps=min(200, steps // 10), weight_decay=0.01, log_every=50, save_every=500,
                       resume=RESUME)


def _no_save(model: nn.Module, directory: Any) -> None:
    """The pretraining script saves the backbone itself, with its processor, once it has been scored."""


def _evaluate_saved_blip(folder: Path, root: Path) -> dict[str, float]:
    heads = {head: cls.from_pretrained(folder).eval() for head, cls in (("vqa", tf.BlipForQuestionAnswering),
                                                                          ("caption", tf.BlipForConditionalGeneration))}
    return evaluate_vision_language(heads["vqa"], heads["caption"], tf.BlipProcessor.from_pretrained(folder), root,
                                    verify=True)


def _evaluate_saved_blip2(folder: Path, root: Path) -> dict[str, float]:
    model = tf.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    return evaluate_vision_language(model, model, tf.Blip2Processor.from_pretrained(folder), root)


def _evaluate_saved_clip(folder: Path, root: Path) -> dict[str, float]:
    return evaluate_clip(tf.CLIPModel.from_pretrained(folder).eval(), tf.CLIPProcessor.from_pretrained(folder), root)


def _evaluate_saved_lm(folder: Path, root: Path) -> dict[str, float]:
    return evaluate_lm(tf.LlamaForCausalLM.from_pretrained(folder).eval(), tf.AutoTokenizer.from_pretrained(folder), root)


def _evaluate_saved_llava(folder: Path, root: Path) -> dict[str, float]:
    model = tf.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    return evaluate_vision_language(model, model, tf.LlavaProcessor.from_pretrained(folder), root, verify=True)


EVALUATE = {"blip": _evaluate_saved_blip, "blip2": _evaluate_saved_blip2, "clip": _evaluate_saved_clip,
            "lm": _evaluate_saved_lm, "llava": _evaluate_saved_llava}

BACKBONES = {
    "blip": (pretrain_blip, 3000),
    "blip2": (pretrain_blip2, 3000),
    "clip": (pretrain_clip, 1500),
    "lm": (pretrain_lm, 6000),
    "llava": (pretrain_llava, 2400),  # after clip and lm: it starts from their shipped weights
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", choices=sorted(BACKBONES))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out", type=Path, help="default: the package's assets folder")
    parser.add_argument("--world", type=Path, help="default: the cache folder of the synthetic world")
    parser.add_argument("--resume", action="store_true", help="continue a killed run of the same settings")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="score the saved backbone again and rewrite its metrics.json (no training)")
    args = parser.parse_args(argv)
    global RESUME
    RESUME = args.resume
    run, default_steps = BACKBONES[args.backbone]
    out = args.out or ASSETS / args.backbone
    random.seed(0)
    torch.manual_seed(0)
    root = synthetic.build_world(args.world)
    if args.evaluate_only:
        scores = EVALUATE[args.backbone](out, root)
        saved = json.loads((out / "metrics.json").read_text())
        (out / "metrics.json").write_text(json.dumps({**scores, "steps": saved.get("steps")}, indent=2) + "\n")
        print(json.dumps(scores, indent=2))
        return
    model, processor, scores = run(root, out.parent / f"_pretraining-{args.backbone}", args.steps or default_steps)
    print(json.dumps(scores, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({**scores, "steps": args.steps or default_steps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
