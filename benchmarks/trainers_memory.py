"""Does TRL's DPOTrainer hold a second copy of the base model for a prefix model's reference? Peak memory of
DPO against SFT on the same model.

    python benchmarks/trainers_memory.py              # a ~0.4B-parameter Llama (float32 on a CPU, bf16 on a GPU)
    python benchmarks/trainers_memory.py --reduced    # a tiny one (checks the script; tests)

One Llama built from its config (random weights), a prefix of P=16 in every attention site, and three trainings
of a few steps, each in a fresh process (this script re-invoked with ``--worker``):

* ``sft``: TRL's SFTTrainer on 2B sequences a step;
* ``dpo``: TRL's DPOTrainer on B preference pairs (the same 2B sequences a step), no ``ref_model``: mmprefix gives
  it the model with its prefix disabled as the reference (`mmprefix.integrations.trl_trainers.ReferenceModel`);
* ``dpo, copied reference``: the same with ``ref_model`` a deep copy of the base model, what a reference of its
  own costs (TRL would load one for any model it does not know).

Peak memory is measured after the model and trainer are built, during training: on a GPU
``torch.cuda.max_memory_allocated``; on a CPU the peak resident set size (``VmHWM`` reset once the model is
built; see benchmarks/memory.py). The ratios to SFT's peak say whether the reference costs a copy of the
weights (a copy adds about the weights' bytes). Timings of this machine are not the point and are not printed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory import status  # noqa: E402

MODES = ("sft", "dpo", "dpo, copied reference")
SIZES = {  # hidden, layers, heads, vocabulary
    "full": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
    "reduced": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000),
}
WORDS = [f"w{i}" for i in range(200)]


def tokenizer():
    """A word-level tokenizer over ``WORDS`` (offline; the benchmark needs token ids, not language)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def texts(count: int, length: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (length,), generator=generator)) for _ in range(count)]


def build(size: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of bf16 weights on the way
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                                         eos_token_id=3))
    torch.set_default_dtype(default)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def trainer(mode: str, model: torch.nn.Module, pairs: int, steps: int, out: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from mmprefix import PrefixConfig, add_prefix

    reference = copy.deepcopy(model).eval() if mode == "dpo, copied reference" else None
    prefixed = add_prefix(model, PrefixConfig(num_virtual_tokens=16))
    common = dict(max_steps=steps, learning_rate=1e-3, gradient_checkpointing=False, save_strategy="no",
                  use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), report_to="none")
    count = pairs * steps
    if mode == "sft":
        data = Dataset.from_dict({"prompt": texts(2 * count, 48, 0), "completion": texts(2 * count, 16, 1)})
        args = SFTConfig(out, per_device_train_batch_size=2 * pairs, **common)
        return SFTTrainer(model=prefixed, args=args, train_dataset=data, processing_class=tokenizer())
    data = Dataset.from_dict({"prompt": texts(count, 48, 0), "chosen": texts(count, 16, 1),
                              "rejected": texts(count, 16, 2)})
    args = DPOConfig(out, per_device_train_batch_size=pairs, **common)
    return DPOTrainer(model=prefixed, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer())


def worker(mode: str, size: str, pairs: int, steps: int) -> dict:
    gpu = torch.cuda.is_available()
    model = build(size, torch.bfloat16 if gpu else torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as out:
        built = trainer(mode, model, pairs, steps, out)
        gc.collect()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            method = "torch.cuda.max_memory_allocated"
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := the current resident set
            method = "peak resident set (VmHWM), reset after building"
        built.train()
        peak = torch.cuda.max_memory_allocated() if gpu else status("VmHWM")
    return {"mode": mode, "weights": weights, "peak": peak, "method": method,
            "parameters": sum(p.numel() for p in model.parameters()), "device": "cuda" if gpu else "cpu"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="a tiny model (checks the script)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs a step (SFT: twice as many rows)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = "reduced" if args.reduced else "full"
    if args.worker:
        print(json.dumps(worker(args.worker, size, args.pairs, args.steps)))
        return
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--worker", mode, "--pairs", str(args.pairs), "--steps", str(args.steps)]
        output = subprocess.run(command + (["--reduced"] if args.reduced else []), check=True, capture_output=True,
                                text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        print(f"{mode}: done", flush=True)
    sft = results["sft"]
    print(f"\nLlama, {sft['parameters'] / 1e6:.1f}M parameters, {sft['weights'] / 2**20:.0f} MiB of weights on "
          f"{sft['device']}; {args.pairs} pairs (DPO) or {2 * args.pairs} rows (SFT) a step, {args.steps} steps; "
          f"peak: {sft['method']}")
    print("\n| trainer | peak memory | peak / weights | peak / SFT's peak |\n|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['peak'] / 2**20:.0f} MiB | {r['peak'] / r['weights']:.2f} | {r['peak'] / sft['peak']:.2f} |")
    extra = (results["dpo"]["peak"] - sft["peak"]) / sft["weights"]
    print(f"\nDPO's reference (the prefix disabled) adds {extra:.2f}x the weights' bytes over SFT; a copied reference "
          f"adds {(results['dpo, copied reference']['peak'] - sft['peak']) / sft['weights']:.2f}x")


if __name__ == "__main__":
    main()
