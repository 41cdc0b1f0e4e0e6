"""Which of a silo's jobs it is handed next: round robin between the running jobs that selected it.

Oldest-first let one job hold a silo for as long as its round stayed open (a round the silo kept failing, or a
job whose rounds follow each other at once), starving every younger job that selected the same silo. Here each
silo remembers the last job it was handed, and its next task comes from the first job after that one in
submission order, wrapping around: a silo with work in jobs A and B gets A, B, A, B, ... In memory only: after a
restart each silo starts again from the oldest job, which is fair from then on.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

JobKey = tuple[datetime, str]  # (created_at, id): the submission order, unique
T = TypeVar("T")


class FairShare:
    def __init__(self) -> None:
        self._last: dict[str, JobKey] = {}  # silo id -> the job it was handed last
        self._lock = threading.Lock()

    def order(self, silo_id: str, candidates: Sequence[tuple[JobKey, T]]) -> list[T]:
        """`candidates` (each with its job's key) in the order this silo should be offered them: the jobs after
        the one it was handed last first, then the rest from the oldest."""
        with self._lock:
            last = self._last.get(silo_id)
        ranked = sorted(candidates, key=lambda candidate: candidate[0])
        if last is None:
            return [item for _, item in ranked]
        after = [item for key, item in ranked if key > last]
        return after + [item for key, item in ranked if key <= last]

    def handed(self, silo_id: str, job: JobKey) -> None:
        with self._lock:
            self._last[silo_id] = job
