"""`PrefixService`: the frozen model(s), the prefixes served on them, one worker per model, and metrics.

What the HTTP server (``server.py``) and the Ray Serve deployment (``ray_serve.py``) share. Prefixes come from
a folder whose subfolders are ``save_prefix`` folders, each named after its subfolder (a recipe's output
folder, which holds ``prefix/``, counts too: ``out/vqa`` serves as ``vqa``). A prefix is loaded into every
served model it fits.

Each model has one worker: a `Scheduler` (``batching="step"``, the default: requests join and leave the running
batch at every decoding step) or a `Batcher` (``batching="request"``: a batch is formed once and runs to the
end). Adding, replacing and removing prefixes happen in the worker between steps (or batches): a request never
sees its prefix change or disappear under it; it finishes on the prefix it started with, while requests that
come after the change see the new one.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..core.model import check_prefix_name
from ..core.saving import detect_format, read_for
from .batcher import Batcher
from .engine import Engine, Job
from .jobs import ClientGone
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

BASE = "base"  # the model id of the frozen model without a prefix
BATCHING = ("step", "request")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Where a prefix may sit below a served entry: the entry itself, a recipe run's folder (``prefix/`` in it), or a
# recipe's task folder, whose prefix run is ``prefix/`` with its own ``prefix/`` (out/vqa -> out/vqa/prefix/prefix);
# a memory prefix's run names both ``memory/`` (out/vqa/memory/memory).
RECIPE_PLACES = ("", "prefix", "prefix/prefix", "memory", "memory/memory")


class InvalidName(ValueError):
    """A prefix name that could not name a folder safely (path separators, ``..``, dots, odd characters)."""


class UnknownPrefix(LookupError):
    """A prefix that is not served (for this task)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name == BASE:
        raise InvalidName(
            f"invalid prefix name {name!r}: use 1-64 letters, digits, '-' or '_' (no path separators, dots or "
            f"'..'), not {BASE!r}"
        )
    try:
        return check_prefix_name(name)
    except ValueError as error:
        raise InvalidName(f"invalid prefix name {name!r}: {error}") from None


def prefix_folders(root: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
    """``({name: folder}, {entry: problem})`` for the subfolders of ``root``: a prefix folder, or a recipe's output
    below it (see ``RECIPE_PLACES``); anything else is a problem, reported by name."""
    found, problems = {}, {}
    for entry in sorted(Path(root).iterdir()):
        if not entry.is_dir():
            continue
        places = [entry / place for place in RECIPE_PLACES]
        folder = next((f for f in places if (f / "prefix.safetensors").is_file()), places[0])
        try:
            check_name(entry.name)
            detect_format(folder)
        except (ValueError, OSError) as error:
            problems[entry.name] = str(error)
            continue
        found[entry.name] = folder
    return found, problems


def _stamp(folder: Path) -> tuple:
    """Changes when a file of the folder is written again (a retrained prefix saved over the old one)."""
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()))


@dataclass
class Served:
    """A prefix being served: where it was read from, and which models carry it."""

    folder: Path | None  # None: the prefix was on the model when the service started
    engines: list[str]
    stamp: tuple


