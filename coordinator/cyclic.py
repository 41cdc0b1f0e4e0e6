"""Cyclic secure aggregation on the coordinator (`privacy.secure_aggregation: cyclic`): the round's ring, whose
turn it is, and which hop a silo may download or upload. The coordinator only relays and stores ciphertexts.

A training round's ring is its selected silos sorted by id, rotated by the round number: round r starts at silo
(r - 1) mod K, so the initiator changes every round and a restarted coordinator computes the same ring from the
round's row. Hop h (1..K) is the running sum uploaded by the ring's h-th silo (hop 1: the initiator's encrypted
weighted delta plus its mask); hop K+1 is the initiator's last upload, the sum with the mask removed, which becomes
the round's checkpoint. Hops 1..K are the round's update rows (with the silo's sample count and metrics, as in
the star mode); the uploaded hops are always a prefix of the ring, because a hop is accepted only from the silo
whose turn it is. Hop K+1 is a file beside them (`Artifacts.cycle_final_path`), accepted in the transaction that
moves the round to `aggregating`, so the database says at every moment how far the ring has got.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.store.models import Round, Silo, Update
from fedmeki_core.errors import AlreadyExistsError, InvalidInputError, PreconditionError
from fedmeki_core.records import RelayAction, RoundState


@dataclass(frozen=True)
class RelayTurn:
    """What a silo does next in a round's ring; `source` is the update row of the hop it downloads first."""

    action: RelayAction
    hop: int
    position: int
    silos: int
    source: Update | None = None


def ring(selected: Sequence[str], round_number: int) -> list[str]:
    """The round's silos in the order the running sum visits them; the first is the initiator."""
    ordered = sorted(selected)
    start = (round_number - 1) % len(ordered)
    return ordered[start:] + ordered[:start]


def relay_turn(session: Session, round_row: Round, silo_id: str) -> RelayTurn:
    order = ring(round_row.selected, round_row.number)
    silos = len(order)
    position = order.index(silo_id)
    if round_row.state in (RoundState.AGGREGATING.value, RoundState.COMMITTED.value):
        return RelayTurn(RelayAction.DONE, silos + 1, position, silos)
    if round_row.state != RoundState.TRAINING.value:
        raise PreconditionError(f"round {round_row.number} of job {round_row.job_id} is {round_row.state}")
    hops = _hops(session, round_row, order)
    done = len(hops)
    if position == 0:
        if done == 0:
            return RelayTurn(RelayAction.START, 1, position, silos)
        if done == silos:
            return RelayTurn(RelayAction.UNMASK, silos + 1, position, silos, hops[-1])
        return RelayTurn(RelayAction.WAIT, silos + 1, position, silos)
    if done > position:
        return RelayTurn(RelayAction.DONE, position + 1, position, silos)
    if done == position:
        return RelayTurn(RelayAction.ADD, position + 1, position, silos, hops[-1])
    return RelayTurn(RelayAction.WAIT, position + 1, position, silos)


def require_upload_turn(session: Session, round_row: Round, silo_id: str, silo_name: str, hop: int) -> RelayTurn:
    """The turn an upload of `hop` continues; ALREADY_EXISTS for a hop already taken, FAILED_PRECONDITION when
    it is not this silo's turn (yet)."""
    if hop < 1:
        raise InvalidInputError("a cyclic secure-aggregation round takes uploads with relay_hop 1..K+1")
    turn = relay_turn(session, round_row, silo_id)
    if turn.action == RelayAction.DONE or hop < turn.hop:
        raise AlreadyExistsError(f"hop {hop} of round {round_row.number} is already in from silo {silo_name!r}")
    if turn.action in (RelayAction.START, RelayAction.ADD, RelayAction.UNMASK) and hop == turn.hop:
        return turn
    raise PreconditionError(
        f"hop {hop} is not silo {silo_name!r}'s to upload now: it is at place {turn.position} of the ring of "
        f"round {round_row.number} and uploads hop {turn.hop} when its turn comes"
    )


def require_download_turn(session: Session, round_row: Round, silo_id: str, silo_name: str, hop: int) -> Update:
    """The update row of `hop`, which this silo must add to (ADD) or unmask (UNMASK) now."""
    turn = relay_turn(session, round_row, silo_id)
    if turn.source is None or turn.hop != hop + 1:
        raise PreconditionError(
            f"hop {hop} of round {round_row.number} is not silo {silo_name!r}'s to download now "
            f"(its next step: {turn.action.value} hop {turn.hop})"
        )
    return turn.source


def stalled_reason(session: Session, round_row: Round) -> str:
    """Why a ring did not close before the deadline: whose hop never came."""
    order = ring(round_row.selected, round_row.number)
    done = len(_hops(session, round_row, order))
    waiting = session.get(Silo, order[done % len(order)])
    what = "the unmasked sum (hop K+1)" if done == len(order) else f"hop {done + 1}"
    return (
        f"round {round_row.number}: the cyclic secure-aggregation ring stopped at hop {done} of {len(order) + 1}; "
        f"silo {waiting.name if waiting else '?'!r} never uploaded {what} before the deadline (the ring needs every "
        "selected silo)"
    )


def _hops(session: Session, round_row: Round, order: Sequence[str]) -> list[Update]:
    rows = session.scalars(
        select(Update).where(Update.job_id == round_row.job_id, Update.round_number == round_row.number)
    ).all()
    by_silo = {row.silo_id: row for row in rows}
    hops = []
    for silo_id in order:  # a prefix of the ring: hops are accepted only in turn
        if silo_id not in by_silo:
            break
        hops.append(by_silo[silo_id])
    return hops
