"""The one transition table of jobs, rounds and injections: `(state, event) -> guard, target, effects`, pure.

The scheduler loads the facts of a moment (`Facts`), asks `decide(state, event, facts)` and applies the row's
effects in one transaction; nothing here reads a database or a file. A `(state, event)` pair with no row is a
forbidden edge (`PreconditionError`); a pair whose rows' guards all fail leaves the state as it is (`None`).
Rows are tried in order: the first whose guard holds is the transition.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from fedmeki_core.errors import PreconditionError
from fedmeki_core.records import JobState, RoundKind, RoundState


class InjectionState(enum.StrEnum):
    """An injection of one checkpoint by the injector silo (coordinator/injections.py)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


State = JobState | RoundState | InjectionState


class Event(enum.StrEnum):
    TICK = "tick"  # the scheduler's periodic look, with the facts of the moment
    CANCEL = "cancel"  # a researcher or admin cancels the job
    FAIL = "fail"  # the job fails: its round or an injection cannot go on (the reason travels with the effect)
    ABORT = "abort"  # a selected silo declines its round with a reason (an unusable CKKS aggregate, a budget, a base)
    RING_CLOSED = "ring closed"  # the initiator's unmasked sum (hop K+1) of a cyclic round is in
    AGGREGATED = "aggregated"  # the next checkpoint is written: the round commits
    REPORTED = "reported"  # the injector reports the scores of a checkpoint


class Effect(enum.StrEnum):
    OPEN_FIRST_ROUND = "open round 1"
    OPEN_NEXT_ROUND = "open the next round (train, or evaluate after the last)"
    QUEUE_INJECTION = "queue the injection of the checkpoint"
    QUEUE_EVALUATION = "queue the evaluator's score of the checkpoint"
    SELECT_SILOS = "select the eligible silos, restart the deadline"
    RECORD_METRICS = "record the sample-weighted mean of the reports"
    EXPIRE_CHECKPOINTS = "expire checkpoints beyond the retention"
    NOTE_NO_EVALUATION = "note on the job when no silo reported the evaluation"
    FAIL_JOB = "fail the job (event fail)"
    FAIL_OPEN_ROUND = "fail the job's round if it may still fail"
    FAIL_INJECTIONS = "fail the job's pending injections (event fail)"
    FORGET_SUMS = "forget the job's running sums"
    DROP_PARTIALS = "drop the round's partial uploads"
    COMPLETE_WHEN_INJECTED = "complete the job once no injection is pending (event tick)"
    STORE_SCORES = "store the injector's scores"


class Reason(enum.StrEnum):
    """Why a row fails a job; the scheduler words it with what it loaded."""

    NO_ELIGIBLE_SILOS = "too few eligible silos before the deadline"
    TOO_FEW_UPDATES = "too few updates before the deadline"
    RING_STALLED = "the cyclic ring stopped before the deadline"
    INJECTION_OVERDUE = "an injection was not reported before its deadline"


@dataclass(frozen=True)
class Facts:
    """What the scheduler knows of a job and its current round at one moment (all plain values)."""

    kind: RoundKind = RoundKind.TRAIN
    cyclic: bool = False  # the job uses cyclic secure aggregation
    eligible: int = 0  # live trainers holding data for the job's tasks
    uncovered: int = 0  # training tasks no eligible silo holds
    min_silos: int = 1
    selected: int = 0
    updates: int = 0  # reports recorded for the round
    revoked: int = 0  # selected silos revoked since the selection, without a report: never waited for
    deadline_passed: bool = False
    final_committed: bool = False  # the final evaluation round is committed
    injections_pending: int = 0
    injection_overdue: bool = False
    earlier_injection_pending: bool = False  # a checkpoint before the reported one still waits for its injection


NO_FACTS = Facts()


@dataclass(frozen=True)
class Guard:
    name: str
    holds: Callable[[Facts], bool]


@dataclass(frozen=True)
class Rule:
    state: State
    event: Event
    guard: Guard
    target: State
    effects: tuple[Effect, ...] = ()
    reason: Reason | None = None


ALWAYS = Guard("always", lambda f: True)
_READY = Guard("enough eligible silos cover every task", lambda f: f.eligible >= f.min_silos and not f.uncovered)
_DEADLINE = Guard("deadline passed", lambda f: f.deadline_passed)
_RING_STALLED = Guard("cyclic training round, deadline passed", lambda f: _ring(f) and f.deadline_passed)
_EVALUATED = Guard("evaluation round, all reported or deadline", lambda f: f.kind == RoundKind.EVALUATE and _closes(f))
_TOO_FEW = Guard(
    "training round closes with fewer than min_silos updates",
    lambda f: _star_training(f) and _closes(f) and f.updates < f.min_silos,
)
_ENOUGH = Guard(
    "training round closes with min_silos updates or more",
    lambda f: _star_training(f) and _closes(f) and f.updates >= f.min_silos,
)
_OVERDUE = Guard("an injection is overdue", lambda f: f.injection_overdue)
_ALL_DONE = Guard(
    "final evaluation committed, no injection pending", lambda f: f.final_committed and not f.injections_pending
)
_IN_ORDER = Guard("no earlier checkpoint waits for its injection", lambda f: not f.earlier_injection_pending)


def _ring(f: Facts) -> bool:
    return f.cyclic and f.kind == RoundKind.TRAIN


