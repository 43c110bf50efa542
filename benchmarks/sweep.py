"""The methods sweep behind ``benchmarks/methods.py --sweep``: every method at three parameter budgets, learning
rates chosen on the validation split, three seeds for each task's headline rows, new classes and forgetting.

Per task, in phases that start as soon as what they need is done (runs go two at a time by default, each a
recipe in its own niced process with one thread, and each finished run is kept on disk: a stopped sweep
resumes where it was):

A. the learning-rate grid: every method at its middle budget (the recipe config's), seed 0, at its config's
   learning rate times 1/3, 1 and 3 (the same relative grid for every method), extended by a factor 3 beyond an
   edge where the best validation score lies (twice at most); the rate with the best score on the validation
   split at the end of training wins (ties: the config's rate, then the lower one);
B. the budgets: every method at its other two budgets with that rate, seed 0;
C. the headline rows: LoRA at its best budget on validation, full fine-tuning, adapters at their best budget,
   and the best prefix-family method (plain, gated, memory, image-conditioned) among its budgets with no more
   trainable parameters than LoRA's headline, again on validation: seeds 1 and 2 beside seed 0;
D. forgetting: the adaptation of each headline run and of each method's chosen rate (seed 0), active, on the
   backbone's own pretraining checks (test split), beside the frozen backbone (these checks run first: they
   take seconds);
E. new classes (classification): the classes split in half, each method trained on the base half at its
   config's rate and middle budget (three seeds) and scored on the base half's test images and, without
   training, on the new half's.

``short``: phase A, then seeds 1 and 2 of every method at its chosen rate and the config's budget (no budgets,
headline choice or new classes): the comparison at the shipped budgets, in a fraction of the runs.

The test split is read only by the recipes' final scoring and the checks; no choice above reads it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LR_GRID = (1 / 3, 1.0, 3.0)
EXTENSIONS = 2  # steps the grid may grow beyond an edge where the best validation score lies
SEEDS = (0, 1, 2)
IMAGE_TASKS = ("vqa", "captioning", "classification")  # BLIP and CLIP: the image-conditioned prefix applies
CORE = ("prefix", "memory", "lora", "full")  # their learning-rate grids run first, on every task
NEWCLASS_FIRST = ("prompt", "prefix", "conditioned")  # CoOp, the prefix and CoCoOp's idea: new classes early
ORDER = ("textgen", "vqa_llava", "classification", "vqa", "captioning")  # the cheapest recipes first


@dataclass(frozen=True)
class Variant:
    """A method of the sweep: the recipe's ``--method``, the config section holding its budget and rate, the
    budget's key, fixed overrides, and whether it belongs to the prefix family."""

    label: str
    method: str
    section: str
    budget: str | None
    extra: tuple[str, ...] = ()
    prefix_family: bool = False
    tasks: tuple[str, ...] | None = None

    def budgets(self, middle: int | None) -> list[int | None]:
        if self.budget is None:
            return [None]
        low = 2 if self.section == "lora" else 4
        return [low, middle, 2 * middle]

    def overrides(self, budget: int | None) -> list[str]:
        out = list(self.extra)
        if budget is not None:
            out.append(f"{self.section}.{self.budget}={budget}")
            if self.section == "lora":
                out.append(f"lora.lora_alpha={2 * budget}")  # the scale alpha / r stays the config's
        return out


VARIANTS = (
    Variant("prefix", "prefix", "prefix", "num_virtual_tokens", prefix_family=True),
    Variant("gated", "prefix", "prefix", "num_virtual_tokens", ("prefix.gate=head",), prefix_family=True),
    Variant("memory", "memory", "memory", "num_virtual_tokens", prefix_family=True),
    # a meta-network of width 8 (CoCoOp's 1/16 of the features' width, for the embedded CLIP's and BLIP's 128)
    Variant("conditioned", "prefix", "prefix", "num_virtual_tokens", ("prefix.condition=image",
                                                                        "prefix.condition_hidden=8"),
            prefix_family=True, tasks=IMAGE_TASKS),
    Variant("prompt", "prompt", "prompt", "num_virtual_tokens"),
    Variant("lora", "lora", "lora", "r"),
    Variant("adapter", "adapter", "adapter", "width"),
    Variant("full", "full", "full", None),
)
BY_LABEL = {v.label: v for v in VARIANTS}


