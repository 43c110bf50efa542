"""What does a prefix in every attention site cost at real model sizes?

Base-size CLIP ViT-B/32 (224 px), BLIP-VQA base (384 px) and GPT-2 (124M, 64 tokens), built from their default
configs with random weights: cost does not depend on the weight values, and nothing has to be downloaded.
``--method memory`` measures the decoupled prefix (``PrefixConfig(method="memory")``) instead, against its goal
of a forward at most 1.05x the untouched model's. GPT-2 is also measured against PEFT's prefix tuning (its forward, which passes the prefix as a KV cache; not
its ``generate``, which drops the prefix on transformers 5.24), the reference for a causal LM.

Latency (forward; greedy generation for BLIP-VQA) compares the prefixed model with an untouched copy of the
same weights in the same process, timed alternately (A B, B A, ...) so that background load on a shared machine
hits both alike; the ratio is of medians. BLIP's own attention is eager while mmprefix's BLIP route uses SDPA,
so a prefixed BLIP can be faster than the untouched one.

Training compares prefix tuning with full fine-tuning of the same model (forward + backward + AdamW step).
Each configuration runs in a fresh subprocess (this script re-invoked with a hidden ``--_worker`` flag), so
neither sees the other's memory. Peak memory is the growth over the loaded model: on CUDA,
``max_memory_allocated`` minus what is allocated once the model is loaded; on CPU, the peak resident set size
(``VmHWM``, reset through ``/proc/self/clear_refs`` after loading; ``ru_maxrss`` where that fails) minus the
resident set size after loading. Gradients, optimizer state and activations count; the weights do not.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch
import transformers as tf

from mmprefix import PrefixConfig, add_prefix

GOALS = {"forward": 1.03, "generate": 1.05, "train step": 0.6, "train memory": 0.5,
         "forward vs PEFT": 1.0, "train step vs PEFT": 1.0}
MEMORY_GOALS = {"forward": 1.05}  # --method memory (issue 21): its own forward goal
REPEATS = {"clip": 20, "blip": 4, "gpt2": 20}  # latency repeats per model: a 2-core CPU run takes < ~20 min
TRAIN_STEPS = {"clip": 5, "blip": 2, "gpt2": 5}  # timed training steps per configuration, after --warmup steps
MODELS = ("clip", "blip", "gpt2")


def build(name: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "clip":
        model = tf.CLIPModel(tf.CLIPConfig())  # defaults: ViT-B/32 at 224 px, 12-layer text tower
    elif name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config())
    else:
        # BlipVisionConfig's default initializer_range is 1e-10: a random vision tower would emit ~1e-10 activations
        # (a prefix then changes outputs by ~1e-9). 0.02 gives magnitudes closer to a trained model's.
        vision = {"image_size": 384, "initializer_range": 0.02}
        model = tf.BlipForQuestionAnswering(tf.BlipConfig(vision_config=vision))
    return model.to(device=args.device, dtype=args.torch_dtype).eval()


def prefix_config(args) -> PrefixConfig:
    """The prefix measured: plain (keys and values in attention) or a memory read outside the softmax."""
    return PrefixConfig(num_virtual_tokens=args.prefix_tokens, method=args.method, init_std=1.0)


def with_peft_prefix(model: torch.nn.Module, args) -> torch.nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix_tokens))


def make_batch(name: str, args, train: bool) -> dict:
    """Random inputs; BLIP-VQA needs answers (``labels`` to train, ``decoder_input_ids`` to run forward)."""
    g = torch.Generator().manual_seed(0)
    if name == "gpt2":
        ids = torch.randint(0, 50000, (args.batch_size, 64), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if train:
            batch["labels"] = ids
        return {k: v.to(args.device) for k, v in batch.items()}
    b, size = args.batch_size, 224 if name == "clip" else 384
    text_len = 16 if name == "clip" else 12
    batch = {
        "input_ids": torch.randint(1000, 30000, (b, text_len), generator=g),
        "attention_mask": torch.ones(b, text_len, dtype=torch.long),
        "pixel_values": torch.randn(b, 3, size, size, generator=g).to(args.torch_dtype),
    }
    if name == "clip":
        batch["return_loss"] = train
    else:
        answers = torch.randint(1000, 30000, (b, 6), generator=g)
        answers[:, 0], answers[:, -1] = 30522, 102  # BLIP text defaults: bos, sep
        batch["labels" if train else "decoder_input_ids"] = answers
    return {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(args):
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")


def timed(fn, args) -> float:
    """Seconds for one call; on CUDA, waits for queued kernels before and after."""
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int, warmup: int, args) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in alternating order."""
    names, times = list(fns), {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name], args))
    return times


