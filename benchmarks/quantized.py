"""A prefix on an int8 base next to the same prefix on the float32 base: weight memory, training-step time, and
the embedded recipes' tuned scores.

    python benchmarks/quantized.py                          # memory and step time (a minute)
    python benchmarks/quantized.py --recipes vqa captioning # also each recipe run twice (minutes of CPU each)

Memory is the bytes of the frozen base's weights as stored (a torchao int8 weight: its int8 values and its
per-channel scales). Step time is one prefix-tuning step (forward, backward, AdamW) on a batch of 32 from the
recipe's data, the float32 and the int8 model alternated step by step in one process so that background load
hits both alike (medians). The recipes run one after the other, each as its documented command with
``quantize=int8`` added for the int8 run, and their ``metrics.json`` is read back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmprefix import PrefixConfig, add_prefix
from mmprefix.data import formatting, load_image, read_samples
from mmprefix.data.synthetic import build_world
from mmprefix.evaluation import PRIMARY_METRIC
from mmprefix.models import loading

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"vqa": ("vqa", "vqa_accuracy", 2.0), "captioning": ("caption", "CIDEr", 0.3)}  # task, metric, goal


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, through tensor subclasses (torchao's quantized weights) to the tensors inside."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.nn.Parameter:
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(stored_bytes(p) for p in model.parameters())


def vqa_batch(model, processor, size: int) -> dict:
    world = build_world()
    samples = read_samples("vqa", str(world / "vqa_downstream_train.jsonl"))[:size]
    images = [load_image(s.image) for s in samples]
    return formatting.vqa_batch(model, processor, images, [s.question for s in samples],
                                [s.answers[0] for s in samples])


def step_times(steps: int, batch_size: int) -> list[dict]:
    models = {}
    for scheme in (None, "int8"):
        model, processor = loading.load_model("embedded:blip:vqa", "vqa", quantize=scheme)
        pm = add_prefix(model, PrefixConfig(num_virtual_tokens=12))
        pm.train()
        models[scheme or "float32"] = (pm, torch.optim.AdamW(pm.prefixes.parameters(), lr=1e-3),
                                       weight_bytes(model), vqa_batch(model, processor, batch_size))
    times = {name: [] for name in models}
    for step in range(steps + 1):
        for name, (pm, optimizer, _, batch) in models.items():
            started = time.perf_counter()
            pm(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:  # the first step warms up
                times[name].append(time.perf_counter() - started)
    return [{"base": name, "weights": models[name][2], "step": statistics.median(times[name])} for name in models]


def run_recipe(name: str, scheme: str | None, out: Path, threads: int) -> dict:
    folder = out / f"{name}-{scheme or 'float32'}"
    command = ["nice", "-n", "5", sys.executable, str(ROOT / "recipes" / f"{name}.py"), "--output-dir", str(folder)]
    if scheme:
        command.append(f"quantize={scheme}")
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"zero_shot": metrics["zero_shot"], "tuned": metrics["tuned"], "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per base")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--recipes", nargs="*", default=[], choices=sorted(RECIPES))
    parser.add_argument("--output-dir", type=Path, default=ROOT / "out" / "bench-quantized")
    parser.add_argument("--threads", type=int, default=1, help="threads here and in each recipe (default 1: on a "
                        "shared 2-core machine a second thread's OpenMP waits cost more than it computes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    rows = step_times(args.steps, args.batch_size)
    base = rows[0]
    print("\n| embedded BLIP (VQA head) | weight memory | ratio | prefix training step (batch "
          f"{args.batch_size}) | ratio |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['base']} base | {row['weights'] / 2**20:.1f} MiB | {row['weights'] / base['weights']:.2f} | "
              f"{row['step']:.3f} s | {row['step'] / base['step']:.2f} |")
    print(f"(load average {os.getloadavg()[0]:.1f})")

    if args.recipes:
        print("\n| recipe | metric | zero-shot float32 / int8 | tuned float32 | tuned int8 | difference | goal | "
              "run time float32 / int8 |\n|---|---|---|---|---|---|---|---|")
    for name in args.recipes:
        task, metric, goal = RECIPES[name]
        assert metric == PRIMARY_METRIC[task]
        float32 = run_recipe(name, None, args.output_dir, args.threads)
        int8 = run_recipe(name, "int8", args.output_dir, args.threads)
        difference = int8["tuned"][metric] - float32["tuned"][metric]
        print(f"| {name} | {metric} | {float32['zero_shot'][metric]:.2f} / {int8['zero_shot'][metric]:.2f} | "
              f"{float32['tuned'][metric]:.2f} | {int8['tuned'][metric]:.2f} | {difference:+.2f} | within {goal} | "
              f"{float32['seconds']:.0f} s / {int8['seconds']:.0f} s |", flush=True)
    if args.recipes:
        print(f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
