"""The embedded default's data: a synthetic visual world, generated deterministically in seconds.

64 px images hold one to three coloured shapes (circle, square, triangle; six colours; small or large) in
left / middle / right slots on a noisy light background. Every image comes with text for two kinds of tasks:

* pretraining tasks, which the tiny backbones were trained on: captions in style A ("two shapes: a large red
  circle and a small blue square", objects left to right), questions about colour, shape ("what is the orange
  object?" -> "an orange circle": every decoder emits "an" in pretraining) and existence, yes/no checks of
  sizes, counts and sides ("is the red circle large?", ``vqa_verify_*``), and attribute records (keys in random
  order) turned into phrases or names;
* downstream tasks, which they never saw and which the recipes adapt them to with prefixes: open questions about
  counts, sizes and the leftmost / rightmost object (concepts the yes/no checks taught, asked in a new form, as a
  real benchmark re-asks what a large pretrained model has seen), captions in style B ("a red circle and a blue square":
  no count, no sizes), a new record-to-sentence format, and image classification by the colour of the
  leftmost shape (``classes_*``: ``{image, label}``).

Downstream answers and captions only use words the backbones' decoders already emit in pretraining (counts and
sizes come from style-A captions): a frozen decoder cannot learn to emit a word it has always suppressed.

Files are written once per version into a cache folder in the readers' JSONL formats (``image`` paths relative
to the file), so recipes read the world exactly as they read any benchmark.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..core.files import write_text

# v6 writes "an" before vowels and names the object in shape answers, v5 added the vqa_verify files, v4 the
# classification files; the images are v3's
VERSION = "world-v6"
IMAGE_SIZE = 64
COLORS = {
    "red": (215, 45, 45),
    "green": (45, 165, 70),
    "blue": (45, 85, 215),
    "yellow": (225, 200, 40),
    "purple": (145, 60, 185),
    "orange": (240, 135, 35),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 6, "large": 10}  # half-width in pixels
COUNTS = ("one", "two", "three")
SLOTS = (11, 32, 53)  # x centres of the left, middle and right slots
SPLITS = {"train": 4000, "val": 400, "test": 400}
SEEDS = {"train": 0, "val": 1, "test": 2}
PRETRAIN_QUESTIONS = ("color", "shape", "exist")
DOWNSTREAM_QUESTIONS = ("count", "size", "position")
VERIFY_QUESTIONS = ("verify_count", "verify_size", "verify_side")


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    slot: int  # 0 left, 1 middle, 2 right

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


def indefinite(words: str) -> str:
    """``words`` after their indefinite article: "an orange circle", "a red square"."""
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def scene(rng: np.random.Generator) -> list[Shape]:
    """One to three shapes in distinct slots, left to right; no two share both colour and shape."""
    count = int(rng.integers(1, 4))
    slots = sorted(rng.choice(3, size=count, replace=False).tolist())
    shapes, seen = [], set()
    for slot in slots:
        while True:
            kind, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
            if (kind, color) not in seen:
                break
        seen.add((kind, color))
        shapes.append(Shape(kind, color, str(rng.choice(list(SIZES))), slot))
    return shapes


def draw(shapes: list[Shape], rng: np.random.Generator) -> Image.Image:
    background = rng.integers(195, 235)
    noise = rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    canvas = ImageDraw.Draw(image)
    for item in shapes:
        half = SIZES[item.size]
        x = SLOTS[item.slot] + int(rng.integers(-2, 3))
        y = 32 + int(rng.integers(-14 + half, 15 - half))
        box = (x - half, y - half, x + half, y + half)
        color = COLORS[item.color]
        if item.shape == "circle":
            canvas.ellipse(box, fill=color)
        elif item.shape == "square":
            canvas.rectangle(box, fill=color)
        else:
            canvas.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=color)
    return image


def caption_a(shapes: list[Shape]) -> str:
    """Pretraining style: count, then every object with its size, left to right."""
    noun = "shape" if len(shapes) == 1 else "shapes"
    return f"{COUNTS[len(shapes) - 1]} {noun}: " + " and ".join(indefinite(s.phrase) for s in shapes)


def caption_b(shapes: list[Shape]) -> str:
    """Downstream style: objects left to right, without count or sizes."""
    return " and ".join(indefinite(f"{s.color} {s.shape}") for s in shapes)


def questions(shapes: list[Shape], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question type, question, answer) for every type that this scene can answer."""
    out = []
    kinds = [s.shape for s in shapes]
    colors = [s.color for s in shapes]
    unique_kinds = [s for s in shapes if kinds.count(s.shape) == 1]
    unique_colors = [s for s in shapes if colors.count(s.color) == 1]
    if unique_kinds:
        s = unique_kinds[int(rng.integers(len(unique_kinds)))]
        out.append(("color", f"what color is the {s.shape}?", s.color))
    if unique_colors:
        s = unique_colors[int(rng.integers(len(unique_colors)))]
        # answered with the article, so that every decoder emits "an" in pretraining (style-B captions need it)
        out.append(("shape", f"what is the {s.color} object?", indefinite(f"{s.color} {s.shape}")))
    if rng.random() < 0.5:
        s = shapes[int(rng.integers(len(shapes)))]
        out.append(("exist", f"is there {indefinite(f'{s.color} {s.shape}')}?", "yes"))
    else:
        present = {(s.color, s.shape) for s in shapes}
        while True:
            color, kind = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            if (color, kind) not in present:
                break
        out.append(("exist", f"is there {indefinite(f'{color} {kind}')}?", "no"))
    out.append(("count", "how many shapes are there?", COUNTS[len(shapes) - 1]))
    s = shapes[int(rng.integers(len(shapes)))]
    out.append(("size", f"what size is the {s.color} {s.shape}?", s.size))
    if len(shapes) > 1:
        side, s = ("left", shapes[0]) if rng.random() < 0.5 else ("right", shapes[-1])
        out.append(("position", f"what color is the shape on the {side}?", s.color))
    return out


