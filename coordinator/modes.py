"""How a job's updates become its next checkpoint, one strategy per job, chosen once from its spec: plain sums
folded as updates arrive, robust ones (trimmed mean, median, Krum: `fedmeki_core/algorithms/robust.py`), CKKS
ciphertexts added at the round's end (the coordinator never decrypts), the cyclic ring's unmasked sum, or a
statistics job's summed releases (`coordinator.statistics_rounds.py`).

The rest of the coordinator asks a job's mode and never branches on the privacy settings itself.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator import cyclic
from coordinator.artifacts import Artifacts
from coordinator.credentials import SiloIdentity
from coordinator.download_deltas import committed_tensors, uses_delta_downloads
from coordinator.retention import Retention
from coordinator.rounds import server_half
from coordinator.running_sums import RunningSums
from coordinator.secure_aggregation import CkksContexts, submitted_context
from coordinator.statistics_rounds import StatisticsRounds
from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Job, Round, Update
from coordinator.store.views import checkpoint_info, find_job_row
from fedmeki_core.algorithms.robust import RobustAggregation, robust_aggregation
from fedmeki_core.errors import InvalidInputError, PreconditionError
from fedmeki_core.faults import crash_point
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.privacy.he import CkksContext, add_ciphertext_files
from fedmeki_core.privacy.he.policy import uses_ckks, uses_cyclic
from fedmeki_core.records import JobState, RoundKind
from fedmeki_core.statistics import layout
from fedmeki_core.stored_spec import read_stored_spec
from fedmeki_core.wire import TensorSpec

Written = tuple[Path, int, str]  # a new checkpoint: its file, size and sha256


@dataclass(frozen=True)
class ModeParts:
    """The coordinator's parts a job's mode is built from (each mode takes those it needs)."""

    artifacts: Artifacts
    sums: RunningSums
    contexts: CkksContexts
    database: Database


class AggregationMode:
    """Plaintext updates, folded into the round's running sum as they arrive (the default strategy)."""

    ring = False  # the round's sum travels silo to silo (cyclic); the coordinator relays it
    plaintext_result = True  # the coordinator can read the job's checkpoints (not ciphertexts)

    def __init__(self, job_id: str, spec: JobSpec, artifacts: Artifacts, sums: RunningSums) -> None:
        self._job_id = job_id
        self._spec = spec
        self._artifacts = artifacts
        self._sums = sums

    @classmethod
    def for_job(cls, job_id: str, spec: JobSpec, parts: ModeParts) -> AggregationMode:
        return cls(job_id, spec, parts.artifacts, parts.sums)

    @classmethod
    def check_submission(cls, spec: JobSpec, manifest: list[TensorSpec], public_context: bytes) -> CkksContext | None:
        """A submitted job's checks of this mode; the parsed public context its updates are encrypted under."""
        if public_context:
            raise InvalidInputError(
                "a CKKS public context came with a job whose privacy.secure_aggregation is not ckks or cyclic"
            )
        return None

    @property
    def robust(self) -> RobustAggregation | None:
        return None

    def context(self) -> CkksContext | None:
        """The public context updates are encrypted under; None: they are plaintext safetensors."""
        return None

    def recorded(
        self,
        round_number: int,
        manifest: list[TensorSpec],
        selected: list[str],
        silo: SiloIdentity,
        path: Path,
        weight: float,
    ) -> None:
        """A durable update: fold it into the round's running sum after its receipt is sent."""
        accumulator = self._sums.accumulator(self._job_id, round_number, manifest, self._spec, selected, self.robust)
        self._sums.fold_later(accumulator, silo, path, weight)

    def expire_checkpoints(self, retention: Retention, session: Session, newest: int) -> list[Path]:
        return retention.expire_checkpoints(session, self._job_id, newest)

    def may_read_ring(self, round_row: Round, silo_id: str) -> bool:
        """Whether a silo that reported for the round still has work in it (the ring's initiator unmasks)."""
        return False

    def relay_round(
        self, session: Session, silo: SiloIdentity, job: Job, round_number: int, hop: int | None
    ) -> Round | None:
        """The training round a relay call names; None for a job without a ring, which must not name a hop."""
        if hop is None:
            raise PreconditionError(f"job {job.id} does not use cyclic secure aggregation")
        if hop:
            raise InvalidInputError(f"job {job.id} does not use cyclic secure aggregation: relay_hop must be 0")
        return None

    def aggregate(
        self,
        number: int,
        manifest: list[TensorSpec],
        selected: list[str],
        updates: Sequence[Update],
        current: Checkpoint,
    ) -> Written:
        """Fold every recorded update and write the next checkpoint (and the server half's state)."""
        job_id, spec = self._job_id, self._spec
        accumulator = self._sums.accumulator(job_id, number, manifest, spec, selected, self.robust)
        try:
            for update in updates:
                accumulator.offer(update.silo_id, self._artifacts.absolute(update.path), update.weight)
                crash_point("coordinator.mid_aggregation")
            accumulator.close()
            server_state = self._artifacts.read_server_state(job_id, current.round_number)
            current_path = self._artifacts.absolute(current.path)
            order, steps = accumulator.next_global(current_path, server_half(spec), server_state)
            if uses_delta_downloads(spec):  # the checkpoint is what the delta to it rebuilds
                base = checkpoint_info(current)
                tensors = committed_tensors(self._artifacts, job_id, spec, number, base, order, steps)
            else:
                tensors = (new for _, new in steps)
            written = self._artifacts.write_checkpoint(job_id, number, order, tensors)
            # Before the commit: a retry reads r-1's state.
            self._artifacts.write_server_state(job_id, number, server_state)
        finally:
            self._sums.drop(job_id, number)
        return written


