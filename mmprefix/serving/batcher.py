"""`Batcher`: requests that arrive within a short window are merged into one batch, run by one worker thread.

Generic: what a request is and how a batch runs belong to the caller (`mmprefix.serving.engine`). Requests
with the same group key (same task and generation settings) can share a batch; the batch that runs next is
the group of the oldest waiting request, once that request has waited ``window`` seconds or its group is full.
Each request gets a `concurrent.futures.Future`; an exception raised by one batch fails that batch's requests
only. A request whose future was cancelled before its batch starts (a client that went away) is dropped.

``barrier(fn)`` runs ``fn`` in the worker after every request submitted before it has finished: changes to
the model (adding or removing a prefix) happen between batches and never under a request that was accepted
before them.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class _Waiting:
    item: Any
    key: Hashable
    future: Future
    number: int
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Barrier:
    fn: Callable[[], Any]
    future: Future
    number: int


class Closed(RuntimeError):
    """The batcher has stopped and takes no more requests."""


class Worker:
    """What both batching modes share: a worker thread running ``_loop`` (started by the subclass), a condition
    guarding the queues, and queues that take nothing more once `drain` or `close` is called."""

    def __init__(self, name: str) -> None:
        self._numbers = itertools.count()
        self._condition = threading.Condition()
        self._closing = False
        self._refusing = False  # drain(): no new items, the accepted ones go on
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _enqueue(self, queue: str, make: Callable[[Future, int], Any]) -> Future:
        """Append ``make(future, number)`` to the list named ``queue`` (numbers order everything submitted); its
        future. The list is looked up under the lock: the worker replaces its queues when it takes from them, and
        an item appended to a list it has already taken would never run."""
        future: Future = Future()
        with self._condition:
            if self._refusing:
                raise Closed("the server is shutting down and takes no new requests")
            getattr(self, queue).append(make(future, next(self._numbers)))
            self._condition.notify_all()
        return future

    def drain(self) -> None:
        """Take no new items (`submit` raises `Closed`); the accepted ones go on."""
        with self._condition:
            self._refusing = True

    def close(self, timeout: float | None = None) -> bool:
        """Take no new items, finish every accepted one (and pending barriers), stop the worker. True when
        the worker stopped within ``timeout``."""
        with self._condition:
            self._closing = self._refusing = True
            self._condition.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        raise NotImplementedError


class Batcher(Worker):
    """Merges items into batches and runs them one at a time in a worker thread.

    Args:
        run: runs one batch: a list of items (all with the same group key) to one result per item, in order.
        group: an item's group key; only items with equal keys share a batch.
        max_batch_size: the most items in one batch.
        window: seconds the oldest waiting item waits for others to join its batch (0: run at once).
        on_batch: called after each batch with its size and its run time in seconds (for metrics).
        name: the worker thread's name.
    """

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        group: Callable[[Any], Hashable] = lambda item: None,
        max_batch_size: int = 16,
        window: float = 0.005,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "mmprefix-batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if window < 0:
            raise ValueError(f"window must be >= 0 seconds, got {window}")
        super().__init__(name)
        self._run, self._group, self._on_batch = run, group, on_batch
        self.max_batch_size, self.window = max_batch_size, window
        self._waiting: list[_Waiting] = []
        self._barriers: list[_Barrier] = []
        self._busy = False
        self._thread.start()

    # -- what callers use ---------------------------------------------------------------------------------
    def submit(self, item: Any) -> Future:
        """Queue ``item``; the future gets its result (or the exception of its batch)."""
        key = self._group(item)  # raises here, in the caller, for an item that cannot be grouped
        return self._enqueue("_waiting", lambda future, number: _Waiting(item, key, future, number))

    def barrier(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` in the worker once every item submitted before now has finished; its future gets
        what ``fn`` returns or raises."""
        return self._enqueue("_barriers", lambda future, number: _Barrier(fn, future, number))

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not counting the batch that runs)."""
        with self._condition:
            return len(self._waiting)

    @property
    def idle(self) -> bool:
        """Nothing waiting and no batch running."""
        with self._condition:
            return not self._waiting and not self._barriers and not self._busy

    # -- the worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            work = self._next()
            if work is None:
                return
            if isinstance(work, _Barrier):
                settle(work.future, work.fn)
            else:
                run_batch(self._run, work, self._on_batch)
            with self._condition:
                self._busy = False

    def _next(self) -> _Barrier | list[_Waiting] | None:
        """The next barrier that is due, or the next batch; None when closing and nothing is left."""
        with self._condition:
            while True:
                oldest = min((w.number for w in self._waiting), default=None)
                for barrier in self._barriers:
                    if oldest is None or barrier.number < oldest:
                        self._barriers.remove(barrier)
                        self._busy = True
                        return barrier
                if not self._waiting:
                    if self._closing:
                        return None
                    self._condition.wait()
                    continue
                first = self._waiting[0]
                group = [w for w in self._waiting if w.key == first.key]
                wait = first.arrived + self.window - time.monotonic()
                if len(group) >= self.max_batch_size or wait <= 0 or self._closing:
                    batch = group[: self.max_batch_size]
                    taken = {id(w) for w in batch}
                    self._waiting = [w for w in self._waiting if id(w) not in taken]
                    self._busy = True
                    return batch
                self._condition.wait(wait)



def run_batch(run: Callable[[list[Any]], Sequence[Any]], batch: Sequence[_Waiting],
              on_batch: Callable[[int, float], None] | None) -> None:
    """Run one batch: its live items (a cancelled future is a client that left) get their results, or all of
    them the batch's exception."""
    live = [w for w in batch if w.future.set_running_or_notify_cancel()]
    if not live:
        return
    started = time.perf_counter()
    try:
        results = list(run([w.item for w in live]))
        if len(results) != len(live):
            raise RuntimeError(f"a batch of {len(live)} requests gave {len(results)} results")
    except BaseException as error:  # noqa: BLE001 - the batch's requests get it, the worker goes on
        logger.exception("a batch of %d requests failed", len(live))
        for waiting in live:
            waiting.future.set_exception(error)
    else:
        for waiting, result in zip(live, results):
            waiting.future.set_result(result)
    if on_batch is not None:
        on_batch(len(live), time.perf_counter() - started)


def settle(future: Future, fn: Callable[[], Any]) -> None:
    """Run a barrier's ``fn`` into its future."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as error:  # noqa: BLE001
        future.set_exception(error)
