"""Scores of a trained adaptation beyond its task, for the methods sweep (``benchmarks/sweep.py``, phases D and E).

    python benchmarks/checks.py forgetting --task vqa --config recipes/configs/vqa.yaml --run out/.../RUN --out X.json
    python benchmarks/checks.py newclass --config recipes/configs/classification.yaml --run RUN --new NEW.jsonl --out X.json

``forgetting``: the backbone's own pretraining checks (test split of the synthetic world), scored with the
adaptation that ``--run`` (a recipe's output folder) trained active, or without any (``--run none``): the yes/no
checks for VQA (BLIP and LLaVA), style-A captions' CIDEr for captioning, format-A records' BLEU-4 for text
generation, and style-A caption retrieval (image to text, R@1) for CLIP. ``newclass``: top-1 accuracy on the test
images of classes the run never saw (``--new``, an ``{image, label}`` JSONL), among those classes only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# benchmark task -> (recipe task, evaluation task, world file of the check, metric, samples)
CHECKS = {
    "vqa": ("vqa", "vqa", "vqa_verify_test", "vqa_accuracy", 600),
    "vqa_llava": ("vqa", "vqa", "vqa_verify_test", "vqa_accuracy", 300),
    "captioning": ("caption", "caption", "captions_a_test", "CIDEr", 400),
    "textgen": ("text", "text", "text_a_test", "Bleu_4", 600),
    "classification": ("classification", "retrieval", "captions_a_test", "i2t_R@1", 400),
}
SAVED = ("prefix", "memory", "prompt", "adapter", "lora", "model")  # what a recipe names its trained weights


def adapted(spec: str, task: str, run: str):
    """The backbone of ``spec`` with what ``run`` trained (``"none"``: as it is), the prefix to route and the processor."""
    from mmprefix.models import loading, methods
    from mmprefix.experiment import recipe

    model, processor = loading.load_model(spec, task)
    if run != "none":
        folder = next((Path(run) / name for name in SAVED if (Path(run) / name).is_dir()), None)
        if folder is None:
            raise SystemExit(f"{run} holds none of {SAVED}")
        model = methods.load_trained(model, folder)
    model, prefix = recipe.evaluated(model)
    return model.eval(), prefix, processor


def forgetting(args: argparse.Namespace, config) -> dict:
    from mmprefix import evaluation
    from mmprefix.data import read_samples
    from mmprefix.evaluation.contrastive import retrieve
    from mmprefix.models import loading

    recipe_task, task, source, metric, limit = CHECKS[args.task]
    model, prefix, processor = adapted(config.model, recipe_task, args.run)
    samples = read_samples(task if task != "retrieval" else "caption", loading.data_path(f"world:{source}"))[:limit]
    if task == "retrieval":
        scores = retrieve(model, processor, samples, prefix=prefix, batch_size=64)
    else:
        predictions, _ = evaluation.predict(task, model, processor, samples, prefix=prefix, batch_size=64,
                                            generation=config.eval.generation, progress=False)
        scores = evaluation.score(task, predictions, samples, meteor=False)
    return {"check": source, "metric": metric, "score": scores[metric], "samples": len(samples)}


def newclass(args: argparse.Namespace, config) -> dict:
    from mmprefix.data.classification import read_classification
    from mmprefix.evaluation.contrastive import classify

    model, prefix, processor = adapted(config.model, "classification", args.run)
    samples, _ = read_classification(args.new)
    classnames = sorted({label for _, label in samples})
    scores = classify(model, processor, samples, classnames, config.eval.templates, prefix=prefix, batch_size=64)
    return {"new_top1": scores["top1"], "classes": classnames, "samples": len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["forgetting", "newclass"])
    parser.add_argument("--task", choices=sorted(CHECKS), default="classification")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", required=True, help="a recipe's output folder, or none (the frozen backbone)")
    parser.add_argument("--new", help="newclass: the new classes' test images ({image, label} JSONL)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from mmprefix.experiment import settings

    recipe_task = CHECKS[args.task][0]
    config = settings.recipe_settings(["--config", str(args.config)], recipe_task, args.config)
    result = forgetting(args, config) if args.check == "forgetting" else newclass(args, config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "run": args.run}, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
