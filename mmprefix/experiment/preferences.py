"""Preference pairs from the synthetic world, and what DPO is judged by (``recipes/align.py``).

A pair is a record in the world's downstream format (``"shape=circle color=red size=small ->"``), the correct
sentence as the chosen completion (``" the circle is red and small"``) and, as the rejected one, the same sentence
with one attribute (shape, colour or size, drawn at random) given another value of its kind: as fluent, and wrong.

Pairs are judged by DPO's implicit reward ``r(y) = beta * (log p_policy(y | x) - log p_reference(y | x))``, the
reference being the model with its prefix disabled (what DPOTrainer uses for a prefix model):

* preference accuracy: the share of pairs whose chosen completion gets the higher reward, a tie counting half, so
  that a policy equal to its reference scores 50% (chance);
* reward margin: the mean of ``r(chosen) - r(rejected)``;
* the policy's own choice: the share of pairs whose chosen completion is the more likely one.

The task itself is scored on the model's own greedy sentences: exact match with the downstream format, and
`attributes_right`, whatever the format (the frozen model writes the records it knows: "a small red circle").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from ..data import synthetic
from ..data.records import TextSample

ATTRIBUTES = {"shape": list(synthetic.SHAPES), "color": list(synthetic.COLORS), "size": list(synthetic.SIZES)}


def record_pairs(samples: Sequence[TextSample], seed: int) -> dict[str, list[str]]:
    """``{"prompt", "chosen", "rejected"}`` columns (TRL's preference format) from format-B record samples."""
    rng = random.Random(seed)
    pairs: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for sample in samples:
        fields = record_fields(sample.prompt)
        changed = rng.choice(sorted(ATTRIBUTES))
        wrong = {**fields, changed: rng.choice([v for v in ATTRIBUTES[changed] if v != fields[changed]])}
        pairs["prompt"].append(sample.prompt)
        pairs["chosen"].append(f" {sample.target}")
        pairs["rejected"].append(f" {synthetic.record_b(synthetic.Shape(wrong['shape'], wrong['color'], wrong['size'], 0))[1]}")
    return pairs


def record_fields(prompt: str) -> dict[str, str]:
    """``{"shape": ..., "color": ..., "size": ...}`` of a record prompt in either format."""
    return dict(item.split("=") for item in prompt.split() if "=" in item and not item.startswith("="))


def attributes_right(text: str, prompt: str) -> bool:
    """Whether ``text`` names the record's shape, colour and size, and no other value of them."""
    words = set(text.split())
    named = {value for values in ATTRIBUTES.values() for value in values} & words
    return named == set(record_fields(prompt).values())


def completion_logps(model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str],
                     batch_size: int = 64) -> torch.Tensor:
    """``log p(completion + end of text | prompt)`` of each row, tokenized as TRL tokenizes preference pairs."""
    scores = []
    for start in range(0, len(prompts), batch_size):
        ids, scored = [], []
        for prompt, completion in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            head = tokenizer(prompt)["input_ids"]
            full = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
            ids.append(full)
            scored.append([False] * len(head) + [True] * (len(full) - len(head)))
        width = max(len(row) for row in ids)
        inputs = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        targets = torch.tensor([row + [False] * (width - len(row)) for row in scored])[:, 1:]
        with torch.no_grad():
            logits = model(input_ids=inputs, attention_mask=mask).logits[:, :-1].float()
        token_logps = logits.log_softmax(-1).gather(-1, inputs[:, 1:, None])[..., 0]
        scores.append((token_logps * targets).sum(1))
    return torch.cat(scores)


def judge(model: Any, tokenizer: Any, pairs: dict[str, list[str]], beta: float) -> dict[str, float]:
    """Preference accuracy (%), reward margin and the policy's own choice (%) on ``pairs``; ``model`` is a
    `PrefixModel`, its reference the same model with the prefix disabled."""
    prompts = pairs["prompt"]
    policy = [completion_logps(model, tokenizer, prompts, pairs[side]) for side in ("chosen", "rejected")]
    with model.disable_prefix():
        reference = [completion_logps(model, tokenizer, prompts, pairs[side]) for side in ("chosen", "rejected")]
    chosen, rejected = (beta * (p - r) for p, r in zip(policy, reference))
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {"preference_accuracy": round(100 * wins.mean().item(), 2),
            "reward_margin": round((chosen - rejected).mean().item(), 4),
            "prefers_chosen": round(100 * (policy[0] > policy[1]).float().mean().item(), 2)}