@dataclass(frozen=True)
class Run:
    """One recipe run of the sweep (its folder caches the result)."""

    task: str
    variant: str
    budget: int | None
    lr: float
    seed: int
    data: tuple[str, ...] = ()  # data overrides (the base classes of phase E)
    tag: str = ""  # "newclass": phase E

    def folder(self, root: Path) -> Path:
        name = f"{self.variant}-b{self.budget}-lr{self.lr:.3g}-s{self.seed}"
        return root / self.task / (f"{self.tag}-{name}" if self.tag else name)


def recipe_settings(task: str, recipes: dict, variant: Variant):
    """The recipe config's settings for this variant's method (typed, as the recipe reads them)."""
    sys.path.insert(0, str(ROOT))
    from mmprefix.experiment import settings

    script, config = recipes[task]
    config_path = ROOT / (config or f"recipes/configs/{script}.yaml")
    recipe_task = "classification" if task == "classification" else None
    return settings.recipe_settings(["--config", str(config_path), "--method", variant.method], recipe_task or task,
                                    config_path)


def middle_budget(task: str, recipes: dict, variant: Variant) -> int | None:
    if variant.budget is None:
        return None
    config = recipe_settings(task, recipes, variant)
    section = getattr(config, variant.section)
    return int(section[variant.budget] if isinstance(section, dict) else getattr(section, variant.budget))


def base_rate(task: str, recipes: dict, variant: Variant) -> float:
    return float(recipe_settings(task, recipes, variant).train.learning_rate)


def command(run: Run, recipes: dict, root: Path) -> list[str]:
    script, config = recipes[run.task]
    variant = BY_LABEL[run.variant]
    return [sys.executable, str(ROOT / "recipes" / f"{script}.py"), "--method", variant.method,
            *(["--config", str(ROOT / config)] if config else []), "--seed", str(run.seed),
            *variant.overrides(run.budget), f"train.learning_rate={run.lr:.6g}", *run.data,
            f"output_dir={run.folder(root)}"]


