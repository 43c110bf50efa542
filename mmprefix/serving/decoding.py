"""The rows of step-level batching: `Row` (one request being generated) and `Lane` (a running batch of rows
with its cache, stepped one token at a time).

A lane admits rows at any step: their prompts are prefilled apart (rows of one kind together, padded and
masked), then their caches join the lane's (`cache_rows.merge`). Each step feeds every row its last token at its own position,
routed to its own prefix store, picks each row's next token (`sampling.next_tokens`), streams what became final,
and retires finished rows at once; the cache of the rows that stay is kept. A failure is confined to the rows
that cause it: a step or prefill that raises is retried row by row, and only the rows that fail alone fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.store import PrefixStore
from .cache_rows import CacheRows, merge
from .inputs import Prepared
from .jobs import ClientGone, Completion, Job, notify
from .sampling import Finisher, Sampling, next_tokens

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One request being generated: its job and future, the prefix store it holds (it keeps decoding with it
    even if its name is removed or replaced meanwhile), its inputs, sampling and text so far."""

    job: Job
    future: Future
    store: PrefixStore | None
    prepared: Prepared
    sampling: Sampling
    finisher: Finisher
    position: int = 0  # the position id of the row's next input token
    listener: Callable[[str], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.listener = self.job.on_text

    def push(self, token: int) -> bool:
        """Take the row's next token and stream what became final; True once the row has finished."""
        self.finisher.push(token)
        if self.listener is not None:
            piece = self.finisher.piece()
            if piece and not notify(self.listener, piece, id(self)):
                self.listener = None
        return self.finisher.finish_reason is not None

    def complete(self) -> None:
        finisher = self.finisher
        self.future.set_result(Completion(finisher.text, finisher.finish_reason, self.prepared.prompt_tokens,
                                          len(finisher.tokens)))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Lane:
    """A running batch: rows, and their cache (``stepper``: see ``steppers.py``)."""

    def __init__(self, stepper: Any) -> None:
        self.stepper = stepper
        self.rows: list[Row] = []
        self.cache: CacheRows | None = None

    def __len__(self) -> int:
        return len(self.rows)

    # -- joining ----------------------------------------------------------------------------------------------
    def admit(self, rows: Sequence[Row]) -> None:
        """Prefill ``rows`` (of one `inputs.Prepared.group`) and keep those that go on decoding."""
        try:
            logits, cache, positions = self.stepper.prefill([r.prepared.inputs for r in rows], [r.store for r in rows])
        except Exception as error:  # noqa: BLE001 - find the rows that fail alone
            if len(rows) == 1:
                logger.exception("prefilling a request failed")
                rows[0].fail(error)
                return
            for row in rows:
                self.admit([row])
            return
        for row, position in zip(rows, positions):
            row.sampling.start(logits.device)
            row.position = position
        self._advance(rows, logits, cache)

    # -- stepping ---------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One token for every row (rows whose client left go first)."""
        gone = [i for i, row in enumerate(self.rows) if row.job.cancelled.is_set()]
        for i in gone:
            self.rows[i].fail(ClientGone("the client went away"))
        if gone:
            self._keep([i for i in range(len(self.rows)) if i not in gone])
        if not self.rows:
            return
        rows, cache = self.rows, self.cache
        try:
            logits, cache = self._step(rows, cache)
        except Exception:  # noqa: BLE001 - step the rows one by one: only those that fail alone fail
            if len(rows) == 1:
                logger.exception("a decoding step failed")
            self._isolate()
            return
        self.rows, self.cache = [], None
        self._advance(rows, logits, cache)

    def _step(self, rows: Sequence[Row], cache: CacheRows) -> tuple[torch.Tensor, CacheRows]:
        device = cache.mask.device
        tokens = torch.tensor([row.finisher.tokens[-1] for row in rows], device=device)
        positions = torch.tensor([row.position for row in rows], device=device)
        logits, cache = self.stepper.step(tokens, positions, cache, [row.store for row in rows])
        for row in rows:
            row.position += 1
        return logits, cache

    def _isolate(self) -> None:
        rows, cache = self.rows, self.cache
        self.rows, self.cache = [], None
        for i, row in enumerate(rows):
            alone = cache.select([i])
            try:
                logits, alone = self._step([row], alone)
            except Exception as error:  # noqa: BLE001
                logger.exception("a decoding step failed for one row; the others go on")
                row.fail(error)
                continue
            self._advance([row], logits, alone)

    def _advance(self, rows: Sequence[Row], logits: torch.Tensor, cache: CacheRows) -> None:
        """Give each row its next token from ``logits``; finished rows leave, the others join the lane."""
        try:
            tokens = next_tokens(logits, [row.sampling for row in rows])
        except Exception:  # noqa: BLE001 - a row whose sampling fails (non-finite logits) fails alone
            tokens = [self._token(logits[i : i + 1], row) for i, row in enumerate(rows)]
        staying = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if token is None:
                continue
            if row.push(token):
                row.complete()
            elif row.job.cancelled.is_set():
                row.fail(ClientGone("the client went away"))
            else:
                staying.append(i)
        if staying:
            kept = cache if len(staying) == len(rows) else cache.select(staying)
            self.rows += [rows[i] for i in staying]
            self.cache = kept if self.cache is None else merge([self.cache, kept])

    @staticmethod
    def _token(logits: torch.Tensor, row: Row) -> int | None:
        try:
            return next_tokens(logits, [row.sampling])[0]
        except Exception as error:  # noqa: BLE001
            logger.exception("choosing a token failed for one row")
            row.fail(error)
            return None

    def _keep(self, indices: list[int]) -> None:
        self.rows = [self.rows[i] for i in indices]
        self.cache = self.cache.select(indices) if indices else None
