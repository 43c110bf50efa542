"""Tests for mmprefix.evaluation.metrics.

VQA cases are worked out by hand from the official VQAv2 rules (vqaEval.py, GT-Vision-Lab/VQA);
caption metrics and BLEU are compared with pycocoevalcap called directly.
"""

import math

import pytest
import torch

from mmprefix.evaluation import caption_metrics as caption_module
from mmprefix.evaluation.metrics import (bleu, caption_metrics, exact_match, normalize_vqa_answer, perplexity,
                                         retrieval_recall, topk_accuracy, vqa_accuracy, vqa_corpus_accuracy)

approx = lambda x: pytest.approx(x, abs=1e-12)  # noqa: E731


# --------------------------------------------------------------------------------------------
# VQA: normalisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # number words -> digits
        ("none", "0"),
        ("ten", "10"),
        ("Two dogs", "2 dogs"),
        ("a dog", "dog"),  # articles dropped
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("yes.", "yes"),  # period not followed by a digit is removed
        ("Dr. Who", "dr who"),
        ("3.5", "3.5"),  # decimal point kept
        ("3.", "3"),
        ("1,000", "1000"),  # comma between digits: every punctuation mark deleted, not spaced
        ("red,white", "red white"),  # no space next to ',' -> replaced by a space
        ("red, white", "red white"),  # space next to ',' -> deleted
        ("t-shirt", "t shirt"),
        ("yes!", "yes"),
        ("it's", "it's"),  # apostrophe is not punctuation for the official script
        ("its", "its"),
        ("dont", "don't"),  # contractions restored
        ("hes", "he's"),
        ("  a\tdog\n", "dog"),  # newline/tab -> space, ends stripped, spaces collapsed
        ("a", ""),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_normalize_vqa_answer_period_quirk():
    # The official call passes re.UNICODE (32) as `count`: at most 32 periods are removed.
    assert normalize_vqa_answer("x" + "." * 40) == "x" + "." * 8


# --------------------------------------------------------------------------------------------
# VQA: per-question accuracy
# --------------------------------------------------------------------------------------------


