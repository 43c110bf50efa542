"""Parameter-efficient methods side by side at serving time: prefix, memory prefix, gated prefix, soft prompt,
LoRA (unmerged and merged) and bottleneck adapters on one model.

    python benchmarks/comparison.py [--model gpt2|blip] [--repeats 20] [--tiny]

For each method: trainable parameters; forward and greedy-generation latency against the untouched model on the
same batch (medians of calls interleaved with the base's, with a 95% bootstrap interval: overhead.py's timing);
whether one batch can mix adaptations, and if so the throughput of a batch whose rows use 4 different ones
against the same batch with one (forward); whether it merges into the weights (no cost at inference).
``--tiny`` runs the same on tiny random models in seconds (a check that the script works, not a measurement).
Timings need a quiet machine: on a shared one background load moves a single call by ~10%.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import transformers as tf
from overhead import interleaved, ratio_interval

from mmprefix import PrefixConfig, PrefixModel
from mmprefix.models import adapters
from mmprefix.models.methods import prepare

# method -> (how it is built, whether rows of one batch can use different ones, whether it merges into the weights)
METHODS = {
    "prefix": ("prefix", True, False),
    "memory prefix": ("memory", True, False),
    "gated prefix": ("gated", True, False),
    "soft prompt": ("prompt", True, False),
    "LoRA": ("lora", True, True),  # PEFT's mixed-adapter batches (adapter_names=); merging removes its cost
    "LoRA merged": ("lora-merged", False, True),
    "adapters": ("adapter", False, False),
}
MIXED = 4  # adaptations in the mixed batch


def build(name: str, tiny: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100) if tiny else tf.GPT2Config()
        return tf.GPT2LMHeadModel(config).eval()
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4) if tiny else {"image_size": 384}
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                bos_token_id=3, eos_token_id=2, sep_token_id=2, pad_token_id=0) if tiny else {}
    return tf.BlipForQuestionAnswering(tf.BlipConfig(vision_config={**vision, "initializer_range": 0.02},
                                                     text_config=text)).eval()


def batch_of(name: str, tiny: bool, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = 100 if tiny else 30000
    if name == "gpt2":
        ids = torch.randint(4, vocab, (size, 16 if tiny else 64), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pixels = 32 if tiny else 384
    return {"input_ids": torch.randint(4, vocab, (size, 12), generator=g),
            "pixel_values": torch.randn(size, 3, pixels, pixels, generator=g)}


def adapted(base: torch.nn.Module, kind: str, budget: int) -> tuple[torch.nn.Module, list | None, int]:
    """The adapted model, the names a mixed batch routes (None: it cannot mix) and one adaptation's trainable
    parameters."""
    model = copy.deepcopy(base)
    if kind in ("prefix", "memory", "gated", "prompt"):
        config = dict(num_virtual_tokens=budget, init_std=1.0, method="prefix" if kind == "gated" else kind,
                      gate="head" if kind == "gated" else None)
        pm = PrefixModel(model)
        names = [f"p{i}" for i in range(MIXED)]
        for name in names:
            pm.add_prefix(name, PrefixConfig(**config))
        return pm.eval(), names, sum(p.numel() for p in pm.prefixes["p0"].parameters())
    if kind.startswith("lora"):
        peft = prepare(model, "lora", {"r": budget, "lora_alpha": 2 * budget, "init_lora_weights": False})
        trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
        if kind == "lora-merged":
            return peft.merge_and_unload().eval(), None, trainable
        names = ["default"] + [f"l{i}" for i in range(1, MIXED)]
        for name in names[1:]:
            peft.add_adapter(name, peft.peft_config["default"])
        return peft.eval(), names, trainable
    model = adapters.add_adapters(model, width=budget)
    return model.eval(), None, sum(p.numel() for p in model.parameters() if p.requires_grad)


def call(model, batch: dict, generate: bool, new_tokens: int, route=None):
    extra = {}
    if route is not None:
        extra = {"prefix": route} if isinstance(model, PrefixModel) else {"adapter_names": route}
    if generate:
        if "pixel_values" in batch:
            batch = {"pixel_values": batch["pixel_values"], "input_ids": batch["input_ids"]}
        else:
            extra["pad_token_id"] = 0
        target = model.get_base_model() if hasattr(model, "get_base_model") and route is None else model
        return lambda: target.generate(**batch, **extra, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False)
    if "pixel_values" in batch:  # BLIP-VQA's forward runs its answer decoder on decoder_input_ids
        batch = {**batch, "decoder_input_ids": batch["input_ids"][:, :4]}
    return lambda: model(**batch, **extra)


def ratio(times: dict[str, list[float]], name: str) -> str:
    low, high = ratio_interval(times["base"], times[name])
    return f"{statistics.median(times[name]) / statistics.median(times['base']):.3f} ({low:.3f}-{high:.3f})"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt2", "blip"], default="gpt2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=10, help="prefix, memory and prompt slots")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--width", type=int, default=16, help="adapter width")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: checks the script, measures nothing")
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()[0]
    base = build(args.model, args.tiny)
    batch = batch_of(args.model, args.tiny, args.batch_size)
    rows = []
    for label, (kind, mixes, merges) in METHODS.items():
        budget = {"lora": args.rank, "lora-merged": args.rank, "adapter": args.width}.get(kind, args.tokens)
        model, names, trainable = adapted(base, kind, budget)
        one = [names[0]] * args.batch_size if names else None
        fns = {"base": call(base, batch, False, 0), label: call(model, batch, False, 0, one)}
        forward = interleaved(fns, args.repeats, args.warmup, argparse.Namespace(device="cpu"))
        gens = {"base": call(base, batch, True, args.new_tokens), label: call(model, batch, True, args.new_tokens, one)}
        generate = interleaved(gens, max(2, args.repeats // 4), 1, argparse.Namespace(device="cpu"))
        mixed = "no"
        if mixes and names:
            route = [names[i % len(names)] for i in range(args.batch_size)]
            pair = {"one": call(model, batch, False, 0, one), "mixed": call(model, batch, False, 0, route)}
            t = interleaved(pair, args.repeats, args.warmup, argparse.Namespace(device="cpu"))
            mixed = f"yes: {statistics.median(t['one']) / statistics.median(t['mixed']):.3f}x the throughput of one"
        rows.append(f"| {label} | {trainable:,} | {ratio(forward, label)} | {ratio(generate, label)} | {mixed} | "
                    f"{'yes' if merges else 'no'} |")
    print(f"\n{args.model}{' (tiny)' if args.tiny else ''}, batch {args.batch_size}, {args.repeats} interleaved calls, "
          f"{args.new_tokens} new tokens; {args.tokens} slots, LoRA rank {args.rank}, adapter width {args.width}; "
          f"{torch.get_num_threads()} threads; {time.perf_counter() - started:.0f} s, load {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| method | trainable parameters | forward vs base (95% interval) | greedy generation vs base | one batch "
          f"mixes adaptations ({MIXED} in a batch vs 1) | merges into the weights |")
    print("|---|---:|---:|---:|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
