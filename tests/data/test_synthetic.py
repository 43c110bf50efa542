"""The synthetic world: deterministic files, pretraining/downstream split of tasks, images that match the text."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from mmprefix.data import synthetic

SMALL = {"train": 40, "val": 6}


def rows(root, name):
    return [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]


def test_the_world_is_the_same_on_every_build(tmp_path):
    a = synthetic.build_world(tmp_path / "a", SMALL)
    b = synthetic.build_world(tmp_path / "b", SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    mtime = (a / "captions_a_train.jsonl").stat().st_mtime
    synthetic.build_world(a, SMALL)  # already complete: nothing rewritten
    assert (a / "captions_a_train.jsonl").stat().st_mtime == mtime


def test_downstream_tasks_are_new_but_use_words_the_decoders_already_emit(tmp_path):
    root = synthetic.build_world(tmp_path, SMALL)
    pretrain = rows(root, "vqa_pretrain_train")
    downstream = rows(root, "vqa_downstream_train")
    assert {r["question_type"] for r in pretrain} == set(synthetic.PRETRAIN_QUESTIONS)
    assert {r["question_type"] for r in downstream} == set(synthetic.DOWNSTREAM_QUESTIONS)
    emitted = {w for r in rows(root, "captions_a_train") for c in r["captions"] for w in c.replace(":", " ").split()}
    emitted |= {w for r in pretrain for w in r["answers"][0].split()}
    assert {r["answers"][0] for r in downstream} <= emitted
    assert {w for r in rows(root, "captions_b_train") for w in r["captions"][0].split()} <= emitted
    assert all(len(r["answers"]) == 10 for r in pretrain + downstream)
    verify = rows(root, "vqa_verify_train")
    assert {r["question_type"] for r in verify} == set(synthetic.VERIFY_QUESTIONS)
    assert {r["answers"][0] for r in verify} == {"yes", "no"}
    assert not {r["question"] for r in verify} & {r["question"] for r in downstream}


def test_checks_are_true_half_of_the_time():
    rng = np.random.default_rng(0)
    answers = {kind: [] for kind in synthetic.VERIFY_QUESTIONS}
    for _ in range(600):
        shapes = synthetic.scene(rng)
        for kind, question, answer in synthetic.verify_questions(shapes, rng):
            words = question.rstrip("?").split()
            if kind == "verify_count":
                truth = len(shapes) == synthetic.COUNTS.index(words[2]) + 1
            elif kind == "verify_size":
                truth = any(s.color == words[2] and s.shape == words[3] and s.size == words[4] for s in shapes)
            else:
                end = shapes[0] if words[-1] == "left" else shapes[-1]
                truth = (end.color, end.shape) == (words[2], words[3])
            assert answer == ("yes" if truth else "no"), (question, shapes)
            answers[kind].append(truth)
    for kind, truths in answers.items():
        assert 0.4 < sum(truths) / len(truths) < 0.6, kind


def test_images_show_what_the_text_says(tmp_path):
    root = synthetic.build_world(tmp_path, SMALL)
    checked = 0
    for row in rows(root, "vqa_downstream_train"):
        if row["question_type"] != "position":
            continue
        pixels = np.asarray(Image.open(root / row["image"]).convert("RGB")).astype(int)
        centres = {}  # mean x of each colour drawn in the image
        for name, rgb in synthetic.COLORS.items():
            xs = np.nonzero(np.abs(pixels - np.array(rgb)).sum(-1) < 30)[1]
            if len(xs) >= 20:
                centres[name] = xs.mean()
        pick = min if row["question"].endswith("left?") else max
        assert pick(centres, key=centres.get) == row["answers"][0], row
        checked += 1
    assert checked > 5
    for row in rows(root, "captions_a_train"):
        count = synthetic.COUNTS.index(row["captions"][0].split()[0]) + 1
        assert row["captions"][0].count(" a ") + row["captions"][0].startswith("a ") == count


def world_texts(root) -> set[str]:
    return {value for path in root.glob("*.jsonl") for row in rows(root, path.stem)
            for value in (row.get("question"), row.get("prompt"), row.get("target"), *row.get("captions", []),
                          *row.get("answers", [])) if value}


def test_the_world_writes_an_before_a_vowel(tmp_path):
    texts = world_texts(synthetic.build_world(tmp_path, SMALL))
    assert any("an orange circle" in t for t in texts) and any("is there an orange" in t for t in texts)
    wrong = [t for t in texts if re.search(r"\ba [aeiou]|\ban [^aeiou]", t)]
    assert not wrong, wrong[:3]
    assert synthetic.indefinite("orange square") == "an orange square"
    assert synthetic.indefinite("large orange square") == "a large orange square"


@pytest.mark.parametrize("name", ["blip", "blip2", "clip", "lm", "llava"])
def test_every_word_of_the_world_is_in_the_shipped_vocabulary(tmp_path, name):
    """A word outside a shipped backbone's vocabulary would become [UNK] for it: "an" included."""
    from mmprefix.embedded import backbone_dir, text

    tokenizer = AutoTokenizer.from_pretrained(backbone_dir(name))
    assert tokenizer.get_vocab() == (text.bert_tokenizer() if name == "blip" else text.lm_tokenizer()).get_vocab()
    texts = world_texts(synthetic.build_world(tmp_path, SMALL))
    unknown = [t for t in texts if tokenizer.unk_token_id in tokenizer(t)["input_ids"]]
    assert not unknown, unknown[:3]
