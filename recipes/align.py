"""Preference alignment: DPO of a prefix with TRL's DPOTrainer, the frozen model itself as the reference.

examples:
  python recipes/align.py                                  # embedded LM: right records preferred to wrong ones
  python recipes/align.py train.max_steps=400 train.learning_rate=3e-3   # any setting, by its key
  python recipes/align.py --resume                         # continue from the last checkpoint in out/align
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmprefix.experiment import settings

TASK = "text"
CONFIG = Path(__file__).parent / "configs" / "align.yaml"


def main(argv: list[str] | None = None) -> dict:
    config = settings.prefix_recipe(settings.recipe_settings(argv, TASK, CONFIG, __doc__), "recipes/align.py")
    import torch  # torch, TRL and the model load from here on
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from mmprefix import evaluation
    from mmprefix.core import saving
    from mmprefix.experiment import preferences, recipe
    from mmprefix.models import loading, methods

    recipe.seed_everything(config.train.seed)
    out = recipe.fresh_start(config)
    train_settings, evaluate = config.train, config.eval

    # 1. The frozen language model, and preference pairs from the world's records: right against wrong.
    model, tokenizer = loading.load_model(config.model, TASK, config.quantize)
    data = recipe.load_splits(TASK, config.data)
    pairs = {split: preferences.record_pairs(samples, train_settings.seed + i) for i, (split, samples) in
             enumerate(data.items())}
    print(f"{len(data['train'])} training pairs, {len(data['test'])} held-out pairs")

    # 2. The prefix; TRL's DPOTrainer gets no ref_model: the reference is this model with its prefix disabled.
    model = methods.prepare(model, "prefix", config.method_options(), tokenizer)
    trainable, total = methods.trainable_parameters(model)
    base = saving.tensors_digest(model.base_model.state_dict())
    args = DPOConfig(
        str(out), max_steps=train_settings.max_steps, per_device_train_batch_size=train_settings.batch_size,
        gradient_accumulation_steps=train_settings.gradient_accumulation_steps,
        learning_rate=train_settings.learning_rate, weight_decay=train_settings.weight_decay,
        warmup_steps=train_settings.warmup_steps, max_grad_norm=train_settings.max_grad_norm or 0.0,
        seed=train_settings.seed, logging_steps=train_settings.log_every,
        save_strategy="steps" if train_settings.save_every else "no", save_steps=train_settings.save_every or 500,
        save_total_limit=train_settings.keep_checkpoints, bf16=train_settings.mixed_precision == "bf16",
        fp16=train_settings.mixed_precision == "fp16", activation_checkpointing=train_settings.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(), report_to=train_settings.trackers or "none",
        dataloader_pin_memory=torch.cuda.is_available())

    def measure() -> dict:
        """Preference accuracy and reward margin on the held-out pairs, and the task: the model's own sentences."""
        judged = preferences.judge(model, tokenizer, pairs["test"], args.beta)
        written, _ = evaluation.predict(TASK, model, tokenizer, data["test"], batch_size=evaluate.batch_size,
                                        generation=evaluate.generation, progress=False)
        right = [preferences.attributes_right(written[s.id], s.prompt) for s in data["test"]]
        return {**judged, "task_exact_match": evaluation.score(TASK, written, data["test"])["exact_match"],
                "task_attributes_right": round(100 * sum(right) / len(right), 2)}

    before = measure()

    # 3. DPO: only the prefix trains; checkpoints and the final save hold the prefix folder alone.
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(pairs["train"]),
                         processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=True if train_settings.resume else None)
    trainer.save_model(str(out / "prefix"))
    after = measure()

    # 4. Before and after, and the base weights.
    unchanged = saving.tensors_digest(model.base_model.state_dict()) == base
    summary = {"zero_shot": before, "tuned": after, "base_weights_unchanged": unchanged, "beta": args.beta,
               "trainable_parameters": trainable, "total_parameters": total, "trainable_percent": 100 * trainable / total,
               "training_seconds": trainer.state.log_history[-1].get("train_runtime")}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ntrainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%); DPO beta {args.beta}")
    for key, what in (("preference_accuracy", "preference accuracy on held-out pairs (%)"),
                      ("reward_margin", "reward margin (mean, held-out pairs)"),
                      ("prefers_chosen", "the model's own choice of the right sentence (%)"),
                      ("task_exact_match", "task: its own sentences, exact match (%)"),
                      ("task_attributes_right", "task: its own sentences naming the record's shape, colour and size (%)")):
        print(f"{what}: {before[key]:.{4 if key == 'reward_margin' else 2}f} -> {after[key]:.{4 if key == 'reward_margin' else 2}f}")
    print(f"base weights unchanged: {'yes' if unchanged else 'NO'} (checksum of every base tensor, before and after)")
    print(f"outputs in {out}: prefix/ (the trained prefix), checkpoint-N/, metrics.json")
    return summary


if __name__ == "__main__":
    sys.exit(settings.run(main, sys.argv[1:]))
