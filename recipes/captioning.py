"""Image captioning: prefix-tune a frozen VLM to a caption style, compare with its zero-shot captions.

examples:
  python recipes/captioning.py                              # embedded default: tiny BLIP learns caption style B
  python recipes/captioning.py --method full                # or prompt / memory / lora / adapter (out/captioning/full)
  python recipes/captioning.py train.learning_rate=3e-3 prefix.num_virtual_tokens=8   # any setting, by its key
  python recipes/captioning.py --config recipes/configs/captioning_blip_coco.yaml   # BLIP base, COCO Karpathy
  accelerate launch recipes/captioning.py --config ...      # several processes or GPUs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mmprefix.experiment import settings

TASK = "caption"
CONFIG = Path(__file__).parent / "configs" / "captioning.yaml"


def main(argv: list[str] | None = None) -> dict:
    config = settings.recipe_settings(argv, TASK, CONFIG, __doc__)  # --help and bad settings end here, at once
    from mmprefix.data import formatting  # torch loads from here on
    from mmprefix.models import loading, methods
    from mmprefix.experiment import recipe
    from mmprefix.training import train

    recipe.seed_everything(config.train.seed)
    out = recipe.fresh_start(config)
    main_process = recipe.is_main_process()
    evaluate = config.eval

    # 1. The frozen backbone and the data: images with reference captions.
    model, processor = loading.load_model(config.model, TASK, config.quantize)
    data = recipe.load_splits(TASK, config.data)
    print(f"{len(data['train'])} training images, {len(data['test'])} test images")

    # 2. The frozen backbone's own captions.
    results = {}
    if main_process:
        results["zero-shot"] = recipe.score_on_test(TASK, model, processor, data["test"], out, evaluate,
                                                    "zero-shot")

    # 3. The method: a prefix (or a soft prompt, LoRA, full fine-tuning).
    model = methods.prepare(model, config.method, config.method_options(), processor)
    trainable, total = methods.trainable_parameters(model)
    print(f"{config.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")

    # 4. Train on (image, caption) rows, one reference caption per image drawn; CIDEr on validation images.
    def collate(rows):
        captions = [recipe.training_caption(s) for s, _ in rows]
        return formatting.caption_batch(model, processor, [image for _, image in rows], captions)

    validate = recipe.validation(TASK, processor, data["val"], evaluate)

    started = time.perf_counter()
    dataset = recipe.SampleDataset(data["train"], config.data.on_bad_image)
    trained = train(model, dataset, collate, config.train_config(), evaluate=validate, settings=config.identity())
    seconds = time.perf_counter() - started

    # 5. The tuned model's captions of the test images, next to the zero-shot ones.
    if not main_process:
        return {}
    tuned = recipe.tuned_model(model, config, TASK, trained["saved"])  # an FSDP-sharded base is loaded again whole
    results["tuned"] = recipe.score_on_test(TASK, tuned, processor, data["test"], out, evaluate, "tuned")
    return recipe.report(out, TASK, config, samples=data["test"], results=results, trained=trained, dataset=dataset,
                         trainable=trainable, total=total, seconds=seconds)


if __name__ == "__main__":
    sys.exit(settings.run(main, sys.argv[1:]))
