"""Image classification: prefix-tune a frozen CLIP-like model (CoOp's objective), compare with zero-shot.

Each class is named by prompts (eval.templates); an image's class logits are the model's own scaled image-text
similarities, so the prefix (in both towers) is trained with cross-entropy over the classes.

examples:
  python recipes/classification.py                          # embedded default: tiny CLIP, a new kind of label
  python recipes/classification.py --method prompt          # or memory / lora / adapter / full (out/classification/prompt)
  python recipes/classification.py train.learning_rate=3e-3 prefix.num_virtual_tokens=8   # any setting
  python recipes/classification.py prefix.condition=image   # an image-conditioned prefix (CoCoOp in every layer)
  python recipes/classification.py --config recipes/configs/classification_openclip_imagenet.yaml
  accelerate launch recipes/classification.py --config ...  # several processes or GPUs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mmprefix.experiment import settings

TASK = "classification"
CONFIG = Path(__file__).parent / "configs" / "classification.yaml"


def main(argv: list[str] | None = None) -> dict:
    config = settings.recipe_settings(argv, TASK, CONFIG, __doc__)  # --help and bad settings end here, at once
    from mmprefix.data import formatting  # torch loads from here on
    from mmprefix.evaluation.contrastive import classification_loss
    from mmprefix.models import loading, methods
    from mmprefix.experiment import recipe
    from mmprefix.training import train

    recipe.seed_everything(config.train.seed)
    out = recipe.fresh_start(config)
    main_process = recipe.is_main_process()
    evaluate = config.eval

    # 1. The frozen backbone and the (image, label) data; the class names are what the prompts say.
    model, processor = loading.load_model(config.model, TASK, config.quantize)
    data = recipe.load_splits(TASK, config.data)
    data, classnames = recipe.name_classes(data, config.data.class_names)
    print(f"{len(data['train'])} training images, {len(data['test'])} test images, {len(classnames)} classes")

    # 2. The frozen backbone's zero-shot accuracy.
    results = {}
    if main_process:
        results["zero-shot"] = recipe.score_on_test(TASK, model, processor, data["test"], out, evaluate,
                                                    "zero-shot", classnames=classnames)

    # 3. The method: a prefix (or a soft prompt, LoRA, full fine-tuning).
    model = methods.prepare(model, config.method, config.method_options(), processor)
    trainable, total = methods.trainable_parameters(model)
    print(f"{config.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")

    # 4. Train on (image, label) rows against every class prompt; top-1 accuracy on validation images.
    index = {name: i for i, name in enumerate(classnames)}

    def collate(rows):
        return formatting.classification_batch(model, processor, [image for _, image in rows],
                                               [index[s[1]] for s, _ in rows], classnames, evaluate.templates)

    started = time.perf_counter()
    dataset = recipe.SampleDataset(data["train"], config.data.on_bad_image)
    validate = recipe.validation(TASK, processor, data["val"], evaluate, classnames=classnames)
    trained = train(model, dataset, collate, config.train_config(), evaluate=validate, loss_fn=classification_loss,
                    settings=config.identity())
    seconds = time.perf_counter() - started

    # 5. The tuned model on the test images, next to the zero-shot one.
    if not main_process:
        return {}
    tuned = recipe.tuned_model(model, config, TASK, trained["saved"])  # an FSDP-sharded base is loaded again whole
    results["tuned"] = recipe.score_on_test(TASK, tuned, processor, data["test"], out, evaluate, "tuned",
                                            classnames=classnames)
    return recipe.report(out, TASK, config, samples=data["test"], results=results, trained=trained, dataset=dataset,
                         trainable=trainable, total=total, seconds=seconds)


if __name__ == "__main__":
    sys.exit(settings.run(main, sys.argv[1:]))
