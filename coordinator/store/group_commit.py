"""GroupCommit: rows written by many threads at once share one transaction, and each writer returns only once its
row is committed.

Many calls each add one independent row (an audit row): one transaction, and on SQLite one write lock and one
commit, per row makes them queue behind each other's commits. Here the first writer to find no commit in progress
commits every row waiting at that moment (its own included) in one transaction; writers arriving meanwhile wait
for the next such commit, which one of them leads. No writer returns before its row is durable, so nothing is
lost that a caller was told had happened; a failed commit raises in every writer of its batch. No thread of its
own: the writers take turns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from coordinator.store.database import Database
from coordinator.store.models import Base


@dataclass
class _Ticket:
    row: Base
    done: bool = False
    error: BaseException | None = None


class GroupCommit:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._changed = threading.Condition()
        self._waiting: list[_Ticket] = []
        self._committing = False

    def add(self, row: Base) -> None:
        """Insert `row`; return once it is committed (with the rows of other writers that came meanwhile)."""
        ticket = _Ticket(row)
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
            with self._database.transaction() as session:
                session.add_all([waiting.row for waiting in batch])
        except BaseException as exc:
            error = exc
        with self._changed:
            for waiting in batch:
                waiting.done, waiting.error = True, error
            self._committing = False
            self._changed.notify_all()
        return self._outcome(ticket)

    @staticmethod
    def _outcome(ticket: _Ticket) -> None:
        if ticket.error is not None:
            raise ticket.error
