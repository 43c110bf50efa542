"""Text generation: prefix-tune a frozen causal LM to a new output format, compare with zero-shot.

examples:
  python recipes/textgen.py                                 # embedded default: tiny Llama learns record format B
  python recipes/textgen.py --method lora                   # or prompt / memory / adapter / full (out/textgen/lora)
  python recipes/textgen.py train.learning_rate=3e-3 prefix.num_virtual_tokens=8   # any setting, by its key
  python recipes/textgen.py --config recipes/configs/textgen_llama.yaml   # a Llama checkpoint on a JSONL task
  accelerate launch recipes/textgen.py --config ...         # several processes or GPUs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mmprefix.experiment import settings

TASK = "text"
CONFIG = Path(__file__).parent / "configs" / "textgen.yaml"


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

    # 1. The frozen language model, its tokenizer and the (prompt, target) data.
    model, tokenizer = loading.load_model(config.model, TASK, config.quantize)
    data = recipe.load_splits(TASK, config.data)
    print(f"{len(data['train'])} training pairs, {len(data['test'])} test prompts")

    # 2. What the frozen model writes after each prompt.
    results = {}
    if main_process:
        results["zero-shot"] = recipe.score_on_test(TASK, model, tokenizer, data["test"], out, evaluate, "zero-shot")

    # 3. The method: a prefix (or a soft prompt, LoRA, full fine-tuning).
    model = methods.prepare(model, config.method, config.method_options(), tokenizer)
    trainable, total = methods.trainable_parameters(model)
    print(f"{config.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")

    # 4. Train on prompt + target, the loss on the target only; BLEU-4 on validation prompts.
    def collate(rows):
        return formatting.prompt_and_target(tokenizer, [s.prompt for s, _ in rows], [s.target for s, _ in rows])

    validate = recipe.validation(TASK, tokenizer, data["val"], evaluate)

    started = time.perf_counter()
    dataset = recipe.SampleDataset(data["train"])
    trained = train(model, dataset, collate, config.train_config(), evaluate=validate, settings=config.identity())
    seconds = time.perf_counter() - started

    # 5. The tuned model on the test prompts, next to the zero-shot one.
    if not main_process:
        return {}
    tuned = recipe.tuned_model(model, config, TASK, trained["saved"])  # an FSDP-sharded base is loaded again whole
    results["tuned"] = recipe.score_on_test(TASK, tuned, tokenizer, data["test"], out, evaluate, "tuned")
    return recipe.report(out, TASK, config, samples=data["test"], results=results, trained=trained, dataset=dataset,
                         trainable=trainable, total=total, seconds=seconds)


if __name__ == "__main__":
    sys.exit(settings.run(main, sys.argv[1:]))