def _ten(matching: str, n_match: int, other: str = "zzz") -> list[str]:
    return [matching] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    "n_match, expected",
    [
        (0, 0.0),
        # leave-one-out by hand: 9 subsets keep the match (1/3), 1 drops it (0) -> 3/10
        (1, 0.3),
        # 8 subsets see 2 matches (2/3), 2 see 1 (1/3) -> (16/3 + 2/3) / 10 = 0.6
        (2, 0.6),
        # 7 subsets see 3 (1), 3 see 2 (2/3) -> (7 + 2) / 10 = 0.9
        (3, 0.9),
        # 6 subsets see 4 (1), 4 see 3 (1) -> 1.0
        (4, 1.0),
        (9, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(n_match, expected):
    assert vqa_accuracy("cat", _ten("cat", n_match, other="dog")) == approx(expected)


def test_vqa_accuracy_all_match():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0


def test_vqa_accuracy_numbers():
    answers = ["two", "2", "2"] + ["3"] * 7  # normalised: three "2"
    assert vqa_accuracy("2", answers) == approx(0.9)
    assert vqa_accuracy("two", answers) == approx(0.9)
    assert vqa_accuracy("Two.", answers) == approx(0.9)


def test_vqa_accuracy_articles():
    answers = ["a dog", "dog", "the dog"] + ["cat"] * 7
    assert vqa_accuracy("dog", answers) == approx(0.9)
    assert vqa_accuracy("A Dog", answers) == approx(0.9)
    assert vqa_accuracy("an dog", answers) == approx(0.9)


def test_vqa_accuracy_punctuation():
    assert vqa_accuracy("yes.", ["yes", "yes"] + ["no"] * 8) == approx(0.6)
    assert vqa_accuracy("1,000", ["1,000", "1000", "1000"] + ["100"] * 7) == approx(0.9)
    # "3.5" keeps its decimal point: it does not match "35"
    assert vqa_accuracy("3.5", ["3.5"] + ["35"] * 9) == approx(0.3)
    # apostrophes are kept: "its" and "it's" differ
    answers = ["it's"] * 3 + ["its"] + ["no"] * 6
    assert vqa_accuracy("it's", answers) == approx(0.9)
    assert vqa_accuracy("its", answers) == approx(0.3)


def test_vqa_accuracy_contractions():
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == approx(0.9)
    assert vqa_accuracy("Dont know", ["don't know", "dont know"] + ["no"] * 8) == approx(0.6)


def test_vqa_accuracy_unanimous_answers_get_no_processing():
    # All ten answers identical: the official script compares after whitespace strip only.
    assert vqa_accuracy("Two", ["2"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("2.", ["2"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0  # whitespace is always stripped
    # unanimity is judged after stripping: still no processing
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["yes "]) == 0.0
    # one dissenting answer switches processing on for all of them
    assert vqa_accuracy("Two", ["2"] * 9 + ["3"]) == approx(1.0)


def test_vqa_accuracy_other_lengths():
    # 3 identical answers: each subset of 2 has 2 matches -> 2/3
    assert vqa_accuracy("yes", ["yes"] * 3) == approx(2 / 3)
    # 4 answers, 3 match: 3 subsets see 2 (2/3), 1 sees 3 (1) -> (2 + 1) / 4
    assert vqa_accuracy("yes", ["yes", "yes", "yes", "no"]) == approx(0.75)
    # a single answer leaves an empty subset: always 0
    assert vqa_accuracy("yes", ["yes"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# --------------------------------------------------------------------------------------------
# VQA: corpus
# --------------------------------------------------------------------------------------------

_VQA_ANN = {
    1: {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
    2: {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number", "question_type": "how many"},
    3: {"answers": ["no"] + ["yes"] * 9, "answer_type": "yes/no", "question_type": "is this"},
}


def test_vqa_corpus_accuracy():
    # per question: 1.0, 0.6 ("two" -> "2", 2 matches), 0.3 (1 match)
    preds = {1: "yes", 2: "two", 3: "no", 99: "ignored"}
    out = vqa_corpus_accuracy(preds, _VQA_ANN)
    assert set(out) == {"overall", "perAnswerType", "perQuestionType"}
    assert out["overall"] == 63.33  # 100 * 1.9 / 3 = 63.333...
    assert out["perAnswerType"] == {"yes/no": 65.0, "number": 60.0}
    assert out["perQuestionType"] == {"is the": 100.0, "how many": 60.0, "is this": 30.0}


def test_vqa_corpus_accuracy_raw_answer_dicts():
    ann = {7: {"answers": [{"answer": "2", "answer_id": i} for i in range(10)],
               "answer_type": "number", "question_type": "how many"}}
    assert vqa_corpus_accuracy({7: "2"}, ann)["overall"] == 100.0


def test_vqa_corpus_accuracy_missing_prediction():
    with pytest.raises(ValueError, match="3"):
        vqa_corpus_accuracy({1: "yes", 2: "2"}, _VQA_ANN)
    with pytest.raises(ValueError):
        vqa_corpus_accuracy({}, {})


# --------------------------------------------------------------------------------------------
# GQA exact match
# --------------------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match("Yes", "yes") == 1.0
    assert exact_match(" yes. ", "yes") == 1.0
    assert exact_match("traffic  light", "traffic light") == 1.0
    assert exact_match("no", "yes") == 0.0
    assert exact_match("red", "red car") == 0.0


# --------------------------------------------------------------------------------------------
# Caption metrics (pycocoevalcap)
# --------------------------------------------------------------------------------------------

_CAP_PRED = {
    101: "A man riding a wave on top of a surfboard.",
    102: "a plate of food with broccoli and rice",
    103: "Two dogs playing in the snow",
    104: "a red double decker bus on a street",
    105: "a cat sitting on a laptop keyboard",
}
_CAP_REFS = {
    101: ["A surfer rides a large wave.", "A man on a surfboard riding a wave.",
          "Person surfing on the ocean"],
    102: ["A plate with rice, broccoli and chicken.", "Dinner plate of rice and vegetables"],
    103: ["Two dogs play in the snow.", "A pair of dogs running through snow",
          "dogs playing outside in winter", "Two puppies in the snow.",
          "Snowy field with two dogs"],
    104: ["A red bus driving down a city street.", "A double-decker bus on the road.",
          "Red double decker bus parked by the curb", "a bus in London"],
    105: ["A cat lying on a laptop.", "A kitten sits on the keyboard of a computer."],
}
_CAP_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


def _pycocoevalcap_reference(preds, refs):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in caps] for i, caps in refs.items()})
    res = tok.tokenize({i: [{"caption": preds[i]}] for i in refs})
    out = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res)[0]))
    meteor = Meteor()
    out["METEOR"] = meteor.compute_score(gts, res)[0]
    del meteor
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


@pytest.fixture(scope="module")
def caption_results():
    """caption_metrics (SPICE requested) and the direct pycocoevalcap reference, computed once
    (each starts a METEOR JVM).  Any SPICE download attempt is recorded, not performed."""
    import pycocoevalcap.spice.get_stanford_models as gsm

    downloads = []

    def blocked_download(*args, **kwargs):
        downloads.append(args)
        raise OSError("download blocked by the test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gsm, "urlretrieve", blocked_download)
        ours = caption_metrics(_CAP_PRED, _CAP_REFS, spice=True)
    return ours, _pycocoevalcap_reference(_CAP_PRED, _CAP_REFS), downloads


@pytest.mark.slow  # seconds of subprocesses or a JVM: the slow suite (CI runs it too)
def test_caption_metrics_match_pycocoevalcap(caption_results):
    ours, ref, _ = caption_results
    assert _CAP_KEYS <= set(ours)
    for key in _CAP_KEYS:
        assert isinstance(ours[key], float)
        assert ours[key] == pytest.approx(float(ref[key]), rel=1e-9, abs=1e-12), key
    assert 0 < ours["Bleu_4"] <= ours["Bleu_1"] <= 1
    assert ours["CIDEr"] > 0


@pytest.mark.slow  # shares the JVM fixture above
def test_caption_metrics_spice_reported_not_downloaded(caption_results):
    ours, _, downloads = caption_results
    assert downloads == []
    if caption_module._spice_unavailable_reason() is None:  # an environment with SPICE installed
        assert "SPICE" in ours or "SPICE" in ours["unavailable"]
    else:
        assert "SPICE" not in ours
        assert set(ours) == _CAP_KEYS | {"unavailable"}
        assert ours["unavailable"]["SPICE"] == caption_module._spice_unavailable_reason()


def test_spice_detection_without_corenlp_jars(tmp_path, monkeypatch):
    monkeypatch.setattr(caption_module, "_spice_dir", lambda: tmp_path)
    monkeypatch.setattr(caption_module.shutil, "which", lambda name: "/usr/bin/java")
    (tmp_path / "spice-1.0.jar").write_bytes(b"")
    (tmp_path / "lib").mkdir()
    reason = caption_module._spice_unavailable_reason()
    assert reason is not None and "stanford-corenlp-3.6.0" in reason
    for jar in caption_module._SPICE_CORENLP_JARS:
        (tmp_path / "lib" / jar).write_bytes(b"")
    assert caption_module._spice_unavailable_reason() is None
    monkeypatch.setattr(caption_module.shutil, "which", lambda name: None)
    assert "java" in caption_module._spice_unavailable_reason()


@pytest.mark.slow  # seconds of subprocesses or a JVM: the slow suite (CI runs it too)
def test_caption_metrics_empty_captions_and_no_spice():
    preds = {1: "", 2: "...", 3: "a dog\r\non the grass", 4: "a cat"}
    refs = {1: ["a man riding a horse", ""], 2: ["a bowl of fruit"],
            3: ["a dog lying on grass", "dog on a lawn"], 4: [""]}
    out = caption_metrics(preds, refs, spice=False)
    assert set(out) == _CAP_KEYS  # no SPICE, no "unavailable"
    assert all(math.isfinite(v) and v >= 0 for v in out.values())


def test_caption_metrics_id_mismatch():
    with pytest.raises(ValueError, match=r"without a prediction.*\[2\]"):
        caption_metrics({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(ValueError, match=r"without references.*\[3\]"):
        caption_metrics({1: "a", 3: "c"}, {1: ["a"]})
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({1: "a"}, {1: []})
    with pytest.raises(ValueError):
        caption_metrics({}, {})


# --------------------------------------------------------------------------------------------
# BLEU for generated text
# --------------------------------------------------------------------------------------------


def test_bleu_matches_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu

    preds = ["The cat sat on the mat", "a quick brown fox jumps", "Hello world again today"]
    refs = [["the cat is on the mat", "There is a cat on the mat"],
            "A quick brown fox jumped over",
            ["hello   World again", "hi world"]]
    gts = {0: ["the cat is on the mat", "there is a cat on the mat"],
           1: ["a quick brown fox jumped over"],
           2: ["hello world again", "hi world"]}
    res = {0: ["the cat sat on the mat"], 1: ["a quick brown fox jumps"],
           2: ["hello world again today"]}
    expected = Bleu(4).compute_score(gts, res, verbose=0)[0]
    out = bleu(preds, refs)
    assert list(out) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]
    for n in range(4):
        assert out[f"Bleu_{n + 1}"] == pytest.approx(expected[n], abs=1e-12)


def test_bleu_identical_text_is_one():
    out = bleu(["A Cat is on the mat"], [["a cat is  on the mat"]])
    assert out["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        bleu(["a"], [])


# --------------------------------------------------------------------------------------------
# Top-k, retrieval, perplexity
# --------------------------------------------------------------------------------------------


def test_topk_accuracy():
    scores = torch.tensor([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: rank 0
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 2: rank 2
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: rank 5
        [0.3, 0.2, 0.1, 0.0, 0.6, 0.5],  # label 5: rank 1
    ])
    labels = [1, 2, 0, 5]
    assert topk_accuracy(scores, labels) == {"top1": 0.25, "top5": 0.75}
    assert topk_accuracy(scores.tolist(), torch.tensor(labels), k=(2, 3, 6)) == {
        "top2": 0.5, "top3": 0.75, "top6": 1.0}
    assert topk_accuracy(scores, labels, k=10) == {"top10": 1.0}


def test_topk_accuracy_ties_and_errors():
    assert topk_accuracy(torch.zeros(2, 3), [0, 1], k=(1, 3)) == {"top1": 0.0, "top3": 1.0}
    with pytest.raises(ValueError):
        topk_accuracy(torch.tensor([[float("nan"), 0.0]]), [0])
    with pytest.raises(ValueError):
        topk_accuracy(torch.zeros(2, 3), [0, 3])
    with pytest.raises(ValueError):
        topk_accuracy(torch.zeros(2, 3), [0])


def test_retrieval_recall():
    # 3 images, 5 texts; texts 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    sim = torch.tensor([
        [0.9, 0.1, 0.8, 0.2, 0.3],
        [0.7, 0.6, 0.5, 0.1, 0.4],
        [0.2, 0.3, 0.1, 0.0, 0.25],
    ])
    out = retrieval_recall(sim, [0, 0, 1, 1, 2], ks=(1, 2, 3))
    # i2t ranks (wrong texts scoring >= best own text): image0 0, image1 2, image2 1
    # t2i ranks (wrong images scoring >= own image): 0, 2, 1, 1, 2
    assert out == pytest.approx({
        "i2t_R@1": 1 / 3, "i2t_R@2": 2 / 3, "i2t_R@3": 1.0,
        "t2i_R@1": 1 / 5, "t2i_R@2": 3 / 5, "t2i_R@3": 1.0,
    }, abs=1e-12)
    assert set(retrieval_recall(sim.numpy(), [0, 0, 1, 1, 2])) == {
        "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"}


def test_retrieval_recall_ties_and_errors():
    out = retrieval_recall(torch.ones(2, 2), [0, 1], ks=(1, 2))
    assert out == {"i2t_R@1": 0.0, "i2t_R@2": 1.0, "t2i_R@1": 0.0, "t2i_R@2": 1.0}
    with pytest.raises(ValueError, match="every image"):
        retrieval_recall(torch.zeros(3, 2), [0, 1])
    with pytest.raises(ValueError):
        retrieval_recall(torch.zeros(2, 2), [0, 1, 1])
    with pytest.raises(ValueError):
        retrieval_recall(torch.zeros(2, 2), [0, 2])


def test_perplexity():
    assert perplexity(4 * math.log(8), 4) == pytest.approx(8.0)
    assert perplexity(torch.tensor(4 * math.log(8)), n_tokens=4) == pytest.approx(8.0)
    assert perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)
    assert perplexity(torch.full((2, 3), math.log(5))) == pytest.approx(5.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
    with pytest.raises(ValueError):
        perplexity([])
