"""Named crash points: a testing seam that SIGKILLs the process at a chosen point of a round.

`FEDMEKI_CRASH_AT=NAME` (or `NAME@N`: the N-th time the point is reached, default the first) makes the process
that reaches `crash_point(NAME)` kill itself with SIGKILL, as a power cut would: no handler, no flush, no
cleanup. The variable is read once, at import; without it a crash point costs one string comparison. The points
and what recovery does at each are listed in docs/architecture.md, "Durability and restart";
tests/test_crash_recovery.py kills the coordinator and the silo agent at every one of them.
"""

from __future__ import annotations

import os
import signal

CRASH_AT_ENV = "FEDMEKI_CRASH_AT"

COORDINATOR_POINTS = (
    "coordinator.round_opened",  # a round's silos are selected and committed; no task handed out yet
    "coordinator.mid_download",  # after a chunk of a silo's checkpoint download is sent
    "coordinator.mid_upload",  # after a chunk of an update is spooled
    "coordinator.update_durable",  # an update's file and row are committed, its receipt not sent
    "coordinator.mid_aggregation",  # after an update is folded into the round's sum at aggregation
    "coordinator.checkpoint_written",  # the new checkpoint file is in place, the round not committed
    "coordinator.round_committed",  # right after the transaction that commits the round
)
SILO_POINTS = (
    "silo.mid_training",  # after an optimiser step
    "silo.mid_upload",  # after a chunk of the delta is handed to the stream
    "silo.before_ack",  # the coordinator's receipt has arrived, the agent has not recorded it
)
POINTS = frozenset(COORDINATOR_POINTS + SILO_POINTS)


def _target(value: str) -> tuple[str, int]:
    name, _, count = value.partition("@")
    if name not in POINTS:
        raise ValueError(f"{CRASH_AT_ENV}={value!r}: no crash point {name!r}; known: {', '.join(sorted(POINTS))}")
    return name, int(count) if count else 1


_TARGET, _REMAINING = _target(os.environ[CRASH_AT_ENV]) if os.environ.get(CRASH_AT_ENV) else ("", 0)


def crash_point(name: str) -> None:
    """SIGKILL this process if `FEDMEKI_CRASH_AT` names this point and this is the time it counts to."""
    global _REMAINING
    if name != _TARGET:
        return
    _REMAINING -= 1
    if _REMAINING == 0:
        os.kill(os.getpid(), signal.SIGKILL)