@torch.no_grad()
def latency(name: str, args) -> list[dict]:
    base = build(name, args)
    prefixed = add_prefix(copy.deepcopy(base), prefix_config(args)).eval()
    batch, repeats = make_batch(name, args, train=False), args.repeats or REPEATS[name]
    rows = []

    def run(model, method="__call__", **kwargs):
        def call():
            with autocast(args):
                getattr(model, method)(**batch, **kwargs)
        return call

    models = {"base": run(base), "prefix": run(prefixed)}
    if name == "gpt2" and args.method == "prefix":  # PEFT's prefix tuning is the reference of a plain prefix only
        models["peft"] = run(with_peft_prefix(copy.deepcopy(base), args).eval())
    t = interleaved(models, repeats, args.warmup, args)
    rows.append(timed_row(name, "forward", t, f"median of {repeats}, interleaved", args.method))
    if "peft" in t:
        rows.append(timed_row(name, "forward vs PEFT", {"base": t["peft"], "prefix": t["prefix"]},
                              f"median of {repeats}, interleaved with the untouched model"))
    if name == "blip":
        batch.pop("decoder_input_ids")
        gen = dict(method="generate", max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   num_beams=1)
        t = interleaved({"base": run(base, **gen), "prefix": run(prefixed, **gen)}, repeats, args.warmup, args)
        rows.append(timed_row(name, "generate", t, f"greedy, {args.new_tokens} new tokens, median of {repeats}"))
    del base, prefixed
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def row(model, measurement, unit, base, prefix, note, method: str = "prefix") -> dict:
    ratio = prefix / base
    goal = (MEMORY_GOALS if method == "memory" else {}).get(measurement, GOALS[measurement])
    return dict(model=model, measurement=measurement, unit=unit, base=base, prefix=prefix, ratio=ratio,
                goal=goal, met=ratio <= goal, note=note)


