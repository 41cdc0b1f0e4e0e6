"""Tidying the data directory at start: the files a killed coordinator left that no row will ever need again.

A round's commit is one transaction; the files it makes obsolete (the round's spooled updates, the previous server
state, checkpoints past the retention) are removed after it, so a crash in between leaves them behind. Half-received
uploads are cleared by `Artifacts.clear_incoming`; this handles the rest, from what the database says.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import select

from coordinator.artifacts import Artifacts
from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Job, Round
from fedmeki_core.records import RoundState

logger = logging.getLogger(__name__)

_NUMBERED = re.compile(r"(round|server-state)-(\d{5})\.")


def tidy(database: Database, artifacts: Artifacts, keep_updates: bool) -> None:
    """Recycle update files of committed rounds (unless kept), checkpoint files without a row or never finished,
    and delete server states older than their job's current checkpoint (the next aggregation reads the current
    one's). Runs before the scheduler starts: no writer is at work."""
    with database.read() as session:
        done = select(Round.job_id, Round.number).where(Round.state == RoundState.COMMITTED.value)
        committed = [(job_id, number) for job_id, number in session.execute(done)]
        recorded = set(session.scalars(select(Checkpoint.path)))
        current = {job_id: number for job_id, number in session.execute(select(Job.id, Job.current_round))}
    if not keep_updates:
        for job_id, number in committed:
            artifacts.drop_round_updates(job_id, number)
    for job_id, current_round in current.items():
        directory = artifacts.checkpoint_path(job_id, 0).parent
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):  # an atomic write the crash interrupted
                artifacts.recycle(path)
                continue
            match = _NUMBERED.match(path.name)
            if match is None:
                continue  # a CKKS job's public context
            kind, number = match.group(1), int(match.group(2))
            if kind == "round" and artifacts.relative(path) not in recorded:
                logger.info("recycling %s: no checkpoint row refers to it", artifacts.relative(path))
                artifacts.recycle(path)
            elif kind == "server-state" and number < current_round:
                path.unlink()
