"""GroupCommit: writes made by many threads at once share one transaction, and each writer returns only once its
write is committed.

Many calls each add a few independent rows (an audit row; an accepted update's row and its audit row): one
transaction, and on SQLite one write lock and one commit, per call makes them queue behind each other's commits
(and, under the scheduler's lock, every other writer behind them). Here the first writer to find no commit in
progress commits every write waiting at that moment (its own included) in one transaction; writers arriving
meanwhile wait for the next such commit, which one of them leads. No writer returns before its rows are durable, so
nothing is lost that a caller was told had happened; a failed commit raises in every writer of its batch, and a
writer's own refusal (its checks, `prepare`) in that writer alone. No thread of its own: the writers take turns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session

from coordinator.store.database import Database
from coordinator.store.models import Base

T = TypeVar("T")

# A write: reads and checks in the batch's session (raising refuses this write alone), then the rows to add and
# what the writer gets back. It must not change the session itself: a refused write leaves nothing behind.
Prepare = Callable[[Session], tuple[Sequence[Base], T]]


@dataclass
class _Ticket(Generic[T]):
    prepare: Prepare[T]
    done: bool = False
    result: T | None = None
    error: BaseException | None = None


class GroupCommit:
    """`lock`, when given, is held around each batch's transaction (the scheduler's, for writes that check and
    change round state); a writer must not hold it when it calls in."""

    def __init__(self, database: Database, lock: AbstractContextManager[Any] | None = None) -> None:
        self._database = database
        self._lock = lock if lock is not None else nullcontext()
        self._changed = threading.Condition()
        self._waiting: list[_Ticket[Any]] = []
        self._committing = False

    def add(self, row: Base) -> None:
        """Insert `row`; return once it is committed (with the rows of other writers that came meanwhile)."""
        self.write(lambda _session: ((row,), None))

    def write(self, prepare: Prepare[T]) -> T:
        """Commit the rows `prepare` returns, in a transaction shared with the writers that came meanwhile; return
        what it returned, or raise what it raised (nothing of this write is committed then)."""
        ticket: _Ticket[T] = _Ticket(prepare)
        with self._changed:
            self._waiting.append(ticket)
            while self._committing and not ticket.done:
                self._changed.wait()
            if ticket.done:  # another writer's commit took it
                return self._outcome(ticket)
            batch, self._waiting = self._waiting, []
            self._committing = True
        error: BaseException | None = None
        try:
            with self._lock, self._database.transaction() as session:
                for waiting in batch:
                    try:
                        rows, waiting.result = waiting.prepare(session)
                    except Exception as exc:  # this writer's refusal: the others' rows still commit
                        waiting.error = exc
                        continue
                    session.add_all(rows)
        except BaseException as exc:
            error = exc
        with self._changed:
            for waiting in batch:
                waiting.done = True
                if error is not None:
                    waiting.error = error
            self._committing = False
            self._changed.notify_all()
        return self._outcome(ticket)

    @staticmethod
    def _outcome(ticket: _Ticket[T]) -> T:
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]  # set by a successful prepare