class RobustMode(AggregationMode):
    """Plaintext updates aggregated robustly; the round's sum keeps what the method needs (a whole round for Krum)."""

    @property
    def robust(self) -> RobustAggregation | None:
        return robust_aggregation(self._spec.algorithm.options)


class DeferredMode(AggregationMode):
    """Updates read whole at the round's end (no running sum), and every checkpoint kept."""

    def recorded(
        self,
        round_number: int,
        manifest: list[TensorSpec],
        selected: list[str],
        silo: SiloIdentity,
        path: Path,
        weight: float,
    ) -> None:
        """Nothing until the round's end."""

    def expire_checkpoints(self, retention: Retention, session: Session, newest: int) -> list[Path]:
        return []


class CkksMode(DeferredMode):
    """Ciphertexts, verified as they arrive and added at the round's end (addition is exact: order does not
    matter), with the total weight in the clear: the silos decrypt and divide. Every encrypted aggregate is kept:
    the silos rebuild the model from all of them."""

    plaintext_result = False

    def __init__(
        self, job_id: str, spec: JobSpec, artifacts: Artifacts, sums: RunningSums, contexts: CkksContexts
    ) -> None:
        super().__init__(job_id, spec, artifacts, sums)
        self._contexts = contexts

    @classmethod
    def for_job(cls, job_id: str, spec: JobSpec, parts: ModeParts) -> AggregationMode:
        return cls(job_id, spec, parts.artifacts, parts.sums, parts.contexts)

    @classmethod
    def check_submission(cls, spec: JobSpec, manifest: list[TensorSpec], public_context: bytes) -> CkksContext | None:
        return submitted_context(spec, public_context)

    def context(self) -> CkksContext | None:
        return self._contexts.get(self._job_id)

    def _summed(self, number: int, updates: Sequence[Update], current: Checkpoint) -> list[Path]:
        return [self._artifacts.absolute(update.path) for update in updates]

    def _total_weight(self, updates: Sequence[Update]) -> float:
        return float(sum(update.weight for update in updates))

    def aggregate(
        self,
        number: int,
        manifest: list[TensorSpec],
        selected: list[str],
        updates: Sequence[Update],
        current: Checkpoint,
    ) -> Written:
        context = self.context()
        assert context is not None
        path = self._artifacts.encrypted_checkpoint_path(self._job_id, number)
        summed = self._summed(number, updates, current)
        size, sha256 = add_ciphertext_files(
            path, context, summed, manifest, self._total_weight(updates), self._artifacts.claim_pooled()
        )
        return path, size, sha256


class CyclicMode(CkksMode):
    """The silos add their ciphertexts in a ring; the coordinator relays the running sum and keeps the unmasked
    one the initiator uploads last (hop K+1) as the round's aggregate (a sum of one file)."""

    ring = True

    def _summed(self, number: int, updates: Sequence[Update], current: Checkpoint) -> list[Path]:
        return [self._artifacts.cycle_final_path(self._job_id, number)]  # its header carries the total weight

    def may_read_ring(self, round_row: Round, silo_id: str) -> bool:
        return (
            round_row.kind == RoundKind.TRAIN.value and cyclic.ring(round_row.selected, round_row.number)[0] == silo_id
        )

    def relay_round(
        self, session: Session, silo: SiloIdentity, job: Job, round_number: int, hop: int | None
    ) -> Round | None:
        if hop == 0:
            raise InvalidInputError(f"job {job.id} uses cyclic secure aggregation: an upload names its relay_hop")
        round_row = session.scalars(select(Round).where(Round.job_id == job.id, Round.number == round_number)).first()
        if round_row is None or silo.id not in round_row.selected or round_row.kind != RoundKind.TRAIN.value:
            raise PreconditionError(
                f"silo {silo.name!r} is not in the ring of a training round {round_number} of job {job.id!r}"
            )
        if job.state != JobState.RUNNING.value:
            raise PreconditionError(f"job {job.id} is {job.state}")
        return round_row


