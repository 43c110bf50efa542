"""`Scheduler`: step-level (continuous) batching of one `Engine`, in one worker thread.

Requests join the running batch at the next decoding step and leave it the step they finish; the worker loops:

1. take what was submitted, in order: a generative request that can step becomes a `Row` holding its prefix
   store (``PrefixModel.hold``), so that it finishes on the prefix it started with whatever happens to the name;
   other requests (beam search, CLIP features, models that cannot step) wait for a request-level batch; a
   barrier (a prefix change) runs once the request-level batches submitted before it have run;
2. run the request-level batches that are due (their window has passed);
3. admit waiting rows while the running batch has room (prefill them, `decoding.Lane.admit`);
4. run one decoding step of every lane (`decoding.Lane.step`): one token for each running row.

When nothing is running, the first request waits ``window`` seconds for others to share its prefill. Rows whose
prefixes cannot share a routed call (gated and plain ones, PEFT-style prefixes that shift positions) run in
separate lanes, each stepped once per loop. ``on_batch(rows, seconds)`` is called for every step and every
request-level batch (metrics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from .batcher import Worker, _Barrier, _Waiting, run_batch, settle
from .decoding import Lane, Row
from .engine import Engine, Job
from .sampling import Finisher, Sampling

logger = logging.getLogger(__name__)


class Scheduler(Worker):
    """Step-level batching of ``engine`` (see the module docstring); the interface of `Batcher`: ``submit``,
    ``barrier``, ``queued``, ``drain``, ``close``. ``max_batch_size``: the most rows decoding at once."""

    def __init__(self, engine: Engine, max_batch_size: int = 16, window: float = 0.005,
                 on_batch: Callable[[int, float], None] | None = None, name: str = "mmprefix-scheduler") -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if window < 0:
            raise ValueError(f"window must be >= 0 seconds, got {window}")
        super().__init__(name)
        self.engine, self.max_batch_size, self.window, self._on_batch = engine, max_batch_size, window, on_batch
        self._inbox: list[_Waiting | _Barrier] = []
        self._waiting: list[tuple[Row, float]] = []  # rows to admit, with their arrival time
        self._batches: list[_Waiting] = []  # requests for request-level batches
        self._lanes: dict[Hashable, Lane] = {}
        self._thread.start()

    # -- what callers use ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        """Queue ``job``; the future gets its result. Checks (`Engine.group`) raise here, in the caller."""
        key = self.engine.group(job)
        return self._enqueue("_inbox", lambda future, number: _Waiting(job, key, future, number))

    def barrier(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` in the worker, between two steps, once every request submitted before now holds its
        prefix (or, for a request-level one, has run)."""
        return self._enqueue("_inbox", lambda future, number: _Barrier(fn, future, number))

    @property
    def queued(self) -> int:
        """Requests not yet decoding (or not yet in a request-level batch)."""
        with self._condition:
            return len(self._inbox) + len(self._waiting) + len(self._batches)

    @property
    def running(self) -> int:
        """Rows decoding now."""
        with self._condition:
            return sum(len(lane) for lane in self._lanes.values())

    @property
    def idle(self) -> bool:
        return self.queued == 0 and self.running == 0

    # -- the worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while (entries := self._take()) is not None:
            try:
                self._turn(entries)
            except Exception as error:  # noqa: BLE001 - a bug must not leave requests waiting forever
                logger.exception("the serving loop failed: the rows it held fail, it goes on")
                with self._condition:
                    rows = [row for lane in self._lanes.values() for row in lane.rows]
                    rows += [row for row, _ in self._waiting]
                    self._lanes, self._waiting = {}, []
                for row in rows:
                    row.fail(error)

    def _turn(self, entries: list[_Waiting | _Barrier]) -> None:
        for entry in entries:
            self._intake(entry)
        self._run_batches(force=self._closing)
        self._admit()
        for key, lane in list(self._lanes.items()):
            started, rows = time.perf_counter(), len(lane)
            lane.step()
            if self._on_batch is not None:
                self._on_batch(rows, time.perf_counter() - started)
            if not lane.rows:
                with self._condition:
                    del self._lanes[key]

    def _take(self) -> list[_Waiting | _Barrier] | None:
        """What was submitted since the last step, once there is something to do; None to stop."""
        with self._condition:
            while True:
                entries, self._inbox = self._inbox, []
                if entries or self._lanes:
                    return entries
                if not self._waiting and not self._batches:
                    if self._closing:
                        return None
                    self._condition.wait()
                    continue
                oldest = min([t for _, t in self._waiting] + [w.arrived for w in self._batches])
                wait = oldest + self.window - time.monotonic()
                if wait <= 0 or self._closing or len(self._waiting) >= self.max_batch_size:
                    return []
                self._condition.wait(wait)

    def _intake(self, entry: _Waiting | _Barrier) -> None:
        if isinstance(entry, _Barrier):
            self._run_batches(force=True)  # request-level work submitted before a prefix change sees the old one
            settle(entry.future, entry.fn)
            return
        job = entry.item
        if not self.engine.steps(job):
            self._batches.append(entry)
            return
        if not entry.future.set_running_or_notify_cancel():
            return  # cancelled before it started: the client left
        try:
            store = self.engine.model.hold(job.prefix)
        except ValueError as error:  # the name went between submission and now (a direct caller's race)
            entry.future.set_exception(error)
            return
        prepared = job.prepared
        finisher = Finisher(self.engine.decode_tokens, self.engine.stepper.eos, job.setting("stop", ()), prepared.limit,
                            streamed=job.on_text is not None)
        sampling = Sampling(job.setting("temperature", 0.0), job.setting("top_p", 1.0), job.setting("seed"))
        with self._condition:
            self._waiting.append((Row(job, entry.future, store, prepared, sampling, finisher), entry.arrived))

    def _run_batches(self, force: bool) -> None:
        """Request-level batches whose window has passed (all of them with ``force``), a group at a time."""
        now = time.monotonic()
        while self._batches:
            first = self._batches[0]
            group = [w for w in self._batches if w.key == first.key][: self.max_batch_size]
            if not force and first.arrived + self.window > now and len(group) < self.max_batch_size:
                return
            with self._condition:
                self._batches = [w for w in self._batches if all(w is not g for g in group)]
            run_batch(self.engine.run, group, self._on_batch)

    def _admit(self) -> None:
        """Prefill waiting rows while the running batch has room; rows of one lane and input kind together."""
        with self._condition:
            room = self.max_batch_size - sum(len(lane) for lane in self._lanes.values())
            if room <= 0 or not self._waiting:
                return
            oldest = self._waiting[0][1]
            if not self._lanes and not self._closing and len(self._waiting) < room \
                    and oldest + self.window > time.monotonic():
                return  # idle: the first request waits its window for others to share its prefill
            taken, self._waiting = [row for row, _ in self._waiting[:room]], self._waiting[room:]
        groups: dict[Hashable, list[Row]] = {}
        for row in taken:
            lane = self._lane_for(row)
            groups.setdefault((lane, row.prepared.group), []).append(row)
        for (lane, _), rows in groups.items():
            with self._condition:
                target = self._lanes.setdefault(lane, Lane(self.engine.stepper))
            target.admit(rows)
            if not target.rows:
                with self._condition:
                    del self._lanes[lane]

    def _lane_for(self, row: Row) -> Hashable:
        """Rows without a prefix join the biggest lane they can share a call with (a closed gate, or no
        prefix, leaves the base model exact); a prefix that shifts positions has a lane of its own."""
        store = row.store
        if store is not None and store.config.position_offset:
            return ("offset", id(store))
        if store is not None:
            return "gated" if store.config.gate is not None else "plain"
        open_lanes = [k for k in self._lanes if k in ("plain", "gated")]
        return max(open_lanes, key=lambda k: len(self._lanes[k]), default="plain")