def verify_questions(shapes: list[Shape], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Yes/no checks of a count, a size and a side, each true half of the time (a side only with two or more
    shapes; "on the left" means leftmost)."""
    truth = rng.random(3) < 0.5
    count = len(shapes) if truth[0] else int(rng.choice([n for n in (1, 2, 3) if n != len(shapes)]))
    asked = "is there one shape?" if count == 1 else f"are there {COUNTS[count - 1]} shapes?"
    out = [("verify_count", asked, "yes" if count == len(shapes) else "no")]
    s = shapes[int(rng.integers(len(shapes)))]
    size = s.size if truth[1] else next(z for z in SIZES if z != s.size)
    out.append(("verify_size", f"is the {s.color} {s.shape} {size}?", "yes" if size == s.size else "no"))
    if len(shapes) > 1:
        side = "left" if rng.random() < 0.5 else "right"
        end = shapes[0] if side == "left" else shapes[-1]
        others = [x for x in shapes if x != end]
        s = end if truth[2] else others[int(rng.integers(len(others)))]
        out.append(("verify_side", f"is the {s.color} {s.shape} on the {side}?", "yes" if s == end else "no"))
    return out


def records_a(s: Shape, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Pretraining records: the attributes in a random order (so that copying them is by key, not by
    position), turned into a phrase ("describe:") or a name ("name:")."""
    fields = [f"size={s.size}", f"color={s.color}", f"shape={s.shape}"]
    order = " ".join(fields[i] for i in rng.permutation(3))
    return [(f"describe: {order} =>", indefinite(s.phrase)), (f"name: {order} =>", f"{s.color} {s.shape}")]


def record_b(s: Shape) -> tuple[str, str]:
    """The downstream format: a new cue and a sentence template the language model never produced."""
    return f"shape={s.shape} color={s.color} size={s.size} ->", f"the {s.shape} is {s.color} and {s.size}"


def default_root() -> Path:
    base = os.environ.get("MMPREFIX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmprefix")
    return Path(base) / VERSION


def build_world(root: str | os.PathLike | None = None, splits: dict[str, int] | None = None) -> Path:
    """Write the world under ``root`` (default: ``$MMPREFIX_CACHE/<VERSION>``, the cache defaulting to
    ``~/.cache/mmprefix``) unless it is already there; return the folder. Same version, same files, on every
    machine."""
    root = Path(root) if root is not None else default_root()
    splits = splits or SPLITS
    if (root / "complete.json").is_file() and json.loads((root / "complete.json").read_text()) == splits:
        return root
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict]] = {}
    for split, size in splits.items():
        rng = np.random.default_rng(SEEDS.get(split, len(split)))
        # records and checks draw from their own generators: the scenes stay those of earlier versions
        record_rng = np.random.default_rng(100 + SEEDS.get(split, len(split)))
        verify_rng = np.random.default_rng(200 + SEEDS.get(split, len(split)))
        (root / split).mkdir(exist_ok=True)
        for index in range(size):
            shapes = scene(rng)
            name = f"{split}/{index:05d}.png"
            draw(shapes, rng).save(root / name)
            image_id = f"{split}-{index:05d}"
            files.setdefault(f"captions_a_{split}", []).append({"image": name, "image_id": image_id, "captions": [caption_a(shapes)]})
            files.setdefault(f"captions_b_{split}", []).append({"image": name, "image_id": image_id, "captions": [caption_b(shapes)]})
            files.setdefault(f"classes_{split}", []).append({"image": name, "label": shapes[0].color})
            asked = [("pretrain" if kind in PRETRAIN_QUESTIONS else "downstream", kind, question, answer)
                     for kind, question, answer in questions(shapes, rng)]
            asked += [("verify", kind, question, answer) for kind, question, answer in verify_questions(shapes, verify_rng)]
            for number, (group, kind, question, answer) in enumerate(asked):
                files.setdefault(f"vqa_{group}_{split}", []).append({
                    "question_id": f"{image_id}-{number}", "image_id": image_id, "image": name,
                    "question": question, "answers": [answer] * 10, "question_type": kind,
                    "answer_type": "yes/no" if answer in ("yes", "no") else "number" if answer in COUNTS else "other",
                })
            for number, item in enumerate(shapes):
                for variant, (prompt, target) in enumerate(records_a(item, record_rng)):
                    files.setdefault(f"text_a_{split}", []).append(
                        {"id": f"{image_id}-{number}-{variant}", "prompt": prompt, "target": target})
                prompt, target = record_b(item)
                files.setdefault(f"text_b_{split}", []).append({"id": f"{image_id}-{number}", "prompt": prompt, "target": target})
    for name, rows in files.items():
        write_text(root / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    write_text(root / "complete.json", json.dumps(splits))
    return root
