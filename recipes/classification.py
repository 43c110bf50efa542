"""Image classification: prefix-tune a frozen CLIP-like model (CoOp's objective), compare with zero-shot.

    python recipes/classification.py                          # embedded default: tiny CLIP, a new kind of label
    python recipes/classification.py --method prompt          # or lora / full, for comparison
    python recipes/classification.py --config recipes/configs/classification_openclip_imagenet.yaml
    accelerate launch recipes/classification.py --config ...  # several processes or GPUs

Each class is named by prompts (``eval.templates``); an image's class logits are the model's own scaled
image-text similarities, so the prefix (in both towers) is trained with cross-entropy over the classes.
Any config key can be overridden: ``train.learning_rate=3e-3 prefix.num_virtual_tokens=8``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mmprefix.data import formatting
from mmprefix.experiment import loading, methods, recipe
from mmprefix.evaluation.contrastive import classification_loss
from mmprefix.training import TrainConfig, train

TASK = "classification"
CONFIG = Path(__file__).parent / "configs" / "classification.yaml"


def main(argv: list[str] | None = None) -> dict:
    config = recipe.parse_args(argv, CONFIG, __doc__)
    recipe.seed_everything(config["train"].get("seed", 0))
    out = recipe.fresh_start(config)
    main_process = recipe.is_main_process()
    evaluate = config["eval"]

    # 1. The frozen backbone and the (image, label) data; the class names are what the prompts say.
    model, processor = loading.load_model(config["model"], TASK, config.get("quantize"))
    data = recipe.load_splits(TASK, config["data"])
    data, classnames = recipe.name_classes(data, config["data"].get("class_names"))
    print(f"{len(data['train'])} training images, {len(data['test'])} test images, {len(classnames)} classes")

    # 2. The frozen backbone's zero-shot accuracy.
    results = {}
    if main_process:
        results["zero-shot"] = recipe.score_on_test(TASK, model, processor, data["test"], out, evaluate,
                                                    "zero-shot", classnames=classnames)

    # 3. The method: a prefix (or a soft prompt, LoRA, full fine-tuning).
    model = methods.prepare(model, config["method"], recipe.method_options(config), processor)
    trainable, total = methods.trainable_parameters(model)
    print(f"{config['method']}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")

    # 4. Train on (image, label) rows against every class prompt; top-1 accuracy on validation images.
    index = {name: i for i, name in enumerate(classnames)}

    def collate(rows):
        rows = recipe.good_rows(rows)
        return formatting.classification_batch(model, processor, [image for _, image in rows],
                                               [index[s[1]] for s, _ in rows], classnames, evaluate["templates"])

    started = time.perf_counter()
    dataset = recipe.SampleDataset(data["train"], config["data"].get("on_bad_image", "error"))
    validate = recipe.validation(TASK, processor, data["val"], evaluate, classnames=classnames)
    train(model, dataset, collate, TrainConfig(output_dir=str(out), **config["train"]), evaluate=validate,
          loss_fn=classification_loss)
    seconds = time.perf_counter() - started

    # 5. The tuned model on the test images, next to the zero-shot one.
    if not main_process:
        return {}
    tuned = recipe.tuned_model(model, config, TASK)  # an FSDP-sharded base is loaded again whole
    results["tuned"] = recipe.score_on_test(TASK, tuned, processor, data["test"], out, evaluate, "tuned",
                                            classnames=classnames)
    return recipe.report(out, TASK, data["test"], results, trainable, total, seconds)


if __name__ == "__main__":
    sys.exit(recipe.run(main, sys.argv[1:]))
