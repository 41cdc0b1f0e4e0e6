"""The transition table of jobs, rounds and injections on its own: every row, every forbidden edge, no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import round_table
from coordinator.round_table import (
    TABLE,
    Effect,
    Event,
    Facts,
    InjectionState,
    Reason,
    Rule,
    State,
    allowed,
    decide,
    render,
)
from fedmeki_core.errors import PreconditionError
from fedmeki_core.records import JobState, RoundKind, RoundState

_TRAINING = Facts(min_silos=2, selected=3)
_CYCLIC = Facts(cyclic=True, min_silos=2, selected=3, updates=3)
_TRAINING_LATE_SHORT = Facts(min_silos=2, selected=3, updates=1, deadline_passed=True)
_EVALUATING = Facts(kind=RoundKind.EVALUATE, min_silos=2, selected=3)

# (state, event, facts, the target the table must choose); one case at least for every row.
FIRING: list[tuple[State, Event, Facts, State]] = [
    (JobState.PENDING, Event.TICK, Facts(), JobState.RUNNING),
    (JobState.PENDING, Event.CANCEL, Facts(), JobState.CANCELLED),
    (JobState.RUNNING, Event.TICK, Facts(injection_overdue=True, final_committed=True), JobState.FAILED),
    (JobState.RUNNING, Event.TICK, Facts(final_committed=True), JobState.COMPLETED),
    (JobState.RUNNING, Event.CANCEL, Facts(), JobState.CANCELLED),
    (JobState.RUNNING, Event.FAIL, Facts(), JobState.FAILED),
    (JobState.RUNNING, Event.ABORT, Facts(), JobState.FAILED),
    (RoundState.OPEN, Event.TICK, Facts(eligible=2, min_silos=2), RoundState.TRAINING),
    (RoundState.OPEN, Event.TICK, Facts(eligible=2, min_silos=2, deadline_passed=True), RoundState.TRAINING),
    (RoundState.OPEN, Event.TICK, Facts(eligible=1, min_silos=2, deadline_passed=True), RoundState.FAILED),
    (RoundState.OPEN, Event.TICK, Facts(eligible=5, uncovered=1, deadline_passed=True), RoundState.FAILED),
    (RoundState.OPEN, Event.FAIL, Facts(), RoundState.FAILED),
    (RoundState.TRAINING, Event.TICK, Facts(cyclic=True, deadline_passed=True, selected=3), RoundState.FAILED),
    (RoundState.TRAINING, Event.TICK, Facts(kind=RoundKind.EVALUATE, selected=3, updates=3), RoundState.COMMITTED),
    (RoundState.TRAINING, Event.TICK, Facts(kind=RoundKind.EVALUATE, deadline_passed=True), RoundState.COMMITTED),
    (
        RoundState.TRAINING,
        Event.TICK,
        Facts(kind=RoundKind.EVALUATE, cyclic=True, deadline_passed=True),
        RoundState.COMMITTED,
    ),
    (
        RoundState.TRAINING,
        Event.TICK,
        Facts(min_silos=2, selected=3, updates=1, deadline_passed=True),
        RoundState.FAILED,
    ),
    (RoundState.TRAINING, Event.TICK, Facts(min_silos=2, selected=3, updates=3), RoundState.AGGREGATING),
    (
        RoundState.TRAINING,
        Event.TICK,
        Facts(min_silos=2, selected=3, updates=2, deadline_passed=True),
        RoundState.AGGREGATING,
    ),
    (RoundState.TRAINING, Event.RING_CLOSED, _CYCLIC, RoundState.AGGREGATING),
    (RoundState.TRAINING, Event.FAIL, Facts(), RoundState.FAILED),
    (RoundState.AGGREGATING, Event.AGGREGATED, Facts(), RoundState.COMMITTED),
    (RoundState.AGGREGATING, Event.FAIL, Facts(), RoundState.FAILED),
    (InjectionState.PENDING, Event.REPORTED, Facts(), InjectionState.DONE),
    (InjectionState.PENDING, Event.FAIL, Facts(), InjectionState.FAILED),
]

# (state, event, facts): the edge exists, but nothing holds yet: the state stays.
WAITING: list[tuple[State, Event, Facts]] = [
    (JobState.RUNNING, Event.TICK, Facts()),
    (JobState.RUNNING, Event.TICK, Facts(final_committed=True, injections_pending=1)),
    (RoundState.OPEN, Event.TICK, Facts(eligible=1, min_silos=2)),
    (RoundState.OPEN, Event.TICK, Facts(eligible=3, min_silos=2, uncovered=1)),
    (RoundState.TRAINING, Event.TICK, _TRAINING),
    (RoundState.TRAINING, Event.TICK, Facts(min_silos=2, selected=3, updates=2)),
    (RoundState.TRAINING, Event.TICK, _CYCLIC),  # every hop in: only the unmasked sum closes a ring
    (RoundState.TRAINING, Event.TICK, _EVALUATING),
    (InjectionState.PENDING, Event.REPORTED, Facts(earlier_injection_pending=True)),
]


@pytest.mark.parametrize(("state", "event", "facts", "target"), FIRING)
def test_the_table_moves_a_state_where_its_guard_holds(state: State, event: Event, facts: Facts, target: State) -> None:
    rule = decide(state, event, facts)
    assert rule is not None
    assert (rule.state, rule.event, rule.target) == (state, event, target)


@pytest.mark.parametrize(("state", "event", "facts"), WAITING)
def test_the_state_stays_while_no_guard_holds(state: State, event: Event, facts: Facts) -> None:
    assert allowed(state, event)
    assert decide(state, event, facts) is None


def test_every_row_is_exercised() -> None:
    fired = {id(decide(state, event, facts)) for state, event, facts, _ in FIRING}
    assert [rule for rule in TABLE if id(rule) not in fired] == []


def _edges_without_rows() -> list[tuple[State, Event]]:
    return [(state, event) for state in round_table.STATES for event in Event if not allowed(state, event)]


@pytest.mark.parametrize(("state", "event"), _edges_without_rows())
def test_a_forbidden_edge_is_refused(state: State, event: Event) -> None:
    with pytest.raises(PreconditionError, match=f"cannot take the event '{event.value}'"):
        decide(state, event, Facts(eligible=9, updates=9, deadline_passed=True, final_committed=True))


def test_finished_states_take_no_event() -> None:
    finished = [s for s in round_table.STATES if s in (*[j for j in JobState if j.finished], "committed", "done")]
    assert {rule.state for rule in TABLE}.isdisjoint(finished)
    assert len(_edges_without_rows()) == len(round_table.STATES) * len(Event) - len({(r.state, r.event) for r in TABLE})


def test_a_row_that_fails_a_job_says_why() -> None:
    failing: list[Rule] = [
        r for r in TABLE if r.event is Event.TICK and r.target in (JobState.FAILED, RoundState.FAILED)
    ]
    assert {r.reason for r in failing} == set(Reason)
    assert all(Effect.FAIL_JOB in r.effects or r.target is JobState.FAILED for r in failing)


def test_the_printed_table_has_a_line_per_row() -> None:
    printed = render()
    assert len(printed.strip().splitlines()) == len(TABLE) + 2
    assert "| round | open | tick | enough eligible silos cover every task | training |" in printed


def test_the_architecture_page_shows_the_table_as_printed() -> None:
    page = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    shown = page.split("<!-- round-table -->\n", 1)[1].split("\n<!-- /round-table -->", 1)[0]
    assert shown == render(), "docs/architecture.md: paste `python -m coordinator.round_table` between the markers"