def _star_training(f: Facts) -> bool:
    return f.kind == RoundKind.TRAIN and not f.cyclic


def _closes(f: Facts) -> bool:
    return f.updates + f.revoked >= f.selected or f.deadline_passed


_ENDS_JOB = (Effect.FAIL_OPEN_ROUND, Effect.FAIL_INJECTIONS, Effect.FORGET_SUMS)
_FAILS_JOB = (*_ENDS_JOB, Effect.DROP_PARTIALS)

TABLE: tuple[Rule, ...] = (
    # jobs
    Rule(JobState.PENDING, Event.TICK, ALWAYS, JobState.RUNNING, (Effect.OPEN_FIRST_ROUND, Effect.QUEUE_INJECTION)),
    Rule(JobState.PENDING, Event.CANCEL, ALWAYS, JobState.CANCELLED, _ENDS_JOB),
    Rule(JobState.RUNNING, Event.TICK, _OVERDUE, JobState.FAILED, _FAILS_JOB, Reason.INJECTION_OVERDUE),
    Rule(JobState.RUNNING, Event.TICK, _ALL_DONE, JobState.COMPLETED),
    Rule(JobState.RUNNING, Event.CANCEL, ALWAYS, JobState.CANCELLED, _ENDS_JOB),
    Rule(JobState.RUNNING, Event.FAIL, ALWAYS, JobState.FAILED, _FAILS_JOB),
    Rule(JobState.RUNNING, Event.ABORT, ALWAYS, JobState.FAILED, _FAILS_JOB),
    # rounds
    Rule(RoundState.OPEN, Event.TICK, _READY, RoundState.TRAINING, (Effect.SELECT_SILOS,)),
    Rule(RoundState.OPEN, Event.TICK, _DEADLINE, RoundState.FAILED, (Effect.FAIL_JOB,), Reason.NO_ELIGIBLE_SILOS),
    Rule(RoundState.OPEN, Event.FAIL, ALWAYS, RoundState.FAILED),
    Rule(RoundState.TRAINING, Event.TICK, _RING_STALLED, RoundState.FAILED, (Effect.FAIL_JOB,), Reason.RING_STALLED),
    Rule(
        RoundState.TRAINING,
        Event.TICK,
        _EVALUATED,
        RoundState.COMMITTED,
        (Effect.RECORD_METRICS, Effect.NOTE_NO_EVALUATION, Effect.COMPLETE_WHEN_INJECTED),
    ),
    Rule(RoundState.TRAINING, Event.TICK, _TOO_FEW, RoundState.FAILED, (Effect.FAIL_JOB,), Reason.TOO_FEW_UPDATES),
    Rule(RoundState.TRAINING, Event.TICK, _ENOUGH, RoundState.AGGREGATING),
    Rule(RoundState.TRAINING, Event.RING_CLOSED, ALWAYS, RoundState.AGGREGATING),
    Rule(RoundState.TRAINING, Event.FAIL, ALWAYS, RoundState.FAILED),
    Rule(
        RoundState.AGGREGATING,
        Event.AGGREGATED,
        ALWAYS,
        RoundState.COMMITTED,
        (
            Effect.RECORD_METRICS,
            Effect.EXPIRE_CHECKPOINTS,
            Effect.OPEN_NEXT_ROUND,
            Effect.QUEUE_INJECTION,
            Effect.QUEUE_EVALUATION,
        ),
    ),
    Rule(RoundState.AGGREGATING, Event.FAIL, ALWAYS, RoundState.FAILED),
    # injections
    Rule(InjectionState.PENDING, Event.REPORTED, _IN_ORDER, InjectionState.DONE, (Effect.STORE_SCORES,)),
    Rule(InjectionState.PENDING, Event.FAIL, ALWAYS, InjectionState.FAILED),
)

STATES: tuple[State, ...] = (*JobState, *RoundState, *InjectionState)


def rows(state: State, event: Event) -> tuple[Rule, ...]:
    return tuple(rule for rule in TABLE if rule.state is state and rule.event is event)


def allowed(state: State, event: Event) -> bool:
    """Whether the table has a row for this edge at all (its guards aside)."""
    return bool(rows(state, event))


def decide(state: State, event: Event, facts: Facts = NO_FACTS) -> Rule | None:
    """The row that fires: None when the edge exists but no guard holds now; PreconditionError on a forbidden edge."""
    candidates = rows(state, event)
    if not candidates:
        raise PreconditionError(f"a {_machine(state)} that is {state.value} cannot take the event {event.value!r}")
    return next((rule for rule in candidates if rule.guard.holds(facts)), None)


def _machine(state: State) -> str:
    if isinstance(state, JobState):
        return "job"
    return "round" if isinstance(state, RoundState) else "injection"


def render() -> str:
    """The table as Markdown, for docs/architecture.md (`python -m coordinator.round_table`)."""
    lines = ["| machine | state | event | guard | target | effects |", "|---|---|---|---|---|---|"]
    for rule in TABLE:
        effects = ", ".join(effect.value for effect in rule.effects) or "-"
        if rule.reason is not None:
            effects += f" (reason: {rule.reason.value})"
        lines.append(
            f"| {_machine(rule.state)} | {rule.state.value} | {rule.event.value} | {rule.guard.name} "
            f"| {rule.target.value} | {effects} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
