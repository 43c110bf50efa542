"""Instruction following: one prefix for several tasks asked in varied words, against one prefix per task.

examples:
  python recipes/instruct.py                                # embedded LM: count, caption, answer, describe
  python recipes/instruct.py train.max_steps=1200 prefix.num_virtual_tokens=32   # any setting, by its key
  python recipes/instruct.py data.test.limit=30             # fewer test scenes: a quicker look
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from mmprefix.experiment import settings

TASK = "text"
CONFIG = Path(__file__).parent / "configs" / "instruct.yaml"


def main(argv: list[str] | None = None) -> dict:
    config = settings.prefix_recipe(settings.recipe_settings(argv, TASK, CONFIG, __doc__), "recipes/instruct.py")
    from mmprefix.data import formatting  # torch loads from here on
    from mmprefix.experiment import instructions, recipe
    from mmprefix.models import loading, methods
    from mmprefix.training import train

    recipe.seed_everything(config.train.seed)
    out = recipe.fresh_start(config)
    evaluate, seed = config.eval, config.train.seed

    # 1. The frozen model, and the world's tasks asked in varied words: training rows, three test sets.
    model, tokenizer = loading.load_model(config.model, TASK, config.quantize)
    rows = instructions.load_rows(config.data.train.path, seed, config.data.train.limit)
    test_rows = instructions.load_rows(config.data.test.path, seed + 1, config.data.test.limit)
    asked = instructions.phrased(rows, "train", seed)
    tests = {kind: instructions.phrased(test_rows, kind, seed + 2) for kind in instructions.SETS}
    print(f"{len(asked)} training instructions; {len(test_rows)} test questions, each asked {len(tests)} ways")

    # 2. One instruction prefix: every task, every trained phrasing. The frozen model is the prefix disabled.
    model = methods.prepare(model, "prefix", config.method_options(), tokenizer)
    trainable, total = methods.trainable_parameters(model)
    results = {"frozen": instructions.score(model, tokenizer, tests, lambda task: None, evaluate.batch_size,
                                            evaluate.generation)}

    def collate(batch):
        inputs = formatting.prompt_and_target(tokenizer, [s.prompt for _, s in batch], [s.target for _, s in batch])
        return {**inputs, "prefix": [task for task, _ in batch]}  # the task: which per-task prefix a row trains

    one_prefix = dataclasses.replace(config.train_config(), output_dir=str(out / "instruction"))
    started = time.perf_counter()
    train(model, asked, collate, one_prefix, loss_fn=lambda m, b: instructions.row_mean_loss(m, b, "default"),
          settings=config.identity())
    seconds = {"instruction prefix": time.perf_counter() - started}
    results["instruction prefix"] = instructions.score(model, tokenizer, tests, lambda task: "default",
                                                       evaluate.batch_size, evaluate.generation)

    # 3. A prefix per task on the same rows and steps: each row trains its own task's prefix (one routed run).
    for task in instructions.TASKS:
        model.add_prefix(task, config.method_options(), processor=tokenizer)
    model.prefixes["default"].requires_grad_(False)
    per_task = dataclasses.replace(config.train_config(), output_dir=str(out / "per-task"))

    def save_each(trained, folder):
        for task in instructions.TASKS:
            trained.save_prefix(Path(folder) / task, task)

    started = time.perf_counter()
    train(model, asked, collate, per_task, loss_fn=instructions.row_mean_loss, save=save_each,
          settings=config.identity())
    seconds["per-task prefixes"] = time.perf_counter() - started
    results["per-task prefixes"] = instructions.score(model, tokenizer, tests, lambda task: task,
                                                      evaluate.batch_size, evaluate.generation)

    # 4. The comparison.
    means = {name: {kind: sets[kind]["mean"] for kind in sets} for name, sets in results.items()}
    summary = {"zero_shot": means["frozen"], "tuned": means["instruction prefix"],
               "per_task_prefixes": means["per-task prefixes"], "results": results, "trainable_parameters": trainable,
               "total_parameters": total, "trainable_percent": 100 * trainable / total,
               "training_seconds": seconds["instruction prefix"], "per_task_training_seconds": seconds["per-task prefixes"]}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ntrainable parameters per prefix: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)\n")
    print(instructions.report(results))
    held_out = results["instruction prefix"]["held-out phrasings"]["mean"]
    specialists = results["per-task prefixes"]["seen"]["mean"]
    print(f"\nheld-out phrasings: the instruction prefix {held_out:.1f}, the per-task prefixes on the phrasings they "
          f"trained on {specialists:.1f} ({held_out - specialists:+.1f} points; goal: within 5)")
    print(f"outputs in {out}: instruction/prefix/, per-task/prefix/<task>/, metrics.json")
    return summary


if __name__ == "__main__":
    sys.exit(settings.run(main, sys.argv[1:]))
