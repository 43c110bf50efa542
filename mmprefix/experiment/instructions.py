"""The world's tasks asked in varied words, for one instruction prefix (``recipes/instruct.py``).

Each scene of the world is given as records, left to right (``"shape=circle color=red size=small , shape=square
color=blue size=large"``), and four tasks are asked about it: how many shapes there are (count), a caption (the
pretraining style: "two shapes: a small red circle and a large blue square"), the colour of the shape on the left
or right (answer), and a phrase for the shape on one side (describe a record: "a small red circle"). Each task is
asked in six phrasings made of words the embedded backbones know (their vocabulary is the world's: any other word
would be one unknown token). A phrasing is a task's *core* (how it asks) set in a *frame* (how the request is laid
out); training uses each task's first four cores in three of the four frames. The test scenes are asked three
ways:

* ``"seen"``: trained cores in trained frames;
* ``"held-out phrasings"``: each task's two cores never trained, in its trained frames;
* ``"held-out combinations"``: trained cores in the one frame the task never trained with (other tasks did).

A sample is a `TextSample` (``prompt``: the scene, the phrasing and ``=>``; ``target``: the answer), scored by
exact match.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data import synthetic
from ..data.records import CaptionSample, TextSample

TASKS: dict[str, tuple[str, ...]] = {  # task -> cores; {side} is filled per scene
    "count": ("how many shapes are there?", "how many shapes?", "shapes: how many?", "how many are there?",
              "name how many shapes there are", "there are how many shapes?"),
    "caption": ("describe the shapes", "name the shapes", "what shapes are there?", "describe what is there",
                "what are the shapes?", "name what is there"),
    "answer": ("what color is the shape on the {side}?", "the shape on the {side} is what color?",
               "{side} shape: what color?", "what color is on the {side}?", "name the color on the {side}",
               "on the {side}, what color is the shape?"),
    "describe": ("describe the shape on the {side}", "what is the shape on the {side}?", "{side} shape: describe it",
                 "describe the {side} shape", "name the shape on the {side}", "on the {side}, what is there?"),
}
FRAMES = ("{core}", "question: {core}", "{core} - answer:", "| {core} |")
TRAINED_CORES = 4
SETS = ("seen", "held-out phrasings", "held-out combinations")
_OBJECT = re.compile(r"an? (small|large) (\w+) (circle|square|triangle)")


@dataclass(frozen=True)
class TaskRow:
    """One task asked about one scene: the scene as records, the side a question names, and the answer."""

    id: str
    task: str
    scene: str
    answer: str
    side: str = "left"


def scene_rows(captions: Sequence[CaptionSample], seed: int) -> list[TaskRow]:
    """Every task about each scene, read from its pretraining-style caption (which lists every object, left to
    right); the side a question names is drawn with ``seed``."""
    rng = random.Random(seed)
    rows = []
    for sample in captions:
        caption = sample.captions[0]
        shapes = [synthetic.Shape(shape, color, size, slot)
                  for slot, (size, color, shape) in enumerate(_OBJECT.findall(caption))]
        scene = " , ".join(f"shape={s.shape} color={s.color} size={s.size}" for s in shapes)
        side = rng.choice(("left", "right"))
        chosen = shapes[0] if side == "left" else shapes[-1]
        key = str(sample.image_id)
        rows += [TaskRow(f"{key}-count", "count", scene, synthetic.COUNTS[len(shapes) - 1]),
                 TaskRow(f"{key}-caption", "caption", scene, caption),
                 TaskRow(f"{key}-answer", "answer", scene, chosen.color, side),
                 TaskRow(f"{key}-describe", "describe", scene, synthetic.indefinite(chosen.phrase), side)]
    return rows


def skipped_frame(task: str) -> int:
    """The frame ``task`` never trains with (a different one per task, so that every frame is trained)."""
    return list(TASKS).index(task) % len(FRAMES)


def phrasing(row: TaskRow, core: int, frame: int) -> str:
    return FRAMES[frame].format(core=TASKS[row.task][core].format(side=row.side))


def phrased(rows: Sequence[TaskRow], kind: str, seed: int) -> list[tuple[str, TextSample]]:
    """Each row asked one way of ``kind`` (``"train"`` or one of `SETS`), drawn with ``seed``: (task, sample)."""
    rng = random.Random(seed)
    samples = []
    for row in rows:
        trained = [f for f in range(len(FRAMES)) if f != skipped_frame(row.task)]
        if kind == "held-out phrasings":
            core, frame = rng.randrange(TRAINED_CORES, len(TASKS[row.task])), rng.choice(trained)
        elif kind == "held-out combinations":
            core, frame = rng.randrange(TRAINED_CORES), skipped_frame(row.task)
        else:
            core, frame = rng.randrange(TRAINED_CORES), rng.choice(trained)
        prompt = f"{row.scene} {phrasing(row, core, frame)} =>"  # the request last, nearest the answer
        samples.append((row.task, TextSample(f"{row.id}:{kind}", prompt, row.answer)))
    return samples


def row_mean_loss(model: Any, batch: dict[str, Any], prefix: Any = None) -> Any:
    """The mean over rows of each row's mean token loss: every instruction counts once, a caption's seventeen
    tokens no more than a count's two (with the batch's token mean, the captions would steer one shared prefix).
    ``prefix``: the routing (default: the batch's own ``prefix`` entry)."""
    import torch

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "prefix")}
    logits = model(**inputs, prefix=batch["prefix"] if prefix is None else prefix).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
    scored = (targets != -100).sum(1).clamp(min=1)
    return (losses.sum(1) / scored).mean()


def load_rows(captions: str, seed: int, limit: int | None = None) -> list[TaskRow]:
    """Task rows of the scenes of a pretraining-style caption file (a path or ``world:NAME``); ``limit``: the
    first scenes only."""
    from ..data import read_samples
    from .loading import data_path

    samples = read_samples("caption", data_path(captions))
    return scene_rows(samples[:limit] if limit else samples, seed)


def score(model: Any, tokenizer: Any, tests: dict[str, list[tuple[str, TextSample]]], prefix_of: Any,
          batch_size: int, generation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Exact match (%) per test set and task, and the mean over tasks; each task's samples routed to
    ``prefix_of(task)`` (a prefix name, or None for the frozen model)."""
    from .. import evaluation

    results = {}
    for kind, asked in tests.items():
        scores = {}
        for task in TASKS:
            samples = [sample for name, sample in asked if name == task]
            written, _ = evaluation.predict("text", model, tokenizer, samples, prefix=prefix_of(task),
                                            batch_size=batch_size, generation=generation, progress=False)
            scores[task] = evaluation.score("text", written, samples)["exact_match"]
        results[kind] = {**scores, "mean": round(sum(scores.values()) / len(scores), 2)}
    return results


def report(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """The comparison as Markdown: mean exact match per model and test set, then per task."""
    lines = ["| model | " + " | ".join(SETS) + " |", "|---|" + "---:|" * len(SETS)]
    lines += [f"| {name} | " + " | ".join(f"{sets[kind]['mean']:.1f}" for kind in SETS) + " |"
              for name, sets in results.items()]
    lines += ["", "| model | test set | " + " | ".join(TASKS) + " |", "|---|---|" + "---:|" * len(TASKS)]
    lines += [f"| {name} | {kind} | " + " | ".join(f"{sets[kind][task]:.1f}" for task in TASKS) + " |"
              for name, sets in results.items() for kind in SETS]
    return "\n".join(lines)
