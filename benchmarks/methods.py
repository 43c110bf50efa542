"""Prefix tuning against a soft prompt, LoRA, adapters and full fine-tuning, on the recipes' embedded default.

    python benchmarks/methods.py [--recipes vqa captioning textgen classification vqa_llava instruct align]
        [--methods prefix prompt lora full]
    python benchmarks/methods.py --sweep [--jobs 2] [--recipes ...] [--variants prefix gated memory ...]

``--sweep``: every method at three parameter budgets with learning rates chosen on the validation split, three
seeds for each task's headline rows, forgetting and new classes; a stopped sweep resumes (see
``benchmarks/sweep.py``). It writes ``sweep.md`` (the tables) and one ``<task>.png`` per task (test score against
trainable parameters) into ``--output-dir``; ``--report`` writes them from the runs finished so far.

Each (recipe, method) runs the recipe with its default config in a fresh process, one after the other
(``vqa_llava``: the VQA recipe with ``recipes/configs/vqa_llava_embedded.yaml``, the embedded LLaVA-style backbone); the
peak resident memory is that process's own (``os.wait4`` returns the resource usage of that one child). Scores are the
recipes' test-split primary metrics; "time" is the training time the recipe reports (evaluation excluded), also
as a ratio to the prefix's on the same recipe.
Each method trains with its learning rate from the recipe's config (full fine-tuning and LoRA
have their own there). Prints a Markdown table and writes every run's metrics to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIMARY = {"vqa": "vqa_accuracy", "captioning": "CIDEr", "textgen": "Bleu_4", "classification": "top1",
           "vqa_llava": "vqa_accuracy", "instruct": "held-out phrasings", "align": "preference_accuracy"}
PREFIX_ONLY = ("instruct", "align")  # the seed's use cases compare a prefix with their own baselines, not methods
# benchmark name -> (recipe script, config; None: the recipe's default)
RECIPES = {name: (name, None) for name in PRIMARY} | {"vqa_llava": ("vqa", "recipes/configs/vqa_llava_embedded.yaml")}


def run(recipe: str, method: str, output: Path) -> dict:
    script, config = RECIPES[recipe]
    command = [sys.executable, str(ROOT / "recipes" / f"{script}.py"), "--method", method,
               *(["--config", str(ROOT / config)] if config else []), f"output_dir={output}"]
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(output / "run.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{recipe} --method {method} failed: see {output / 'run.log'}")
    metrics = json.loads((output / "metrics.json").read_text())
    result = {**metrics, "wall_seconds": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024}
    (output / "benchmark.json").write_text(json.dumps(result, indent=2))  # kept if a later run fails
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=[r for r in PRIMARY if r not in ("vqa_llava", *PREFIX_ONLY)],
                        choices=list(PRIMARY))
    parser.add_argument("--methods", nargs="+", default=["prefix", "prompt", "lora", "full"])
    parser.add_argument("--output-dir", type=Path, default=None, help="default: out/methods (out/sweep with --sweep)")
    parser.add_argument("--sweep", action="store_true", help="budgets, learning rates, seeds, forgetting, new classes")
    parser.add_argument("--report", action="store_true", help="with --sweep: only write the tables and figures")
    parser.add_argument("--jobs", type=int, default=2, help="--sweep: runs at once (each niced, one thread)")
    parser.add_argument("--variants", nargs="+", default=None, help="--sweep: methods (default: all of sweep.VARIANTS)")
    parser.add_argument("--short", action="store_true",
                        help="--sweep: rates on validation, then three seeds at the config's budget (no budgets, new classes)")
    args = parser.parse_args()
    if args.sweep:
        import sweep
        import sweep_report

        root = args.output_dir or Path("out/sweep")
        labels = args.variants or [v.label for v in sweep.VARIANTS]
        tasks = args.recipes if "--recipes" in sys.argv else [r for r in PRIMARY if r not in PREFIX_ONLY]
        plan = sweep.Sweep(root, RECIPES, PRIMARY, tasks, labels, short=args.short)
        if not args.report:
            sweep.run_sweep(plan, args.jobs)
        sweep_report.write(plan)
        return
    args.output_dir = args.output_dir or Path("out/methods")

    rows = []
    for recipe in args.recipes:
        for method in ["prefix"] if recipe in PREFIX_ONLY else args.methods:
            result = run(recipe, method, args.output_dir / recipe / method)
            rows.append((recipe, method, result))
            print(f"[{time.strftime('%H:%M:%S')}] {recipe} {method}: {result['tuned'][PRIMARY[recipe]]:.2f}", file=sys.stderr)
    (args.output_dir / "methods.json").write_text(json.dumps([{"recipe": r, "method": m, **x} for r, m, x in rows], indent=2))

    print(table(rows))


def table(rows: list[tuple[str, str, dict]]) -> str:
    """The Markdown table of (recipe, method, result) rows; training times also as a ratio to the prefix's."""
    lines = ["| recipe (metric) | method | zero-shot | tuned | % of full | trainable % | training time | "
             "vs prefix | run time | peak memory |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    full = {r: x["tuned"][PRIMARY[r]] for r, m, x in rows if m == "full"}
    prefix = {r: x["training_seconds"] for r, m, x in rows if m == "prefix"}
    for recipe, method, result in rows:
        metric = PRIMARY[recipe]
        share = f"{100 * result['tuned'][metric] / full[recipe]:.0f}%" if full.get(recipe) else "-"
        ratio = f"{result['training_seconds'] / prefix[recipe]:.2f}x" if prefix.get(recipe) else "-"
        lines.append(f"| {recipe} ({metric}) | {method} | {result['zero_shot'][metric]:.2f} | "
                     f"{result['tuned'][metric]:.2f} | {share} | {result['trainable_percent']:.2f} | "
                     f"{result['training_seconds']:.0f} s | {ratio} | {result['wall_seconds']:.0f} s | "
                     f"{result['peak_rss_mib']:.0f} MiB |")
    lines.append("\nPeak memory is the recipe process's peak resident set (weights, data, evaluation included).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
