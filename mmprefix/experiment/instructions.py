"""The world's tasks asked in varied words, for one instruction prefix (``recipes/instruct.py``).

Four tasks over the world's images: how many shapes there are, the size of a named shape, the colour of the
shape on the left or right, and a caption in the downstream style. Each is asked in six phrasings made of words
the embedded backbones know (their vocabulary is the world's: any other word would be one unknown token). A
phrasing is a task's *core* (how it asks) set in a *frame* (how the request is laid out): training uses each
task's first four cores in three of the four frames. The test images are asked three ways:

* ``"seen"``: trained cores in trained frames;
* ``"held-out phrasings"``: each task's two cores never trained, in its trained frames;
* ``"held-out combinations"``: trained cores in the one frame the task never trained with (other tasks did).

Every sample is a VQA sample (the phrasing as its question, the answer or caption ten times as its answers), so
the harness's VQA accuracy scores each as an exact match after VQA's normalisation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data.records import CaptionSample, VQASample

TASKS: dict[str, tuple[str, ...]] = {  # task -> cores; {obj} and {side} are filled from the world's question
    "count": ("how many shapes are there?", "how many shapes?", "shapes: how many?", "how many are there?",
              "name how many shapes there are", "there are how many shapes?"),
    "size": ("what size is the {obj}?", "the {obj} is what size?", "{obj}: what size?", "what size is the {obj} there?",
             "name the size, {obj}", "size? the {obj}"),
    "position": ("what color is the shape on the {side}?", "the shape on the {side} is what color?",
                 "{side} shape: what color?", "what color is on the {side}?", "name the color on the {side}",
                 "on the {side}, what color is the shape?"),
    "caption": ("describe the shapes", "name the shapes", "what shapes are there?", "describe what is there",
                "what are the shapes?", "name what is there"),
}
FRAMES = ("{core}", "question: {core}", "{core} - answer:", "| {core} |")
TRAINED_CORES = 4
SETS = ("seen", "held-out phrasings", "held-out combinations")


@dataclass(frozen=True)
class TaskRow:
    """One thing to ask about one image: the task, the words its cores need, and the answer."""

    id: str
    task: str
    image: Any
    answer: str
    slots: tuple[tuple[str, str], ...] = ()


def task_rows(questions: Sequence[VQASample], captions: Sequence[CaptionSample]) -> list[TaskRow]:
    """The world's downstream questions (count, size, position) and style-B captions as task rows."""
    rows = []
    for sample in questions:
        size = re.fullmatch(r"what size is the (.+)\?", sample.question)
        side = re.fullmatch(r"what color is the shape on the (\w+)\?", sample.question)
        slots = (("obj", size[1]),) if size else (("side", side[1]),) if side else ()
        if sample.question_type in TASKS:
            rows.append(TaskRow(str(sample.question_id), sample.question_type, sample.image, sample.answers[0], slots))
    rows += [TaskRow(f"{s.image_id}-caption", "caption", s.image, s.captions[0]) for s in captions]
    return rows


def skipped_frame(task: str) -> int:
    """The frame ``task`` never trains with (a different one per task, so that every frame is trained)."""
    return list(TASKS).index(task) % len(FRAMES)


def phrasing(row: TaskRow, core: int, frame: int) -> str:
    return FRAMES[frame].format(core=TASKS[row.task][core].format(**dict(row.slots)))


def phrased(rows: Sequence[TaskRow], kind: str, seed: int, per_task: int | None = None) -> list[VQASample]:
    """Each row (at most ``per_task`` of each task) asked one way of ``kind`` (``"train"`` or one of `SETS`),
    drawn with ``seed``."""
    rng = random.Random(seed)
    taken: dict[str, int] = {}
    samples = []
    for row in rows:
        if per_task is not None and taken.get(row.task, 0) >= per_task:
            continue
        taken[row.task] = taken.get(row.task, 0) + 1
        trained = [f for f in range(len(FRAMES)) if f != skipped_frame(row.task)]
        if kind == "held-out phrasings":
            core, frame = rng.randrange(TRAINED_CORES, len(TASKS[row.task])), rng.choice(trained)
        elif kind == "held-out combinations":
            core, frame = rng.randrange(TRAINED_CORES), skipped_frame(row.task)
        else:
            core, frame = rng.randrange(TRAINED_CORES), rng.choice(trained)
        samples.append(VQASample(f"{row.id}:{kind}", row.image, phrasing(row, core, frame), [row.answer] * 10,
                                 question_type=row.task))
    return samples


def accuracies(scores: dict[str, float]) -> dict[str, float]:
    """Per-task accuracy (percent) from the harness's VQA scores, and their mean over the tasks."""
    by_task = {task: scores[f"vqa_accuracy_by_question/{task}"] for task in TASKS
               if f"vqa_accuracy_by_question/{task}" in scores}
    return {**by_task, "mean": round(sum(by_task.values()) / len(by_task), 2)}


def load_rows(questions: str, captions: str, limit: int | None = None) -> list[TaskRow]:
    """Task rows from a VQA file of the world's downstream questions and a caption file of the same images
    (paths or ``world:NAME``); ``limit``: at most that many rows of each task."""
    from ..data import read_samples
    from .loading import data_path

    rows = task_rows(read_samples("vqa", data_path(questions)), read_samples("caption", data_path(captions)))
    if limit is None:
        return rows
    taken: dict[str, int] = {}
    kept = []
    for row in rows:
        taken[row.task] = taken.get(row.task, 0) + 1
        if taken[row.task] <= limit:
            kept.append(row)
    return kept


def score(model: Any, processor: Any, tests: dict[str, list[VQASample]], prefix_of: Any, batch_size: int,
          generation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Accuracy per test set and task, each task's samples routed to ``prefix_of(task)`` (a prefix name, or None
    for the frozen model)."""
    from .. import evaluation

    results = {}
    for kind, samples in tests.items():
        scores = {}
        for task in TASKS:
            asked = [s for s in samples if s.question_type == task]
            predictions, _ = evaluation.predict("vqa", model, processor, asked, prefix=prefix_of(task),
                                                batch_size=batch_size, generation=generation, progress=False)
            scores.update(evaluation.score("vqa", predictions, asked))
        results[kind] = accuracies(scores)
    return results


def report(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """The comparison as Markdown: mean accuracy per model and test set, then per task."""
    lines = ["| model | " + " | ".join(SETS) + " |", "|---|" + "---:|" * len(SETS)]
    lines += [f"| {name} | " + " | ".join(f"{sets[kind]['mean']:.1f}" for kind in SETS) + " |"
              for name, sets in results.items()]
    lines += ["", "| model | test set | " + " | ".join(TASKS) + " |", "|---|---|" + "---:|" * len(TASKS)]
    lines += [f"| {name} | {kind} | " + " | ".join(f"{sets[kind][task]:.1f}" for task in TASKS) + " |"
              for name, sets in results.items() for kind in SETS]
    return "\n".join(lines)