def ratio_interval(base: list[float], prefix: list[float], resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the ratio of medians. Rounds are resampled whole (the two calls of a round ran
    next to each other, under the same background load)."""
    rng, n, ratios = random.Random(0), len(base), []
    for _ in range(resamples):
        rounds = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(prefix[i] for i in rounds) / statistics.median(base[i] for i in rounds))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def timed_row(model, measurement, times, note, method: str = "prefix") -> dict:
    """Medians make the ratio, with its 95% interval (a single call varies by ~10% on a shared machine); the ratio
    of the fastest calls is shown too, as a check on background load."""
    min_ratio = min(times["prefix"]) / min(times["base"])
    low, high = ratio_interval(times["base"], times["prefix"])
    r = row(model, measurement, "s", statistics.median(times["base"]), statistics.median(times["prefix"]),
            f"{note}; 95% interval {low:.3f}-{high:.3f}; ratio of minima {min_ratio:.3f}", method)
    return dict(r, times=times, min_ratio=min_ratio, interval=(low, high))


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def train_worker(name: str, mode: str, args) -> dict:
    """One training configuration in this (fresh) process: median step time and peak memory growth."""
    model = build(name, args).train()
    if mode == "prefix":
        model = add_prefix(model, prefix_config(args)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batch = make_batch(name, args, train=True)
    gc.collect()
    if args.device == "cuda":
        baseline, method = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline, method = rss_bytes("VmRSS"), "peak RSS (VmHWM reset after load)"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            method = "peak RSS (ru_maxrss, not reset after load)"

    def step():
        with autocast(args):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = args.train_steps or TRAIN_STEPS[name]
    times = [timed(step, args) for _ in range(args.warmup + steps)][args.warmup:]
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    elif "VmHWM" in method:
        peak = rss_bytes("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(step_s=statistics.median(times), peak_mb=(peak - baseline) / 2**20, memory_method=method,
                trainable=sum(p.numel() for p in params), steps=steps)


def train_side_by_side(name: str, args) -> dict:
    """Prefix tuning and PEFT's prefix tuning of the same model in one process, their steps alternated, so that
    background load hits both alike: median step times."""
    models = {"prefix": add_prefix(build(name, args), prefix_config(args)),
              "peft": with_peft_prefix(build(name, args), args)}
    batch, steps = make_batch(name, args, train=True), {}
    for mode, model in models.items():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(model=model.train(), optimizer=optimizer):
            with autocast(args):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[mode] = step
    times = interleaved(steps, args.train_steps or TRAIN_STEPS[name], args.warmup, args)
    return {mode: statistics.median(t) for mode, t in times.items()}


def training(name: str, args) -> list[dict]:
    results = {}
    for mode in ("full", "prefix", "prefix-vs-peft") if name == "gpt2" and args.method == "prefix" else ("full", "prefix"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_worker", f"{name}:{mode}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"training worker {name}:{mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(lines[-1])
    full, prefix = results["full"], results["prefix"]
    note = f"trainable {full['trainable'] / 1e6:.1f}M vs {prefix['trainable'] / 1e6:.2f}M, median of {full['steps']}"
    rows = [row(name, "train step", "s", full["step_s"], prefix["step_s"], note),
            row(name, "train memory", "MiB", full["peak_mb"], prefix["peak_mb"], full["memory_method"])]
    if "prefix-vs-peft" in results:
        pair = results["prefix-vs-peft"]
        rows.append(row(name, "train step vs PEFT", "s", pair["peft"], pair["prefix"],
                        "PEFT's prefix tuning, same P, steps alternated in one process"))
    return rows


def print_table(rows: list[dict], args, wall: float) -> None:
    header = f"{'model':<6} {'measurement':<18} {'reference':>13} {'prefix':>10} {'ratio':>7} {'goal':>7}  met?"
    print(f"\n{header}  note\n" + "-" * (len(header) + 6))
    for r in rows:
        fmt = ".1f" if r["unit"] == "MiB" else ".3f"
        print(f"{r['model']:<6} {r['measurement']:<18} {r['base']:>9{fmt}} {r['unit']:<3} {r['prefix']:>10{fmt}} "
              f"{r['ratio']:>7.3f} {'<=' + str(r['goal']):>7}  {'yes' if r['met'] else 'NO':<4}  {r['note']}")
    bf16 = "\nbf16: base weights bf16 (full FT trains them as such), prefix fp32, autocast" * (args.dtype == "bfloat16")
    print(f"""
device={args.device} dtype={args.dtype} batch={args.batch_size} P={args.prefix_tokens} ({args.method}) in every attention site, \
torch {torch.__version__}, transformers {tf.__version__}, {torch.get_num_threads()} threads, total {wall:.0f} s, load average before {args.load_before} after {os.getloadavg()[0]:.2f}{bf16}
forward/generate: the reference is an untouched copy of the same weights (and for "vs PEFT" PEFT's prefix tuning of
  them), eval + no_grad, timed alternately; the ratio of the fastest calls is a check on background load. BLIP's
  own attention is eager, its prefixed route SDPA.
train: forward + backward + AdamW step; the reference is full fine-tuning of the same model (for "vs PEFT": PEFT's
  prefix tuning), 'prefix' trains the prefix only.
  Each runs in a fresh subprocess; memory is the peak growth over the loaded model (CUDA: max_memory_allocated;
  CPU: peak RSS minus RSS after loading): gradients, optimizer state and activations, not the weights.""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: base weights in bf16, prefix in fp32, autocast")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=10)
    parser.add_argument("--method", choices=["prefix", "memory"], default="prefix",
                        help="memory: the decoupled prefix (its forward goal is 1.05)")
    parser.add_argument("--new-tokens", type=int, default=5, help="tokens generated per BLIP-VQA answer")
    parser.add_argument("--repeats", type=int, help=f"timed latency repeats (default {REPEATS})")
    parser.add_argument("--train-steps", type=int, help=f"timed training steps (default {TRAIN_STEPS})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls / training steps first")
    parser.add_argument("--quick", action="store_true", help="3 latency repeats, 1 timed training step")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.torch_dtype = getattr(torch, args.dtype)
    if args.quick:
        args.repeats, args.train_steps = args.repeats or 3, args.train_steps or 1
    if args._worker:
        name, mode = args._worker.split(":")
        print(json.dumps(train_side_by_side(name, args) if mode == "prefix-vs-peft" else train_worker(name, mode, args)))
        return

    args.load_before = f"{os.getloadavg()[0]:.2f}"
    start, rows = time.perf_counter(), []
    for name in args.models:
        rows += latency(name, args)
        if not args.skip_training:
            rows += training(name, args)
        print(f"[{time.perf_counter() - start:.0f} s] {name} done", file=sys.stderr)
    wall = time.perf_counter() - start
    print_table(rows, args, wall)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("torch_dtype", "_worker")}
        with open(args.json, "w") as f:
            json.dump({"args": meta, "torch": torch.__version__, "transformers": tf.__version__, "wall_s": wall,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
