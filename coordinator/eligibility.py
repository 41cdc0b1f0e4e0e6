"""Which silos a job's open round could select now, for the driver (to select them) and for the job's status (to
say what a waiting round waits for): the same rule in one place."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.store.models import Silo
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.tasks import training_tasks


class Eligibility:
    """A silo is eligible when it is enrolled, not revoked, a trainer, has polled within `liveness_seconds`, is
    among the job's named silos (if it names any) and holds data for at least one of its training tasks (a
    hospital may hold some of a suite's tasks)."""

    def __init__(self, liveness_seconds: float, clock: Callable[[], datetime]) -> None:
        self._liveness = timedelta(seconds=liveness_seconds)
        self._now = clock

    def silos(self, session: Session, spec: JobSpec, now: datetime | None = None) -> tuple[list[Silo], list[str]]:
        """The eligible silos, and the training tasks none of them holds (a round waits until every one is)."""
        seen_after = (now or self._now()) - self._liveness
        query = select(Silo).where(
            Silo.enrolled_at.is_not(None), ~Silo.revoked, Silo.last_seen_at >= seen_after, Silo.role == "trainer"
        )
        if spec.silos:
            query = query.where(Silo.name.in_(spec.silos))
        needed = training_tasks(spec.task)
        silos = [silo for silo in session.scalars(query) if set(needed) & set(silo.tasks)]
        held = {task for silo in silos for task in silo.tasks}
        return silos, [task for task in needed if task not in held]

    def names(self, session: Session, spec: JobSpec) -> tuple[str, ...]:
        return tuple(sorted(silo.name for silo in self.silos(session, spec)[0]))
