"""Evaluation metrics: VQA accuracy, GQA exact match, COCO caption metrics, classification
top-k accuracy, image-text retrieval recall, perplexity and corpus BLEU.

This module imports no other mmprefix module but ``caption_metrics`` (the COCO caption metrics and BLEU,
which it re-exports).

VQA accuracy follows the official VQAv2 script ``vqaEval.py`` (GT-Vision-Lab/VQA, master
``a013f00``), including its quirks, which are noted where they occur.  Caption metrics call
pycocoevalcap's PTBTokenizer and scorers one by one; SPICE is attempted only when its Stanford
CoreNLP jars are already installed, since pycocoevalcap would otherwise try to download them.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from .caption_metrics import bleu, caption_metrics

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "vqa_corpus_accuracy",
    "normalize_gqa_answer",
    "exact_match",
    "caption_metrics",
    "topk_accuracy",
    "retrieval_recall",
    "perplexity",
    "bleu",
]

# ---------------------------------------------------------------------------------------------
# VQA (official VQAv2 rules)
# ---------------------------------------------------------------------------------------------

# The official contractions table, entry for entry.  Some entries are dead or odd in the
# official script and are kept as they are: keys with capitals ("Im", "Ive", "Id've", "I'dve")
# never match because words are lower-cased first, and "somebody'd" maps to "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Order matters only in that each character is handled once; '.' is handled separately and
# the apostrophe and ':' are not punctuation for the official script.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")
# Official pattern: r"(?!<=\d)(\.)(?!\d)".  Its leading "(?!<=\d)" is a mistyped look-behind
# (a look-ahead for the text "<=" + digit) that always succeeds at a '.', so the pattern is
# simply "a period not followed by a digit": "3.5" keeps its period, "yes." loses it.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (== 32) in the position of `count`, so at most 32
# periods are removed.  Kept for exactness.
_PERIOD_STRIP_COUNT = 32
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")


def _strip_vqa_whitespace(text: str) -> str:
    """Replace newlines and tabs by spaces and strip the ends (applied to every answer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """Official ``processPunctuation``.

    Each punctuation character is deleted when it touches a space anywhere in the answer
    ("red, white"), or when the answer contains a comma between digits ("1,000"); otherwise it
    becomes a space ("red,white" -> "red white").  The tests look at the input text, not at
    the text being rewritten.  Then periods not followed by a digit are deleted.
    """
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, number words to
    digits, drop articles, expand contractions, re-join with single spaces."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise a VQA answer the way the official script does when annotators disagree.

    Newlines/tabs become spaces and the ends are stripped, then punctuation is processed, then
    the text is lower-cased, number words up to ten become digits ("none" -> "0"), the articles
    a/an/the are dropped and missing apostrophes are restored ("dont" -> "don't").

    Note that :func:`vqa_accuracy` applies this only when the ground-truth answers are not all
    identical; when they are, answers are compared after whitespace stripping alone.
    """
    return _process_digit_article(_process_punctuation(_strip_vqa_whitespace(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one predicted answer against the annotators' answers, in [0, 1].

    As in the official script: all answers are whitespace-stripped; if they are not all
    identical, the answers and the prediction are normalised (:func:`normalize_vqa_answer`),
    otherwise they are compared as they are (so ``"Two"`` scores 0 against ten ``"2"``).
    The score is the mean, over the subsets that leave out one annotator, of
    ``min(1, matches_in_subset / 3)``: with ten answers, 1 match gives 0.3, 2 give 0.6,
    3 give 0.9 and 4 or more give 1.0.

    Lists of another length use the same leave-one-out mean over however many answers there
    are, so fewer than four answers can never reach 1 (three identical answers: 2/3; a single
    answer: always 0).

    Raises:
        ValueError: if ``answers`` is empty.
    """
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    gts = [_strip_vqa_whitespace(a) for a in answers]
    pred = _strip_vqa_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_vqa_answer(a) for a in gts]
        pred = normalize_vqa_answer(pred)
    matches = sum(g == pred for g in gts)
    subset_acc = [min(1.0, float(matches - (g == pred)) / 3) for g in gts]
    return float(sum(subset_acc)) / len(subset_acc)


def _answer_text(answer: Any) -> str:
    """An answer given as a string or as a raw VQA annotation dict ``{"answer": ...}``."""
    return answer["answer"] if isinstance(answer, Mapping) else answer


def vqa_corpus_accuracy(
    predictions: Mapping[Hashable, str],
    annotations: Mapping[Hashable, Mapping[str, Any]],
) -> dict[str, Any]:
    """Corpus VQAv2 accuracy as the official script reports it.

    Args:
        predictions: ``{question_id: predicted answer}``.  Ids not in ``annotations`` are
            ignored, so a subset of questions can be scored.
        annotations: ``{question_id: {"answers": [...], "answer_type": str,
            "question_type": str}}``; answers may be strings or raw VQA dicts with an
            ``"answer"`` key.

    Returns:
        ``{"overall": float, "perAnswerType": {type: float}, "perQuestionType": {type: float}}``,
        each a mean of per-question :func:`vqa_accuracy` in percent, rounded to 2 decimals.

    Raises:
        ValueError: if ``annotations`` is empty or a question has no prediction.
    """
    if not annotations:
        raise ValueError("vqa_corpus_accuracy needs at least one annotated question")
    missing = [qid for qid in annotations if qid not in predictions]
    if missing:
        shown = ", ".join(repr(q) for q in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"no prediction for {len(missing)} question(s): {shown}{more}")

    all_acc: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for qid, ann in annotations.items():
        acc = vqa_accuracy(predictions[qid], [_answer_text(a) for a in ann["answers"]])
        all_acc.append(acc)
        by_answer_type.setdefault(ann["answer_type"], []).append(acc)
        by_question_type.setdefault(ann["question_type"], []).append(acc)

    def percent(values: list[float]) -> float:
        return round(100 * float(sum(values)) / len(values), 2)

    return {
        "overall": percent(all_acc),
        "perAnswerType": {k: percent(v) for k, v in by_answer_type.items()},
        "perQuestionType": {k: percent(v) for k, v in by_question_type.items()},
    }


