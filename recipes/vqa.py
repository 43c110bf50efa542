"""Visual question answering: prefix-tune a frozen VLM, compare with its zero-shot answers.

examples:
  python recipes/vqa.py                                    # embedded default: tiny BLIP, new question types
  python recipes/vqa.py --method lora                      # or prompt / memory / adapter / full (out/vqa/lora)
  python recipes/vqa.py train.learning_rate=3e-3 prefix.num_virtual_tokens=8   # any setting, by its key
  python recipes/vqa.py prefix.gate=head                   # the gated prefix (LLaMA-Adapter)
  python recipes/vqa.py --config recipes/configs/vqa_blip_vqav2.yaml           # Salesforce/blip-vqa-base, VQAv2
  accelerate launch recipes/vqa.py --config ...            # several processes or GPUs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mmprefix.experiment import settings

TASK = "vqa"
CONFIG = Path(__file__).parent / "configs" / "vqa.yaml"


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

    # 1. The frozen backbone and the data.
    model, processor = loading.load_model(config.model, TASK, config.quantize)
    data = recipe.load_splits(TASK, config.data)
    print(f"{len(data['train'])} training questions, {len(data['test'])} test questions")

    # 2. What the frozen backbone answers before any tuning.
    results = {}
    if main_process:
        results["zero-shot"] = recipe.score_on_test(TASK, model, processor, data["test"], out, evaluate, "zero-shot")

    # 3. The method: a prefix (or a soft prompt, LoRA, full fine-tuning).
    model = methods.prepare(model, config.method, config.method_options(), processor)
    trainable, total = methods.trainable_parameters(model)
    print(f"{config.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")

    # 4. Train on (image, question, answer) rows; score the validation questions as training goes.
    prompt = evaluate.generation.get("prompt")  # None: the family's question template

    def collate(rows):
        return formatting.vqa_batch(model, processor, [image for _, image in rows], [s.question for s, _ in rows],
                                    [recipe.training_answer(s) for s, _ in rows], prompt=prompt)

    validate = recipe.validation(TASK, processor, data["val"], evaluate)

    started = time.perf_counter()
    dataset = recipe.SampleDataset(data["train"], config.data.on_bad_image)
    trained = train(model, dataset, collate, config.train_config(), evaluate=validate, settings=config.identity())
    seconds = time.perf_counter() - started

    # 5. The tuned model on the test questions, next to the zero-shot one.
    if not main_process:
        return {}
    tuned = recipe.tuned_model(model, config, TASK, trained["saved"])  # an FSDP-sharded base is loaded again whole
    results["tuned"] = recipe.score_on_test(TASK, tuned, processor, data["test"], out, evaluate, "tuned")
    return recipe.report(out, TASK, config, samples=data["test"], results=results, trained=trained, dataset=dataset,
                         trainable=trainable, total=total, seconds=seconds)


if __name__ == "__main__":
    sys.exit(settings.run(main, sys.argv[1:]))
