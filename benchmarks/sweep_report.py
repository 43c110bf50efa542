"""Tables and figures of the methods sweep (``benchmarks/methods.py --sweep``), from the runs finished so far:
``sweep.md`` and one ``<task>.png`` per task (test score against trainable parameters) in the sweep's folder. A
cell whose runs have not finished reads "-"."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

from sweep import BY_LABEL, LR_GRID, SEEDS, Run, mean_spread

NAMES = {"vqa": "VQA (accuracy %)", "captioning": "captioning (CIDEr)", "textgen": "text generation (BLEU-4)",
         "classification": "classification (top-1 %)", "vqa_llava": "VQA, embedded LLaVA (accuracy %)"}
SCALE = {"Bleu_4": 1.0}  # metrics printed as the recipes report them


def _test(sweep, run: Run) -> float | None:
    result = sweep.result(run)
    return None if result is None else result["tuned"][sweep.primary[run.task]]


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rate_table(sweep, task: str) -> list[str]:
    lines = [f"Learning rates on the validation split (middle budget, seed 0; the config's rate times "
             f"{', '.join(f'{m:.3g}' for m in LR_GRID)}):", "",
             "| method | budget | " + " | ".join(f"x{m:.3g}" for m in LR_GRID) + " | beyond the grid | chosen |",
             "|---|---:|" + "---:|" * len(LR_GRID) + "---:|---:|"]
    for label in sweep.labels[task]:
        runs = sweep.rate_runs(task, label)
        cells = [f"{r.lr:.3g}: {_cell((sweep.result(r) or {}).get('validation'))}" for r in runs]
        # the grid grows past an edge where the best score lies: those rates share one column
        cells = cells[:len(LR_GRID)] + ["; ".join(cells[len(LR_GRID):]) or "-"]
        rate = sweep.rate(task, label)
        lines.append(f"| {label} | {runs[0].budget or 'all'} | " + " | ".join(cells) + f" | {_cell(rate, 4)} |")
    return lines


def budget_rows(sweep, task: str) -> list[tuple[str, Run, dict]]:
    rows = []
    for label in sweep.labels[task]:
        for run in sweep.budget_runs(task, label):
            result = sweep.result(run)
            if result is not None:
                rows.append((label, run, result))
    return rows


def budget_table(sweep, task: str) -> list[str]:
    lines = ["Budgets (each method's chosen rate, seed 0):", "",
             "| method | budget | trainable parameters | validation | test |", "|---|---:|---:|---:|---:|"]
    metric = sweep.primary[task]
    for label, run, result in budget_rows(sweep, task):
        lines.append(f"| {label} | {run.budget or 'all'} | {result['trainable_parameters']:,} | "
                     f"{_cell(result['validation'])} | {_cell(result['tuned'][metric])} |")
    return lines


def seeds_table(sweep, task: str) -> list[str]:
    """Every method at the config's budget and its chosen rate, over the seeds finished so far."""
    lines = [f"At the config's budget and each method's chosen rate (test split, mean ± standard deviation over the "
             f"seeds finished of {', '.join(map(str, SEEDS))}):", "",
             "| method | budget | rate | trainable parameters | seeds | validation | test | % of full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = []
    for label in sweep.labels[task]:
        results = [r for r in (sweep.result(run) for run in sweep.seed_runs(task, label)) if r is not None]
        if results:
            rows.append((label, sweep.seed_runs(task, label)[0], results))
    metric = sweep.primary[task]
    tests = {label: [r["tuned"][metric] for r in results] for label, _, results in rows}
    full = statistics.mean(tests["full"]) if tests.get("full") else None
    for label, run, results in rows:
        share = f"{100 * statistics.mean(tests[label]) / full:.0f}%" if full else "-"
        lines.append(f"| {label} | {run.budget or 'all'} | {run.lr:.3g} | {results[0]['trainable_parameters']:,} | "
                     f"{len(results)} | {mean_spread([r['validation'] for r in results])} | "
                     f"{mean_spread(tests[label])} | {share} |")
    return lines if rows else []


def checks(sweep, runs: list[Run]) -> list[float]:
    out = []
    for run in runs:
        path = run.folder(sweep.root) / "checks.json"
        if path.is_file():
            out.append(json.loads(path.read_text())["score"])
    return out


def headline(sweep, task: str) -> list[dict]:
    """One entry per headline row: label, budget, parameters, test scores and check scores of its seeds."""
    rows = []
    for label, budget in sweep.headlines(task) or []:
        runs = [Run(task, label, budget, sweep.rate(task, label), seed) for seed in SEEDS]
        tests = [t for t in (_test(sweep, r) for r in runs) if t is not None]
        first = sweep.result(runs[0])
        rows.append({"label": label, "budget": budget, "parameters": first["trainable_parameters"] if first else None,
                     "tests": tests, "checks": checks(sweep, runs)})
    return rows


def headline_table(sweep, task: str) -> list[str]:
    rows = headline(sweep, task)
    if not rows:
        return ["Headline rows: not chosen yet (the rates and budgets of every method must have run)."]
    base_path = sweep.root / task / "checks-base.json"
    base = json.loads(base_path.read_text())["score"] if base_path.is_file() else None
    check = json.loads(base_path.read_text())["check"] if base_path.is_file() else "the pretraining check"
    full = next((statistics.mean(r["tests"]) for r in rows if r["label"] == "full" and r["tests"]), None)
    lines = [f"Headline rows (test split, mean ± standard deviation over seeds {', '.join(map(str, SEEDS))}; "
             f"forgetting: {check} with the adaptation active, the frozen backbone scores {_cell(base)}):", "",
             "| method | budget | trainable parameters | seeds | test | % of full | check score | % of backbone |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        mean = statistics.mean(row["tests"]) if row["tests"] else None
        share = f"{100 * mean / full:.0f}%" if mean is not None and full else "-"
        kept = statistics.mean(row["checks"]) if row["checks"] else None
        kept_share = f"{100 * kept / base:.0f}%" if kept is not None and base else "-"
        params = f"{row['parameters']:,}" if row["parameters"] else "-"
        lines.append(f"| {row['label']} | {row['budget'] or 'all'} | {params} | {len(row['tests'])} | "
                     f"{mean_spread(row['tests'])} | {share} | {mean_spread(row['checks'])} | {kept_share} |")
    return lines


def forgetting_table(sweep, task: str) -> list[str]:
    """Each method at its chosen rate (middle budget, seed 0): the pretraining check with the adaptation active."""
    base_path = sweep.root / task / "checks-base.json"
    if not base_path.is_file():
        return []
    base = json.loads(base_path.read_text())
    lines = [f"Forgetting ({base['check']}, {base['metric']}, {base['samples']} test samples; the frozen backbone "
             f"{base['score']:.2f}), each method at its chosen rate, middle budget, seed 0:", "",
             "| method | task test score | check score | % of the backbone's |", "|---|---:|---:|---:|"]
    for label in sweep.labels[task]:
        rate = sweep.rate(task, label)
        run = next((r for r in sweep.rate_runs(task, label) if r.lr == rate), None)
        path = run.folder(sweep.root) / "checks.json" if run else None
        if path is None or not path.is_file():
            continue
        score = json.loads(path.read_text())["score"]
        share = f"{100 * score / base['score']:.0f}%" if base["score"] else "-"
        lines.append(f"| {label} | {_cell(_test(sweep, run))} | {score:.2f} | {share} |")
    return lines


def newclass_table(sweep) -> list[str]:
    if "classification" not in sweep.tasks:
        return []
    zero = sweep.root / "classification" / "newclass-zero-shot.json"
    lines = ["New classes (classification: trained on the base half of the classes; test images of each half, "
             "classified among that half's classes; H: harmonic mean; mean ± sd over seeds):", "",
             "| method | seeds | base | new | H |", "|---|---:|---:|---:|---:|"]
    by_label: dict[str, list[tuple[float, float]]] = {}
    zero_base = None
    for run in sweep.newclass_runs():
        result, path = sweep.result(run), run.folder(sweep.root) / "newclass.json"
        if result is not None and path.is_file():
            zero_base = result["zero_shot"]["top1"]
            by_label.setdefault(run.variant, []).append((result["tuned"]["top1"], json.loads(path.read_text())["new_top1"]))
    if zero.is_file() and zero_base is not None:
        new = json.loads(zero.read_text())["new_top1"]
        lines.append(f"| zero-shot | - | {zero_base:.2f} | {new:.2f} | {_harmonic(zero_base, new):.2f} |")
    for label, pairs in by_label.items():
        bases, news = [b for b, _ in pairs], [n for _, n in pairs]
        lines.append(f"| {label} | {len(pairs)} | {mean_spread(bases)} | {mean_spread(news)} | "
                     f"{mean_spread([_harmonic(b, n) for b, n in pairs])} |")
    return lines


def _harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def figure(sweep, task: str, path: Path) -> bool:
    """Test score against trainable parameters: each method's budgets (seed 0) as a line, or, where only the
    config's budget has run, its seeds there as a mean with its spread; headline means with their spread as black
    error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, metric = budget_rows(sweep, task), sweep.primary[task]
    seeds = {label: [r for r in map(sweep.result, sweep.seed_runs(task, label)) if r] for label in sweep.labels[task]}
    if not rows and not any(len(s) > 1 for s in seeds.values()):
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sweep.labels[task]:
        points = sorted((r["trainable_parameters"], r["tuned"][metric]) for l, _, r in rows if l == label)
        style = "-o" if BY_LABEL[label].prefix_family else "--s"
        if len(points) > 1 or (points and len(seeds[label]) < 2):
            ax.plot(*zip(*points), style, label=label, alpha=0.85)
        elif len(seeds[label]) > 1:
            tests = [r["tuned"][metric] for r in seeds[label]]
            ax.errorbar([seeds[label][0]["trainable_parameters"]], [statistics.mean(tests)],
                        yerr=[statistics.stdev(tests)], fmt=style[-1], capsize=4,
                        label=f"{label} ({len(tests)} seeds, config's budget)")
    for row in headline(sweep, task):
        if len(row["tests"]) > 1 and row["parameters"]:
            ax.errorbar([row["parameters"]], [statistics.mean(row["tests"])], yerr=[statistics.stdev(row["tests"])],
                        fmt="k_", capsize=4, markersize=14)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{NAMES.get(task, task)}: test score against trainable parameters")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(sweep) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    stamp = Path(__file__).parents[1] / "COMMIT"  # a copy of the code made for a long sweep names its commit there
    commit = commit or (stamp.read_text().strip() if stamp.is_file() else "unknown")
    lines = [f"# Methods sweep ({time.strftime('%Y-%m-%d %H:%M')}, commit {commit})", ""]
    for task in sweep.tasks:
        lines += [f"## {NAMES.get(task, task)}", ""]
        lines += rate_table(sweep, task) + [""] + seeds_table(sweep, task) + [""] + budget_table(sweep, task)
        lines += [""] + headline_table(sweep, task)
        lines += [""] + forgetting_table(sweep, task)
        if figure(sweep, task, sweep.root / f"{task}.png"):
            lines += ["", f"![{task}]({task}.png)"]
        lines.append("")
    lines += newclass_table(sweep)
    (sweep.root / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
