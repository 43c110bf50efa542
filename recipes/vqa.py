"""Visual question answering: prefix-tune a frozen VLM, compare with its zero-shot answers.

    python recipes/vqa.py                                    # embedded default: tiny BLIP, new question types
    python recipes/vqa.py --method lora                      # or prompt / full, for comparison
    python recipes/vqa.py --config recipes/configs/vqa_blip_vqav2.yaml       # Salesforce/blip-vqa-base, VQAv2
    accelerate launch recipes/vqa.py --config ...            # several processes or GPUs

Any config key can be overridden: ``train.learning_rate=3e-3 prefix.num_virtual_tokens=8``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mmprefix.data import formatting
from mmprefix.experiment import loading, methods, recipe
from mmprefix.training import TrainConfig, train

TASK = "vqa"
CONFIG = Path(__file__).parent / "configs" / "vqa.yaml"


def main(argv: list[str] | None = None) -> dict:
    config = recipe.parse_args(argv, CONFIG, __doc__)
    recipe.seed_everything(config["train"].get("seed", 0))
    out = recipe.fresh_start(config)
    main_process = recipe.is_main_process()
    evaluate = config["eval"]

    # 1. The frozen backbone and the data.
    model, processor = loading.load_model(config["model"], TASK, config.get("quantize"))
    data = recipe.load_splits(TASK, config["data"])
    print(f"{len(data['train'])} training questions, {len(data['test'])} test questions")

    # 2. What the frozen backbone answers before any tuning.
    results = {}
    if main_process:
        results["zero-shot"] = recipe.score_on_test(TASK, model, processor, data["test"], out, evaluate, "zero-shot")

    # 3. The method: a prefix (or a soft prompt, LoRA, full fine-tuning).
    model = methods.prepare(model, config["method"], recipe.method_options(config), processor)
    trainable, total = methods.trainable_parameters(model)
    print(f"{config['method']}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")

    # 4. Train on (image, question, answer) rows; score the validation questions as training goes.
    prompt = evaluate.get("generation", {}).get("prompt", formatting.VQA_PROMPT)  # BLIP-2's question template

    def collate(rows):
        rows = recipe.good_rows(rows)
        return formatting.vqa_batch(model, processor, [image for _, image in rows], [s.question for s, _ in rows],
                               [recipe.training_answer(s) for s, _ in rows], prompt=prompt)

    validate = recipe.validation(TASK, processor, data["val"], evaluate)

    started = time.perf_counter()
    dataset = recipe.SampleDataset(data["train"], config["data"].get("on_bad_image", "error"))
    train(model, dataset, collate, TrainConfig(output_dir=str(out), **config["train"]), evaluate=validate)
    seconds = time.perf_counter() - started

    # 5. The tuned model on the test questions, next to the zero-shot one.
    if not main_process:
        return {}
    tuned = recipe.tuned_model(model, config, TASK)  # an FSDP-sharded base is loaded again whole
    results["tuned"] = recipe.score_on_test(TASK, tuned, processor, data["test"], out, evaluate, "tuned")
    return recipe.report(out, TASK, data["test"], results, trainable, total, seconds)


if __name__ == "__main__":
    sys.exit(recipe.run(main, sys.argv[1:]))
