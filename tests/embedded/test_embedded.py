"""The shipped backbones of the embedded default: they load offline, they really were pretrained (their scores,
recomputed here from the shipped weights, are the ones in their metrics.json and in the docs, and far above a
baseline)."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmprefix import embedded
from mmprefix.data import synthetic
from mmprefix.embedded import pretrain

GUIDE = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "embedded.md").read_text()

# backbone -> (its headline score, the least it must reach over the baseline, how the guide shows it)
HEADLINE = {
    "blip": ("vqa_accuracy", 30, "VQA accuracy {:.1f}%"),
    "blip2": ("vqa_accuracy", 30, "VQA accuracy {:.1f}%"),
    "clip": ("caption_retrieval_top1", 50.0, "top-1 {:.1f}%"),  # chance: 0.45%
    "lm": ("record_exact_match", 90.0, "exact match {:.0f}%"),
    "llava": ("vqa_accuracy", 15, "VQA accuracy {:.1f}%"),
}
SLOW = {"llava"}  # 64 image tokens per question through the language model: a minute or two to score here


@pytest.fixture(scope="module")
def world():
    return synthetic.build_world()


def commonest_answer_accuracy(world) -> float:
    """The VQA baseline the guide names: each question type answered with its commonest training answer, scored
    on the validation questions the backbones are scored on."""
    rows = {split: [json.loads(line) for line in (world / f"vqa_pretrain_{split}.jsonl").read_text().splitlines()]
            for split in ("train", "val")}
    answers = {}
    for row in rows["train"]:
        answers.setdefault(row["question_type"], []).append(row["answers"][0])
    commonest = {kind: max(set(given), key=given.count) for kind, given in answers.items()}
    scored = rows["val"][:300]
    return 100 * sum(commonest[row["question_type"]] == row["answers"][0] for row in scored) / len(scored)


def test_the_vqa_baseline_is_the_one_the_guide_names(world):
    assert f"VQA {commonest_answer_accuracy(world):.1f}% by answering each question type's most common answer" in GUIDE


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in HEADLINE])
def test_shipped_scores_are_reproduced_and_far_above_the_baseline(name, world):
    folder = embedded.backbone_dir(name)
    shipped = json.loads((folder / "metrics.json").read_text())
    scores = pretrain.EVALUATE[name](folder, world)
    assert scores == pytest.approx({k: shipped[k] for k in scores}, abs=0.01)
    metric, margin, shown = HEADLINE[name]
    assert scores[metric] > margin + (commonest_answer_accuracy(world) if metric == "vqa_accuracy" else 0)
    assert shown.format(shipped[metric]) in GUIDE



def test_clip_hard_negatives_keep_the_words_and_change_the_meaning():
    rng = random.Random(0)
    for caption in ("one shape: a small red circle", "two shapes: a large red circle and a small blue square",
                    "three shapes: a large red circle and a small red square and a small green triangle"):
        for _ in range(20):
            negative = pretrain.hard_negative(caption, rng)
            assert negative != caption
            head, objects = negative.split(": ")
            assert head == caption.split(": ")[0] and len(objects.split(" and ")) == len(caption.split(" and "))
            if not caption.startswith("one"):  # several objects: the same words, rebound or reordered
                assert sorted(negative.split()) == sorted(caption.split())


def test_clip_loss_is_clips_own_loss_without_negatives():
    torch.manual_seed(0)
    model = pretrain.clip_model().eval()
    processor = embedded.clip_processor()
    images = [Image.new("RGB", (64, 64), color) for color in ("red", "blue", "green")]
    texts = ["one shape: a small red circle", "one shape: a large blue square", "two shapes: a small green circle and a small red square"]
    batch = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    reference = model(**batch, return_loss=True).loss
    assert pretrain.clip_loss(model, batch).item() == pytest.approx(reference.item(), rel=1e-5)
    # with negatives: each image's softmax runs over the captions and the negatives, by hand
    negatives = [pretrain.hard_negative(t, random.Random(1)) for t in texts]
    batch = dict(processor(text=texts + negatives, images=images, return_tensors="pt", padding=True))
    out = model(**batch)
    logits = out.logits_per_image  # 3 x 6
    truth = torch.arange(3)
    expected = (torch.nn.functional.cross_entropy(logits, truth) + torch.nn.functional.cross_entropy(logits[:, :3].T, truth)) / 2
    assert pretrain.clip_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_llava_backbone_starts_from_the_shipped_clip_vision_tower_and_language_model():
    """Before pretraining, the LLaVA-style backbone is the shipped CLIP vision tower and LM, bit for bit, with a
    new projector; its processor turns each image into one <image> token per patch."""
    import transformers as tf

    model = pretrain.llava_model()
    clip = tf.CLIPModel.from_pretrained(embedded.backbone_dir("clip"))
    lm = tf.LlamaForCausalLM.from_pretrained(embedded.backbone_dir("lm"))
    for ours, shipped in ((model.model.vision_tower, clip.vision_model), (model.model.language_model, lm.model),
                          (model.lm_head, lm.lm_head)):
        theirs = shipped.state_dict()
        assert all(torch.equal(value, theirs[key]) for key, value in ours.state_dict().items())
    processor = embedded.llava_processor()
    batch = processor(images=[Image.new("RGB", (64, 64), "red")], text=["question : <image> what color ?"],
                      return_tensors="pt")
    assert (batch["input_ids"] == model.config.image_token_id).sum() == (64 // 8) ** 2
