"""The shipped backbones of the embedded default: they load offline, they really were pretrained (their scores,
recomputed here from the shipped weights, are the ones in their metrics.json and in README, and far above a
baseline)."""

import json
from pathlib import Path

import pytest

from mmprefix import embedded
from mmprefix.data import synthetic
from mmprefix.embedded import pretrain

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

# backbone -> (its headline score, the least it must reach, how README shows it)
HEADLINE = {
    "blip": ("vqa_accuracy", 37.7 + 30, "VQA accuracy {:.1f}%"),  # 37.7%: each question type's commonest answer
    "blip2": ("vqa_accuracy", 37.7 + 30, "VQA accuracy {:.1f}%"),
    "clip": ("caption_retrieval_top1", 50.0, "top-1 {:.1f}%"),  # chance: 0.45%
    "lm": ("record_exact_match", 90.0, "exact match {:.0f}%"),
}


@pytest.fixture(scope="module")
def world():
    return synthetic.build_world()


@pytest.mark.parametrize("name", list(HEADLINE))
def test_shipped_scores_are_reproduced_and_far_above_the_baseline(name, world):
    folder = embedded.backbone_dir(name)
    shipped = json.loads((folder / "metrics.json").read_text())
    scores = pretrain.EVALUATE[name](folder, world)
    assert scores == pytest.approx({k: shipped[k] for k in scores}, abs=0.01)
    metric, least, shown = HEADLINE[name]
    assert scores[metric] > least
    assert shown.format(shipped[metric]) in README

