"""Duplicate, late and replayed uploads, in every interleaving Hypothesis finds, through a real coordinator.

A model of the rules runs beside the coordinator: the first update of a (job, round, silo) counts; the very same
update again (same bytes, same sample count: a silo that lost its receipt) is an idempotent success with the same
receipt, even after the round closed; any other update for it is ALREADY_EXISTS; an upload to a round that is not
open for it (closed, not yet open, an evaluation round) is FAILED_PRECONDITION. After every step the database
holds exactly one update row per accepted first upload, and each committed checkpoint is the previous one plus
the sample-weighted mean of exactly those updates: nothing is counted twice, nothing is lost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from safetensors.numpy import load, save
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import Silo, Update
from fedmeki_core.records import RoundState
from tests.conftest import address, coordinator_settings, enroll, serving
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes
from tests.test_scheduler import FakeClock, wait_for_state

SILOS = 3
ROUNDS = 2  # training rounds; round ROUNDS + 1 is the evaluation round, which takes no update
DEADLINE = 60
# (bytes variant, sample count factor): variant 0 is what a silo first sends in the tests' usual story, but any
# may come first; the others differ from it in their bytes or in their declared samples only.
VARIANTS = ((0, 1), (1, 1), (0, 2))


def _update(round_number: int, silo: int, variant: int) -> tuple[bytes, int]:
    flavour, factor = VARIANTS[variant]
    value = (silo + 1) * (1.0 if flavour == 0 else -2.0) + round_number / 8
    return save(tensors(value)), 10 * (silo + 1) * factor


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def replay_coordinator(tmp_path: Path, database_url: str, clock: FakeClock) -> Iterator[Coordinator]:
    # Silos stay eligible however far the clock moves: the test closes rounds by moving it past deadlines.
    settings_ = coordinator_settings(tmp_path / "coordinator", database_url, silo_liveness_seconds=1e9)
    instance = Coordinator(settings_, clock=clock)
    yield from serving(instance)


def _run(coordinator: Coordinator, clock: FakeClock, examples: int, steps: int) -> None:
    target = address(coordinator)
    silos = [RawSilo(target, enroll(coordinator, f"replay-{i}")) for i in range(SILOS)]
    for silo in silos:
        silo.poll()
    with coordinator.database.read() as session:
        by_name = {row.name: row.id for row in session.scalars(select(Silo))}
    ids = [by_name[f"replay-{i}"] for i in range(SILOS)]

    class Uploads(RuleBasedStateMachine):
        """One job per example; the rules are what silos may send, and the passing of a round's deadline."""

        @initialize()
        def submit(self) -> None:
            initial = weights_bytes(seed=7)
            spec = job_spec(rounds=ROUNDS, min_silos=1, round_deadline_seconds=DEADLINE)
            self.job_id = submit_raw(target, spec, initial).id
            self.round = 1
            self.accepted: dict[tuple[int, int], int] = {}  # (round, silo) -> variant of its first update
            self.receipts: dict[tuple[int, int], tuple[int, str]] = {}
            self.checkpoints = {0: {name: value.astype(np.float64) for name, value in load(initial).items()}}
            self._await_training()

        def _await_training(self) -> None:
            wait_for_state(
                coordinator,
                self.job_id,
                lambda s: s.rounds and s.rounds[-1].number == self.round and s.rounds[-1].state == RoundState.TRAINING,
            )

        @rule(
            silo=st.integers(0, SILOS - 1),
            variant=st.integers(0, len(VARIANTS) - 1),
            offset=st.sampled_from([-1, 0, 1]),
        )
        def upload(self, silo: int, variant: int, offset: int) -> None:
            round_number = self.round + offset
            payload, samples = _update(round_number, silo, variant)
            first = self.accepted.get((round_number, silo))
            try:
                receipt = silos[silo].upload(self.job_id, round_number, payload, num_samples=samples, chunk=97)
            except grpc.RpcError as error:
                if first is not None:
                    expected = grpc.StatusCode.OK if first == variant else grpc.StatusCode.ALREADY_EXISTS
                elif round_number == self.round <= ROUNDS:
                    expected = grpc.StatusCode.OK
                else:
                    expected = grpc.StatusCode.FAILED_PRECONDITION
                assert error.code() == expected, (error.code(), error.details())
                return
            assert (receipt.job_id, receipt.round) == (self.job_id, round_number)
            got = (receipt.size_bytes, receipt.sha256)
            if first is not None:
                assert first == variant, "a different update for a reported round was accepted"
                assert got == self.receipts[(round_number, silo)], "a replay got another receipt"
                return
            assert round_number == self.round <= ROUNDS, f"round {round_number} took an update (open: {self.round})"
            assert got == (len(payload), hashlib.sha256(payload).hexdigest())
            self.accepted[(round_number, silo)] = variant
            self.receipts[(round_number, silo)] = got
            if sum(r == self.round for r, _ in self.accepted) == SILOS:  # everyone reported: it closes at once
                self._committed()

        @precondition(lambda self: self.round <= ROUNDS and any(r == self.round for r, _ in self.accepted))
        @rule()
        def deadline_passes(self) -> None:
            clock.advance(DEADLINE + 1)
            self._committed()

        def _committed(self) -> None:
            wait_for_state(coordinator, self.job_id, lambda s: s.current_round == self.round)
            updates = [
                (_update(self.round, silo, variant), silo)
                for (r, silo), variant in sorted(self.accepted.items())
                if r == self.round
            ]
            total = sum(samples for (_, samples), _ in updates)
            previous = self.checkpoints[self.round - 1]
            expected = {
                name: value
                + sum(load(payload)[name].astype(np.float64) * samples for (payload, samples), _ in updates) / total
                for name, value in previous.items()
            }
            actual = load(coordinator.artifacts.checkpoint_path(self.job_id, self.round).read_bytes())
            for name, value in expected.items():
                np.testing.assert_allclose(actual[name], value, rtol=1e-6, atol=1e-6)
            self.checkpoints[self.round] = expected
            self.round += 1
            self._await_training()

        @invariant()
        def one_row_per_first_update(self) -> None:
            with coordinator.database.read() as session:
                rows = session.scalars(select(Update).where(Update.job_id == self.job_id)).all()
                recorded = sorted((row.round_number, row.silo_id, row.size_bytes, row.sha256) for row in rows)
            assert recorded == sorted((r, ids[silo], *self.receipts[(r, silo)]) for (r, silo) in self.accepted)

        def teardown(self) -> None:
            if hasattr(self, "job_id"):
                coordinator.scheduler.cancel_job(self.job_id, "example done")

    run_state_machine_as_test(
        Uploads,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            derandomize=True,  # the same interleavings in every CI run
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_replayed_late_and_conflicting_uploads_count_once(replay_coordinator: Coordinator, clock: FakeClock) -> None:
    _run(replay_coordinator, clock, examples=25, steps=15)


@pytest.mark.slow
def test_replayed_late_and_conflicting_uploads_count_once_at_length(
    replay_coordinator: Coordinator, clock: FakeClock
) -> None:
    _run(replay_coordinator, clock, examples=200, steps=30)