# ---------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------


def normalize_gqa_answer(answer: str) -> str:
    """Lower-case, collapse whitespace and strip punctuation from both ends."""
    return " ".join(answer.lower().split()).strip(string.punctuation + " ")


def exact_match(prediction: str, answer: str) -> float:
    """GQA-style exact match (1.0 or 0.0) after :func:`normalize_gqa_answer` on both sides.

    The official GQA ``eval.py`` compares raw strings; its gold answers are already lower-case
    without surrounding punctuation, so this only forgives case, spacing and a trailing period
    in generated predictions ("Yes." == "yes").
    """
    return float(normalize_gqa_answer(prediction) == normalize_gqa_answer(answer))


# ---------------------------------------------------------------------------------------------
# Classification, retrieval, language modelling
# ---------------------------------------------------------------------------------------------


def _as_ks(k: int | Sequence[int]) -> tuple[int, ...]:
    ks = tuple(k) if isinstance(k, Sequence) else (k,)
    if not ks or any(int(x) < 1 for x in ks):
        raise ValueError(f"k must be positive integers, got {k!r}")
    return tuple(int(x) for x in ks)


def _finite_scores(scores: Any, name: str) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach()
    if not scores.is_floating_point():
        scores = scores.double()
    if scores.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN")
    return scores


def topk_accuracy(
    logits_or_scores: Any, labels: Any, k: int | Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k classification accuracy in [0, 1], keys ``"top1"``, ``"top5"``, ...

    Args:
        logits_or_scores: ``[n, n_classes]`` tensor, array or nested list.
        labels: ``[n]`` class indices.
        k: one k or several.  A k above ``n_classes`` counts every example as correct.

    An example is correct at k when fewer than k other classes score at least as high as its
    label, so ties count against it (all-equal scores give top1 = 0).
    """
    scores = _finite_scores(logits_or_scores, "logits_or_scores")
    labels = torch.as_tensor(labels).long().reshape(-1).to(scores.device)
    n, n_classes = scores.shape
    if n == 0 or labels.numel() != n:
        raise ValueError(f"need one label per row: {n} rows, {labels.numel()} labels")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes})")
    label_scores = scores.gather(1, labels[:, None])
    # rank = number of other classes scoring >= the label (the label itself is counted, so -1)
    rank = (scores >= label_scores).sum(dim=1) - 1
    return {f"top{kk}": (rank < kk).double().mean().item() for kk in _as_ks(k)}


def retrieval_recall(
    similarity: Any, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image-text retrieval recall@k in [0, 1] in both directions.

    Args:
        similarity: ``[n_images, n_texts]`` scores (higher is more similar).
        text_to_image: for each text, the index of its image; every image needs a text.
        ks: cut-offs.

    Returns:
        ``i2t_R@k`` (image -> text: an image is a hit if any of its texts is in its top k) and
        ``t2i_R@k`` (text -> image: a text is a hit if its image is in its top k).  Ties count
        against the query: a query is a hit at k when fewer than k wrong candidates score at
        least as high as its best correct one.
    """
    sim = _finite_scores(similarity, "similarity")
    n_images, n_texts = sim.shape
    owner = torch.as_tensor(text_to_image, dtype=torch.long).reshape(-1).to(sim.device)
    if owner.numel() != n_texts:
        raise ValueError(f"text_to_image has {owner.numel()} entries for {n_texts} texts")
    if n_texts == 0 or owner.min() < 0 or owner.max() >= n_images:
        raise ValueError(f"text_to_image must hold image indices in [0, {n_images})")
    text_idx = torch.arange(n_texts, device=sim.device)
    is_pair = torch.zeros(n_images, n_texts, dtype=torch.bool, device=sim.device)
    is_pair[owner, text_idx] = True
    if not is_pair.any(dim=1).all():
        lonely = torch.nonzero(~is_pair.any(dim=1)).flatten()[:5].tolist()
        raise ValueError(f"every image needs at least one text; images without: {lonely}")

    best_pair = sim.masked_fill(~is_pair, -math.inf).max(dim=1, keepdim=True).values
    i2t_rank = ((sim >= best_pair) & ~is_pair).sum(dim=1)
    pair_score = sim[owner, text_idx]
    t2i_rank = (sim >= pair_score[None, :]).sum(dim=0) - 1

    out = {}
    for k in _as_ks(ks):
        out[f"i2t_R@{k}"] = (i2t_rank < k).double().mean().item()
    for k in _as_ks(ks):
        out[f"t2i_R@{k}"] = (t2i_rank < k).double().mean().item()
    return out


def perplexity(nll: Any, n_tokens: int | None = None) -> float:
    """Perplexity ``exp(mean negative log-likelihood per token)`` (natural log).

    Args:
        nll: with ``n_tokens``, the summed NLL over ``n_tokens`` tokens; without it, the
            per-token losses (any shape; every element is one token).
        n_tokens: number of tokens the sum covers.

    Returns ``inf`` if the result overflows a float.
    """
    if n_tokens is None:
        losses = torch.as_tensor(nll, dtype=torch.float64).reshape(-1)
        if losses.numel() == 0:
            raise ValueError("perplexity needs at least one token loss")
        mean_nll = losses.mean().item()
    else:
        if n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        mean_nll = float(nll) / n_tokens
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
