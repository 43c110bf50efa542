"""How much memory does a prefix-tuning step on a BLIP-2 OPT-2.7b-sized model take on the CPU?

    python benchmarks/memory.py              # ~3.8B parameters, ~7.6 GB of bf16 weights: needs ~16 GB free
    python benchmarks/memory.py --reduced    # the same at the reduced size of benchmarks/gpu.py --cpu (tests)

The model of benchmarks/gpu.py (ViT-g, Q-Former, OPT-2.7b), random weights made directly in bf16, a prefix of
P=10 in every attention site, gradient checkpointing, batch 2 (224 px images, 32 query and 32 text tokens), one
AdamW step on the prefix. Two bases, each in a fresh process (this script re-invoked with ``--worker``): bf16,
and the same with its linear weights quantized to int8 by torchao (Int8WeightOnlyConfig).

Memory is measured two ways, each compared with the bf16 model's weight bytes (goals: <= 1.3x with the bf16
base, <= 0.7x with the int8 base):

* the process's peak resident set size during the step (``VmHWM``, reset through ``/proc/self/clear_refs`` once
  the model is built, so building and quantizing do not count), everything included: the weights, activations,
  the prefix, its gradients and AdamW state, and the runtime, ~0.6 GiB of which is the pages of PyTorch's,
  transformers' and torchao's shared libraries mapped from disk (``RssFile``, printed beside the resident size);
* the peak of the process's anonymous memory (``RssAnon``: what it allocated, without the library pages),
  sampled every half millisecond by a thread during the step; a sampled peak can only miss a spike shorter
  than that, so it is a lower bound, and the two columns bracket the step's need.
Full fine-tuning would hold bf16 gradients and two AdamW states beside the weights (4x the weights before any
activation; ~8x with float32 optimizer states): it does not fit this 24 GB machine and is not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu import SPECS  # noqa: E402  (the models of the GPU benchmark)
from quantized import weight_bytes  # noqa: E402

from mmprefix import PrefixConfig, add_prefix  # noqa: E402
from mmprefix.models.loading import quantize_weights  # noqa: E402

GOALS = {"bf16": 1.3, "int8": 0.7}  # peak over the bf16 model's weight bytes


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class AnonPeak(threading.Thread):
    """Samples ``RssAnon`` until stopped; ``peak`` is the largest value seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = status("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.0005):
            self.peak = max(self.peak, status("RssAnon"))

    def __enter__(self) -> "AnonPeak":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def worker(base: str, reduced: bool) -> dict:
    spec = SPECS["blip2_opt"]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never a float32 copy of the weights
    model = spec.build(reduced).eval()
    torch.set_default_dtype(default)
    bf16_weights = weight_bytes(model)
    if base == "int8":
        quantize_weights(model, "int8")  # what the recipes' quantize=int8 does
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=10))
    pm.gradient_checkpointing_enable()
    pm.train()
    optimizer = torch.optim.AdamW(pm.prefixes.parameters(), lr=1e-3)
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in spec.inputs(model, 2, "train").items()}
    gc.collect()
    loaded, mapped = status("VmRSS"), status("RssFile")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current RSS
        method = "VmHWM reset after building"
    except OSError:
        method = "ru_maxrss (building included)"
    started = time.perf_counter()
    with AnonPeak() as anon:
        loss = pm(**batch).loss
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    return {"base": base, "bf16_weights": bf16_weights, "weights": weight_bytes(model), "loaded": loaded,
            "peak": status("VmHWM"), "anon_peak": anon.peak, "mapped": mapped, "seconds": seconds,
            "loss": loss.item(), "method": method,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="the reduced size (checks the script)")
    parser.add_argument("--worker", choices=sorted(GOALS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.reduced)))
        return
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for base in GOALS:
        command = [sys.executable, __file__, "--worker", base] + (["--reduced"] if args.reduced else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{base}: done", flush=True)
    bf16 = results[0]["bf16_weights"]
    size = "reduced size" if args.reduced else "BLIP-2 OPT-2.7b-sized"
    print(f"\n{size}: {results[0]['parameters'] / 1e9:.2f}B parameters, {bf16 / 2**30:.2f} GiB of bf16 weights; "
          f"peak memory: {results[0]['method']}")
    print("\n| base | weight memory | resident after building (library pages) | peak resident during a "
          "prefix-tuning step / bf16 weights | peak anonymous memory / bf16 weights | goal | step time |"
          "\n|---|---|---|---|---|---|---|")
    for r in results:
        goal = GOALS[r["base"]]
        ratios = [r["peak"] / bf16, r["anon_peak"] / bf16]
        met = ", ".join("met" if ratio <= goal else "not met" for ratio in ratios)
        print(f"| {r['base']} | {r['weights'] / 2**20:.1f} MiB | {r['loaded'] / 2**20:.0f} MiB "
              f"({r['mapped'] / 2**20:.0f} MiB) | {r['peak'] / 2**20:.0f} MiB = {ratios[0]:.2f} | "
              f"{r['anon_peak'] / 2**20:.0f} MiB = {ratios[1]:.2f} | <= {goal} ({met}) | {r['seconds']:.0f} s |")
    print(f"\n(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