class Metrics:
    """Prometheus metrics of one service, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("mmprefix_requests", "Requests by task and outcome", ["task", "outcome"], registry=r)
        self.latency = Histogram("mmprefix_request_seconds", "Time from submission to result", ["task"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("mmprefix_batch_size", "Rows per decoding step, or requests per request-level "
                                    "batch", ["model"], registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        self.batch_seconds = Histogram("mmprefix_batch_seconds", "Time to run one step or batch", ["model"], registry=r,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.queued = Gauge("mmprefix_queued_requests", "Requests waiting for a batch", ["model"], registry=r)
        self.running = Gauge("mmprefix_running_rows", "Rows decoding now (step-level batching)", ["model"], registry=r)
        self.prefixes = Gauge("mmprefix_prefixes", "Prefixes served", registry=r)


class PrefixService:
    """Serves prefixes on frozen models, batching requests per model.

    Args:
        engines: the models (each an `Engine`); the prefixes already on them are served, and a prefix from a
            folder is loaded into each one it fits.
        prefix_dir: folder of prefix folders, read now and by `rescan`.
        max_batch_size, window: see `Scheduler` and `Batcher`.
        registry: a prometheus_client registry for the metrics (a new one by default).
        batching: ``"step"`` (continuous batching, see `Scheduler`) or ``"request"`` (see `Batcher`).
    """

    def __init__(self, engines: Sequence[Engine], prefix_dir: str | Path | None = None, max_batch_size: int = 16,
                 window: float = 0.005, registry: CollectorRegistry | None = None, batching: str = "step") -> None:
        names = [engine.name for engine in engines]
        if not engines or len(set(names)) < len(names):
            raise ValueError(f"a service needs engines with distinct names, got {names}")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {list(BATCHING)}, got {batching!r}")
        self.batching = batching
        self.engines = {engine.name: engine for engine in engines}
        self.prefix_dir = Path(prefix_dir) if prefix_dir is not None else None
        self.metrics = Metrics(registry)
        self.batchers: dict[str, Scheduler | Batcher] = {}
        for engine in engines:
            observe, label = self._batch_observer(engine.name), f"mmprefix-{engine.name}"
            worker = Scheduler(engine, max_batch_size, window, observe, label) if batching == "step" else \
                Batcher(engine.run, engine.group, max_batch_size, window, observe, label)
            self.batchers[engine.name] = worker
            self.metrics.queued.labels(engine.name).set_function(lambda b=worker: b.queued)
            self.metrics.running.labels(engine.name).set_function(lambda b=worker: getattr(b, "running", 0))
            if batching == "step" and engine.stepper is None:
                logger.info("%s decodes request by request: %s", engine.name, engine.why_not_stepped)
        self.metrics.prefixes.set_function(lambda: len(self._served))
        self._lock = threading.Lock()  # orders submissions against prefix removal
        self._changing = threading.RLock()  # one prefix change (or rescan) at a time
        self._served: dict[str, Served] = {}
        self.problems: dict[str, str] = {}  # prefix folders that could not be served, and why
        for engine in engines:  # prefixes already on a model are served too
            for name in engine.model.prefixes:
                self._served.setdefault(check_name(name), Served(None, [], ())).engines.append(engine.name)
        if self.prefix_dir is not None:
            self.rescan()

    # -- requests -----------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        """Queue a job; its future gets the result. Raises at once: `InvalidName`, `UnknownPrefix`, and
        ValueError for a task no model serves or an input the model cannot take."""
        if job.prefix is not None:
            check_name(job.prefix)
        if self.batching == "request" and job.setting("temperature"):
            raise ValueError("sampling (temperature, top_p) needs step-level batching; this server batches requests "
                             "(batching='request'): use greedy decoding or beam search")
        started = time.perf_counter()
        with self._lock:
            engine = self._engine_for(job.task, job.prefix)
            future = self.batchers[engine.name].submit(job)
        future.add_done_callback(lambda f: self._observe(job.task, started, f))
        return future

    def _engine_for(self, task: str, prefix: str | None) -> Engine:
        able = [e for e in self.engines.values() if task in e.tasks]
        if not able:
            tasks = sorted({t for e in self.engines.values() for t in e.tasks})
            raise ValueError(f"no served model does {task!r}; this server does {tasks}")
        if prefix is None:
            return able[0]
        served = self._served.get(prefix)
        for engine in able:
            if served is not None and engine.name in served.engines:
                return engine
        known = sorted(n for n, s in self._served.items() if any(e.name in s.engines for e in able))
        raise UnknownPrefix(f"no prefix {prefix!r} for {task}; prefixes for {task}: {known} (and {BASE!r})")

    def engine(self, task: str, prefix: str | None = None) -> Engine:
        """The model that serves ``task`` (with ``prefix``): for input checks such as token counts."""
        with self._lock:
            return self._engine_for(task, prefix)

    def serves(self, task: str, prefix: str | None = None) -> bool:
        """Whether some model serves ``task`` with ``prefix`` (None: the base model)."""
        try:
            self.engine(task, prefix)
        except (ValueError, UnknownPrefix):
            return False
        return True

    def models(self) -> dict[str, list[str]]:
        """``{model id: tasks}``: the base model and every prefix."""
        with self._lock:
            out = {BASE: sorted({t for e in self.engines.values() for t in e.tasks})}
            for name, served in sorted(self._served.items()):
                out[name] = sorted({t for e in served.engines for t in self.engines[e].tasks})
            return out

    def batching_of(self) -> dict[str, str]:
        """How each model batches: ``"step"``, ``"request"``, or why step-level batching could not be used."""
        if self.batching == "request":
            return {name: "request" for name in self.engines}
        return {name: "step" if e.stepper is not None else f"request ({e.why_not_stepped})" for name, e in self.engines.items()}

    def _observe(self, task: str, started: float, future: Future) -> None:
        gone = future.cancelled() or isinstance(future.exception(), ClientGone)
        outcome = "cancelled" if gone else ("error" if future.exception() else "ok")
        self.metrics.requests.labels(task, outcome).inc()
        if outcome == "ok":
            self.metrics.latency.labels(task).observe(time.perf_counter() - started)

    def _batch_observer(self, name: str):
        def observe(size: int, seconds: float) -> None:
            self.metrics.batch_size.labels(name).observe(size)
            self.metrics.batch_seconds.labels(name).observe(seconds)
        return observe

    # -- prefixes -----------------------------------------------------------------------------------------
    def add(self, name: str, folder: str | Path) -> list[str]:
        """Serve the prefix in ``folder`` as ``name`` (replacing one of that name); returns the models it went
        on. Raises ValueError (and serves nothing new) when it fits no model."""
        check_name(name)
        folder = Path(folder)
        detect_format(folder)
        with self._changing:
            stamp = _stamp(folder)
            futures = {n: self.batchers[n].barrier(lambda e=e: _load(e, name, folder)) for n, e in self.engines.items()}
            wait(list(futures.values()))
            placed = [n for n, f in futures.items() if f.exception() is None]
            if not placed:
                reasons = "; ".join(f"{n}: {f.exception()}" for n, f in futures.items())
                raise ValueError(f"the prefix in {folder} fits no served model ({reasons})")
            with self._lock:
                previous = self._served.get(name)
                self._served[name] = Served(folder, placed, stamp)
                # A replacement that no longer fits a model takes the old version off it too.
                stale = [n for n in (previous.engines if previous else []) if n not in placed]
                futures = [self.batchers[n].barrier(lambda e=self.engines[n]: e.model.delete_prefix(name)) for n in stale]
            for future in futures:
                future.result()
        logger.info("serving prefix %s from %s on %s", name, folder, placed)
        return placed

    def remove(self, name: str) -> None:
        """Stop serving ``name``: new requests for it are refused at once; it leaves the model at the next step
        (rows decoding with it finish on it) or, with request-level batching, once every request accepted before
        has finished."""
        check_name(name)
        with self._changing:
            with self._lock:
                served = self._served.pop(name, None)
                if served is None:
                    raise UnknownPrefix(f"no prefix {name!r}; served: {sorted(self._served)}")
                futures = [self.batchers[n].barrier(lambda e=self.engines[n]: e.model.delete_prefix(name))
                           for n in served.engines]
            for future in futures:
                future.result()
        logger.info("stopped serving prefix %s", name)

    def rescan(self) -> dict[str, list[str] | dict[str, str]]:
        """Bring the served prefixes in line with ``prefix_dir``: new folders are added, changed ones reloaded,
        missing ones removed; folders that cannot be served are reported in ``problems`` and skipped."""
        if self.prefix_dir is None:
            raise ValueError("this service has no prefix folder to scan")
        with self._changing:
            found, problems = prefix_folders(self.prefix_dir) if self.prefix_dir.is_dir() else ({}, {})
            report: dict = {"added": [], "reloaded": [], "removed": []}
            with self._lock:
                current = dict(self._served)
            for name, served in current.items():
                if name not in found and served.folder is not None and served.folder.is_relative_to(self.prefix_dir):
                    self.remove(name)
                    report["removed"].append(name)
            for name, folder in found.items():
                served = current.get(name)
                try:
                    if served is not None and served.folder == folder and served.stamp == _stamp(folder):
                        continue
                    self.add(name, folder)
                    report["reloaded" if served is not None else "added"].append(name)
                except (ValueError, OSError) as error:
                    problems[name] = str(error)
            for name, problem in problems.items():
                logger.warning("not serving %s: %s", name, problem)
            self.problems = problems
            report["problems"] = problems
            return report

    def drain(self) -> None:
        """Refuse new requests (`Closed`); the accepted ones go on (SIGTERM: see ``server.run``)."""
        for batcher in self.batchers.values():
            batcher.drain()

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        return all(batcher.idle for batcher in self.batchers.values())

    def close(self, timeout: float | None = None) -> bool:
        """Finish every accepted request, then stop the workers."""
        return all([batcher.close(timeout) for batcher in self.batchers.values()])


def _load(engine: Engine, name: str, folder: Path) -> None:
    """Put a prefix on one model, replacing one of the same name only once the new one has been read."""
    read_for(engine.model.base_model, folder)  # raises, changing nothing, when it does not fit
    if name in engine.model.prefixes:
        engine.model.delete_prefix(name)
    engine.model.load_prefix(name, folder)