def busy(folder: Path) -> bool:
    """Whether a live recipe holds the run's folder (one a stopped sweep left running, say)."""
    import fcntl

    try:
        with open(folder / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def read_result(folder: Path, metric: str | None = None) -> dict | None:
    """A finished run's ``benchmark.json`` (None if it has not finished; ``{"failed": ...}`` if it failed). A run
    that finished while no sweep waited for it (its ``metrics.json`` is there) is recorded now."""
    path = folder / "benchmark.json"
    if path.is_file():
        return json.loads(path.read_text())
    if metric is None or not (folder / "metrics.json").is_file() or busy(folder):
        return None
    metrics = json.loads((folder / "metrics.json").read_text())
    result = {**metrics, "validation": last_validation(folder, metric), "wall_seconds": None}
    path.write_text(json.dumps(result, indent=2))
    return result


def last_validation(folder: Path, metric: str) -> float | None:
    """The validation score of the last evaluation of training (the weights the test split scores)."""
    value = None
    for line in (folder / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if f"eval/{metric}" in record:
            value = record[f"eval/{metric}"]
    return value


class Jobs:
    """Subprocesses, at most ``size`` at once, each niced with one thread; finished ones are collected."""

    def __init__(self, size: int) -> None:
        self.size, self.running = size, {}

    def start(self, key: str, argv: list[str], log: Path, on_exit) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        handle = open(log, "w")
        process = subprocess.Popen(["nice", "-n", "5", *argv], stdout=handle, stderr=subprocess.STDOUT, env=env)
        self.running[key] = (process, handle, time.perf_counter(), on_exit)
        print(f"[{time.strftime('%H:%M:%S')}] start {key}", file=sys.stderr, flush=True)

    def free(self, others: int = 0) -> bool:
        """Whether another job may start beside the running ones and ``others`` (runs of an earlier sweep)."""
        return len(self.running) + others < self.size

    def reap(self) -> None:
        for key, (process, handle, started, on_exit) in list(self.running.items()):
            if process.poll() is None:
                continue
            handle.close()
            del self.running[key]
            on_exit(process.returncode, time.perf_counter() - started)
            print(f"[{time.strftime('%H:%M:%S')}] done {key} (exit {process.returncode})", file=sys.stderr, flush=True)


def finish_run(run: Run, root: Path, metric: str):
    """What to record when a recipe run ends: its scores, validation score, parameters and time, or the failure."""
    folder = run.folder(root)

    def on_exit(code: int, seconds: float) -> None:
        if code != 0:
            result = {"failed": f"exit {code}: see {folder / 'run.log'}"}
        else:
            metrics = json.loads((folder / "metrics.json").read_text())
            result = {**metrics, "validation": last_validation(folder, metric), "wall_seconds": seconds,
                      "run": run.__dict__}
        (folder / "benchmark.json").write_text(json.dumps(result, indent=2))

    return on_exit


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


class Sweep:
    """Which runs of the sweep can start now, from what has finished (see the module docstring)."""

    def __init__(self, root: Path, recipes: dict, primary: dict, tasks: list[str], labels: list[str],
                 short: bool = False) -> None:
        self.root, self.recipes, self.primary, self.short = root, recipes, primary, short
        self.tasks = sorted(tasks, key=lambda t: ORDER.index(t) if t in ORDER else len(ORDER))
        self.labels = {t: [l for l in labels if BY_LABEL[l].tasks is None or t in BY_LABEL[l].tasks] for t in tasks}
        self.grid = {(t, l): (BY_LABEL[l].budgets(middle_budget(t, recipes, BY_LABEL[l])),
                              base_rate(t, recipes, BY_LABEL[l])) for t in tasks for l in self.labels[t]}

    def result(self, run: Run) -> dict | None:
        result = read_result(run.folder(self.root), self.primary[run.task])
        return None if result is None or "failed" in result else result

    def finished(self, run: Run) -> bool:
        return read_result(run.folder(self.root), self.primary[run.task]) is not None

    def middle(self, task: str, label: str) -> int | None:
        """The config's budget: the middle of the method's three."""
        budgets, _ = self.grid[(task, label)]
        return budgets[len(budgets) // 2]

    def rate_runs(self, task: str, label: str) -> list[Run]:
        """The grid's runs at the middle budget; where the best validation score lies at an edge of the grid, the
        grid is extended one step beyond it (at most ``EXTENSIONS`` times), for every method alike."""
        base, middle = self.grid[(task, label)][1], self.middle(task, label)
        runs = [Run(task, label, middle, base * m, 0) for m in LR_GRID]
        for _ in range(EXTENSIONS):
            if not all(self.finished(r) for r in runs):
                break
            best = self._best_rate(runs, base)
            ordered = sorted(runs, key=lambda r: r.lr)
            if best == ordered[0].lr:
                runs.append(Run(task, label, middle, ordered[0].lr * LR_GRID[0], 0))
            elif best == ordered[-1].lr:
                runs.append(Run(task, label, middle, ordered[-1].lr * LR_GRID[-1], 0))
            else:
                break
        return runs

    def _best_rate(self, runs: list[Run], base: float) -> float:
        """The rate with the best validation score; ties go to the config's rate, then to the lower one."""
        scored = [(self.result(r) or {}).get("validation") for r in runs]
        best = max((s for s in scored if s is not None), default=None)
        if best is None:
            return base
        winners = sorted(r.lr for r, s in zip(runs, scored) if s == best)
        return base if any(abs(lr - base) < 1e-12 for lr in winners) else winners[0]

    def rate(self, task: str, label: str) -> float | None:
        """The learning rate with the best validation score at the middle budget (None until all have run)."""
        runs = self.rate_runs(task, label)
        if not all(self.finished(r) for r in runs):
            return None
        return next(r.lr for r in runs if abs(r.lr - self._best_rate(runs, self.grid[(task, label)][1])) < 1e-12)

    def budget_runs(self, task: str, label: str) -> list[Run]:
        rate = self.rate(task, label)
        budgets, _ = self.grid[(task, label)]
        return [] if rate is None else [Run(task, label, b, rate, 0) for b in budgets]

    def seed_runs(self, task: str, label: str) -> list[Run]:
        """Every seed at the config's (middle) budget and the chosen rate; none until the rate is known."""
        rate = self.rate(task, label)
        return [] if rate is None else [Run(task, label, self.middle(task, label), rate, seed) for seed in SEEDS]

    def headlines(self, task: str) -> list[tuple[str, int | None]] | None:
        """(label, budget) of the task's headline rows, chosen on validation; None until phases A and B are done."""
        runs = {label: self.budget_runs(task, label) for label in self.labels[task]}
        if not all(rs and all(self.finished(r) for r in rs) for rs in runs.values()):
            return None

        def best(candidates: list[Run]) -> Run | None:
            scored = [(self.result(r)["validation"], r) for r in candidates if self.result(r)]
            return max(scored, key=lambda x: x[0])[1] if scored else None

        chosen = [best(runs[label]) for label in ("lora", "adapter", "full") if label in runs]
        lora = chosen[0] if chosen and chosen[0] is not None and chosen[0].variant == "lora" else None
        limit = self.result(lora)["trainable_parameters"] if lora else float("inf")
        family = [r for label in self.labels[task] if BY_LABEL[label].prefix_family for r in runs[label]
                  if self.result(r) and self.result(r)["trainable_parameters"] <= limit]
        chosen.append(best(family))
        return [(r.variant, r.budget) for r in chosen if r is not None]

    def headline_runs(self, task: str) -> list[Run]:
        heads = self.headlines(task) or []
        return [Run(task, label, budget, self.rate(task, label), seed) for label, budget in heads for seed in SEEDS]

    def training_runs(self) -> list[Run]:
        """Every run that can start, in the order they should: the learning-rate grids of the core methods on
        every task (and, after classification's, the new-class runs of the image-conditioned prefix and of what it
        is compared with), then the grids of the others, then the budgets, then the headline seeds, then the
        other new-class runs."""
        runs: list[Run] = []
        for core in (True, False):
            for task in self.tasks:
                runs += [r for label in self.labels[task] if (label in CORE) == core for r in self.rate_runs(task, label)]
                if core and task == "classification" and not self.short:
                    runs += [r for r in self.newclass_runs() if r.variant in NEWCLASS_FIRST]
        if self.short:
            return list(dict.fromkeys(runs + [r for t in self.tasks for l in self.labels[t] for r in self.seed_runs(t, l)]))
        for task in self.tasks:
            runs += [r for label in self.labels[task] for r in self.budget_runs(task, label)]
        for task in self.tasks:
            runs += self.headline_runs(task)
        return list(dict.fromkeys(runs + self.newclass_runs()))

    # -- phases D and E: forgetting and new classes -------------------------------------------------------------
    def newclass_data(self) -> dict[str, Path]:
        """The classification splits of the base half of the classes, and the new half's test split (the sorted
        class names, alternately); written once, with absolute image paths."""
        from mmprefix.models import loading

        folder = self.root / "classification" / "newclass-data"
        files = {name: folder / f"{name}.jsonl" for name in ("base_train", "base_val", "base_test", "new_test")}
        if all(path.is_file() for path in files.values()):
            return files
        folder.mkdir(parents=True, exist_ok=True)
        rows = {}
        for split in ("train", "val", "test"):
            path = Path(loading.data_path(f"world:classes_{split}"))
            rows[split] = [json.loads(line) for line in path.read_text().splitlines()]
            for row in rows[split]:
                row["image"] = str(path.parent / row["image"])
        classes = sorted({row["label"] for row in rows["train"]})
        base = set(classes[::2])
        for name, path in files.items():
            half, split = name.split("_")
            kept = [r for r in rows[split] if (r["label"] in base) == (half == "base")]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return files

    def newclass_runs(self) -> list[Run]:
        """Phase E: each method on the base classes at its middle budget and its config's learning rate (the grid
        of phase A runs on all the classes), three seeds."""
        if "classification" not in self.tasks:
            return []
        files = self.newclass_data()
        data = tuple(f"data.{split}.path={files[f'base_{split}']}" for split in ("train", "val", "test"))
        runs = []
        for label in self.labels["classification"]:
            rate, budget = self.grid[("classification", label)][1], self.middle("classification", label)
            runs += [Run("classification", label, budget, rate, seed, data, "newclass") for seed in SEEDS]
        return runs

    def check_jobs(self) -> list[tuple[str, list[str], Path]]:
        """(output file, command, log) of every check whose inputs are ready and that has not run."""
        jobs = []
        script = [sys.executable, str(ROOT / "benchmarks" / "checks.py")]
        for task in self.tasks:
            config = str(ROOT / (self.recipes[task][1] or f"recipes/configs/{self.recipes[task][0]}.yaml"))
            chosen = [r for label in self.labels[task] for r in self.rate_runs(task, label) if r.lr == self.rate(task, label)]
            runs = [None] + [r for r in dict.fromkeys(chosen + self.headline_runs(task)) if self.result(r)]
            for run in runs:
                out = self.root / task / "checks-base.json" if run is None else run.folder(self.root) / "checks.json"
                where = "none" if run is None else str(run.folder(self.root))
                jobs.append((out, [*script, "forgetting", "--task", task, "--config", config, "--run", where,
                                   "--out", str(out)], out.with_suffix(".log")))
        if "classification" in self.tasks:
            config = str(ROOT / "recipes/configs/classification.yaml")
            new = str(self.newclass_data()["new_test"])
            runs = [None] + [r for r in self.newclass_runs() if self.result(r)]
            for run in runs:
                out = (self.root / "classification" / "newclass-zero-shot.json" if run is None
                       else run.folder(self.root) / "newclass.json")
                where = "none" if run is None else str(run.folder(self.root))
                jobs.append((out, [*script, "newclass", "--config", config, "--run", where, "--new", new,
                                   "--out", str(out)], out.with_suffix(".log")))
        return [job for job in jobs if not job[0].is_file()]


def run_sweep(sweep: Sweep, size: int) -> None:
    """Run every pending run and check, ``size`` at a time, until none is left (finished ones are skipped)."""
    import shutil

    jobs = Jobs(size)
    failed_checks: set[str] = set()
    while True:
        jobs.reap()
        pending = []
        for out, argv, log in sweep.check_jobs():  # seconds each: before the next training run
            if str(out) not in jobs.running and str(out) not in failed_checks:
                pending.append((str(out), (argv, log)))
        for run in sweep.training_runs():
            folder = run.folder(sweep.root)
            if not sweep.finished(run) and str(folder) not in jobs.running and not busy(folder):
                pending.append((str(folder), run))
        orphans = [r for r in sweep.training_runs()
                   if str(r.folder(sweep.root)) not in jobs.running and busy(r.folder(sweep.root))]
        if not pending and not jobs.running and not orphans:
            return
        for key, job in pending:
            if not jobs.free(len(orphans)):
                break
            if isinstance(job, Run):
                shutil.rmtree(key, ignore_errors=True)  # a run stopped half-way starts again from nothing
                metric = sweep.primary[job.task]
                jobs.start(key, command(job, sweep.recipes, sweep.root), Path(key) / "run.log",
                           finish_run(job, sweep.root, metric))
            else:
                argv, log = job
                jobs.start(key, argv, log, lambda code, _s, key=key: failed_checks.add(key) if code else None)
        time.sleep(5)
