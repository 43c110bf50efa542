"""COCO caption metrics through pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE when its CoreNLP jars are
installed) and corpus BLEU. `mmprefix.evaluation.metrics` re-exports `caption_metrics` and `bleu`.

pycocoevalcap's PTBTokenizer and scorers are called one by one; SPICE is attempted only when its Stanford
CoreNLP jars are already installed, since pycocoevalcap would otherwise try to download them.
"""

from __future__ import annotations

import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any


_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _spice_dir() -> Path:
    """Folder of pycocoevalcap's SPICE package (holds spice-1.0.jar and lib/)."""
    import pycocoevalcap.spice

    return Path(pycocoevalcap.spice.__file__).parent


def _spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None if it can.  Never downloads anything."""
    if shutil.which("java") is None:
        return "java was not found on PATH"
    spice_dir = _spice_dir()
    if not (spice_dir / "spice-1.0.jar").is_file():
        return f"spice-1.0.jar is missing from {spice_dir}"
    missing = [j for j in _SPICE_CORENLP_JARS if not (spice_dir / "lib" / j).is_file()]
    if missing:
        return (
            f"Stanford CoreNLP jars {missing} are not in {spice_dir / 'lib'}; pycocoevalcap "
            "would download them, so SPICE was skipped"
        )
    return None


def _one_line(caption: str) -> str:
    """Join a caption onto one line: Java's tokenizer also breaks lines at '\\r' and other
    separators, which would shift every later caption onto the wrong image."""
    if not isinstance(caption, str):
        raise TypeError(f"captions must be str, got {type(caption).__name__}")
    return " ".join(caption.splitlines())


def _check_same_ids(predictions: Mapping, references: Mapping) -> None:
    missing = [i for i in references if i not in predictions]
    extra = [i for i in predictions if i not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} id(s) without a prediction, e.g. {missing[:5]!r}")
        if extra:
            parts.append(f"{len(extra)} id(s) without references, e.g. {extra[:5]!r}")
        raise ValueError("predictions and references must have the same ids: " + "; ".join(parts))
    empty = [i for i, refs in references.items() if len(refs) == 0]
    if empty:
        raise ValueError(f"{len(empty)} id(s) have no reference captions, e.g. {empty[:5]!r}")


def _tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenise (lower-case, punctuation dropped) with pycocoevalcap's PTBTokenizer."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    inputs = {i: [{"caption": _one_line(c)} for c in caps] for i, caps in captions.items()}
    out = PTBTokenizer().tokenize(inputs)
    if any(len(out.get(i, ())) != len(caps) for i, caps in inputs.items()):
        raise RuntimeError("PTBTokenizer returned a different number of captions than given")
    return out


def _meteor(gts: dict, res: dict) -> float:
    """METEOR with pycocoevalcap's Meteor; the JVM is stopped afterwards in all cases."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
        return float(score)
    finally:
        # compute_score keeps its lock when it fails, and Meteor.__del__ waits on that lock.
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: bool = True,
    meteor: bool = True,
) -> dict[str, Any]:
    """COCO caption metrics with pycocoevalcap, as ``COCOEvalCap.evaluate`` computes them.

    Captions are PTB-tokenised (Java), then scored by Bleu(4), Meteor (Java), Rouge and Cider
    called one by one.  CIDEr-D's IDF comes from ``references``, so scores on a few images are
    not comparable with full-split scores.

    Args:
        predictions: ``{image_id: generated caption}``; empty captions are allowed.
        references: ``{image_id: [reference captions]}``, same ids, at least one each.
        spice: also try SPICE.  It runs only if Java and its Stanford CoreNLP jars are already
            installed (no download is attempted); any failure is reported, never raised.
        meteor: compute METEOR (its JVM start costs seconds; leave it out for quick checks).

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr": float}``, plus ``"SPICE"`` when it
        ran, or ``"unavailable": {"SPICE": reason}`` when it was requested and could not run.

    Raises:
        ValueError: if the ids differ, there are none, or an id has no references.
    """
    if not references:
        raise ValueError("caption_metrics needs at least one image")
    _check_same_ids(predictions, references)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = _tokenize(references)
    res = _tokenize({i: [predictions[i]] for i in references})

    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    results: dict[str, Any] = {f"Bleu_{n + 1}": float(s) for n, s in enumerate(bleu_scores)}
    if meteor:
        results["METEOR"] = _meteor(gts, res)
    results["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    results["CIDEr"] = float(Cider().compute_score(gts, res)[0])

    if spice:
        reason = _spice_unavailable_reason()
        if reason is None:
            try:
                from pycocoevalcap.spice.spice import Spice

                results["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except Exception as err:  # SPICE is optional: report, never fail the rest
                reason = f"SPICE failed: {type(err).__name__}: {err}"
        if reason is not None:
            results["unavailable"] = {"SPICE": reason}
    return results


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 in [0, 1] with pycocoevalcap's Bleu scorer, for generated text.

    Tokenisation: each text is lower-cased and split on whitespace only (no PTB tokenizer, no
    Java), so punctuation stays attached to its word ("dog." and "dog" differ).  The brevity
    penalty uses the closest reference length, as pycocoevalcap does.

    Args:
        predictions: one generated text per example.
        references: per example, one reference text or a list of them.

    Returns:
        ``{"Bleu_1": ..., "Bleu_2": ..., "Bleu_3": ..., "Bleu_4": ...}``.
    """
    from pycocoevalcap.bleu.bleu import Bleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("bleu needs at least one prediction")

    def tok(text: str) -> str:
        return " ".join(text.lower().split())

    gts, res = {}, {}
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"example {i} has no reference")
        gts[i] = [tok(r) for r in refs]
        res[i] = [tok(pred)]
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"Bleu_{n + 1}": float(s) for n, s in enumerate(scores)}