class CkksStatisticsMode(CkksMode):
    """A statistics job's encrypted releases (fedmeki_core/statistics_ckks.py), added like CKKS updates; round 2's
    are added onto round 1's sums, so the last checkpoint holds the whole encrypted result. Round 2 must come from
    round 1's silos, as in the clear."""

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        artifacts: Artifacts,
        sums: RunningSums,
        contexts: CkksContexts,
        rounds: StatisticsRounds,
    ) -> None:
        super().__init__(job_id, spec, artifacts, sums, contexts)
        self._rounds = rounds

    @classmethod
    def for_job(cls, job_id: str, spec: JobSpec, parts: ModeParts) -> AggregationMode:
        assert spec.statistics is not None  # mode_class chose this mode for it
        rounds = StatisticsRounds(job_id, spec.statistics, parts.artifacts, parts.database)
        return cls(job_id, spec, parts.artifacts, parts.sums, parts.contexts, rounds)

    @classmethod
    def check_submission(cls, spec: JobSpec, manifest: list[TensorSpec], public_context: bytes) -> CkksContext | None:
        StatisticsMode.require_zeros(spec, manifest)
        return submitted_context(spec, public_context)

    def _summed(self, number: int, updates: Sequence[Update], current: Checkpoint) -> list[Path]:
        summed = super()._summed(number, updates, current)
        if number == 2:  # checkpoint 0 is zeros in the clear: only round 1's sums are added
            self._rounds.require_round_1_silos({update.silo_id for update in updates})
            summed.insert(0, self._artifacts.absolute(current.path))
        return summed

    def _total_weight(self, updates: Sequence[Update]) -> float:
        return float(len(updates))  # each silo's release counts once, as the plaintext statistics job sums them


class StatisticsMode(DeferredMode):
    """A statistics job's releases, summed at the round's end (min/max taken), not averaged: the figures of a few
    numbers per feature are read whole then (a release has no weight: no running sum). Both checkpoints stay:
    round 1's figures beside the result."""

    def __init__(
        self, job_id: str, spec: JobSpec, artifacts: Artifacts, sums: RunningSums, rounds: StatisticsRounds
    ) -> None:
        super().__init__(job_id, spec, artifacts, sums)
        self._rounds = rounds

    @classmethod
    def for_job(cls, job_id: str, spec: JobSpec, parts: ModeParts) -> AggregationMode:
        assert spec.statistics is not None  # mode_class chose this mode for it
        rounds = StatisticsRounds(job_id, spec.statistics, parts.artifacts, parts.database)
        return cls(job_id, spec, parts.artifacts, parts.sums, rounds)

    @classmethod
    def check_submission(cls, spec: JobSpec, manifest: list[TensorSpec], public_context: bytes) -> CkksContext | None:
        cls.require_zeros(spec, manifest)
        return super().check_submission(spec, manifest, public_context)

    @staticmethod
    def require_zeros(spec: JobSpec, manifest: list[TensorSpec]) -> None:
        assert spec.statistics is not None  # mode_class chose a statistics mode for it
        if sorted(manifest, key=lambda t: t.name) != layout(spec.statistics):
            raise InvalidInputError("a statistics job starts from its zeros: submit it without a weights file")

    def aggregate(
        self,
        number: int,
        manifest: list[TensorSpec],
        selected: list[str],
        updates: Sequence[Update],
        current: Checkpoint,
    ) -> Written:
        return self._rounds.aggregate(number, updates, current)


def mode_class(spec: JobSpec) -> type[AggregationMode]:
    """The strategy a spec chooses: the same at submission (`check_submission`) and for every later call."""
    if spec.statistics is not None:
        return CkksStatisticsMode if uses_ckks(spec) else StatisticsMode
    if uses_cyclic(spec):
        return CyclicMode
    if uses_ckks(spec):
        return CkksMode
    if robust_aggregation(spec.algorithm.options).method != "none":
        return RobustMode
    return AggregationMode


class Modes:
    """Each job's strategy, chosen once from its spec and kept."""

    def __init__(self, artifacts: Artifacts, sums: RunningSums, contexts: CkksContexts, database: Database) -> None:
        self._parts = ModeParts(artifacts, sums, contexts, database)
        self._chosen: dict[str, AggregationMode] = {}
        self._lock = threading.Lock()

    def of(self, job_id: str, spec: JobSpec) -> AggregationMode:
        with self._lock:
            if job_id not in self._chosen:
                self._chosen[job_id] = mode_class(spec).for_job(job_id, spec, self._parts)
            return self._chosen[job_id]

    def relay_round(
        self, session: Session, silo: SiloIdentity, job_id: str, round_number: int, hop: int | None
    ) -> tuple[Job, Round | None]:
        """The job and, for a job with a ring, the training round a relay call names (`hop` None: a call of the
        ring that names no hop); the round is None for other jobs, which must not name a hop."""
        job = find_job_row(session, job_id)
        if job is None:
            raise PreconditionError(f"silo {silo.name!r} is not selected for round {round_number} of job {job_id!r}")
        mode = self.of(job.id, read_stored_spec(job.spec))
        return job, mode.relay_round(session, silo, job, round_number, hop)
