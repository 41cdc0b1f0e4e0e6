"""The round state machine: the only writer of job, round and update state.

Every transition is checked against the tables below and persisted in the same transaction as its cause.
A background thread advances jobs (select silos, close rounds at completion or deadline, aggregate,
commit); RPC handlers call in to create jobs, accept updates and hand out tasks. After a restart the
thread picks every unfinished job up where the database says it is.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator import cyclic, injections, recovery
from coordinator.aggregation import RoundAccumulator
from coordinator.artifacts import Artifacts, Spool
from coordinator.credentials import SiloIdentity
from coordinator.events import EventBus
from coordinator.metrics import CoordinatorMetrics
from coordinator.secure_aggregation import CkksContexts, job_context
from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Job, Round, Silo, Update, utcnow
from coordinator.store.views import (
    checkpoint_info,
    find_job_row,
    get_checkpoint_row,
    get_job_row,
    job_status,
    list_job_ids,
    manifest_of,
    round_summary,
)
from fedmeki_core.algorithms import ServerAlgorithm, get_algorithm
from fedmeki_core.algorithms.robust import robust_aggregation
from fedmeki_core.encodings import DeltaEncoding, encoded_manifest
from fedmeki_core.errors import (
    AlreadyExistsError,
    ForbiddenError,
    InvalidInputError,
    InvalidJobSpecError,
    NotFoundError,
    PreconditionError,
    StorageFullError,
)
from fedmeki_core.faults import crash_point
from fedmeki_core.jobspec import DifferentialPrivacySpec, JobSpec
from fedmeki_core.privacy.dp import gaussian_epsilon
from fedmeki_core.privacy.he import CkksContext
from fedmeki_core.privacy.he.policy import uses_ckks, uses_cyclic
from fedmeki_core.records import (
    CheckpointInfo,
    JobState,
    JobStatus,
    RelayAction,
    RelayStep,
    RoundKind,
    RoundState,
    RoundTask,
    UpdateAccepted,
    UpdateReceipt,
)
from fedmeki_core.tasks import training_tasks
from fedmeki_core.wire import TensorSpec

logger = logging.getLogger(__name__)

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}),
}
ROUND_TRANSITIONS: dict[RoundState, frozenset[RoundState]] = {
    RoundState.OPEN: frozenset({RoundState.TRAINING, RoundState.FAILED}),
    RoundState.TRAINING: frozenset({RoundState.AGGREGATING, RoundState.COMMITTED, RoundState.FAILED}),
    RoundState.AGGREGATING: frozenset({RoundState.COMMITTED, RoundState.FAILED}),
}
EXCHANGEABLE_DTYPES = frozenset({"F32", "F64", "F16"})

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class SchedulerSettings:
    tick_seconds: float = 0.5
    silo_liveness_seconds: float = 120.0  # a silo polled within this time is eligible for a round
    max_poll_seconds: float = 30.0
    keep_updates: bool = False  # keep spooled deltas after their round commits (for audits)
    keep_checkpoints: int = 0  # keep round 0 and the newest N checkpoints of a job; 0 keeps every one


def _transition_job(job: Job, target: JobState, now: datetime, reason: str = "") -> None:
    if target not in JOB_TRANSITIONS.get(JobState(job.state), frozenset()):
        raise PreconditionError(f"job {job.id} is {job.state}; it cannot become {target.value}")
    job.state = target.value
    job.updated_at = now
    if reason:
        job.reason = reason


def _transition_round(round_row: Round, target: RoundState, now: datetime) -> None:
    if target not in ROUND_TRANSITIONS.get(RoundState(round_row.state), frozenset()):
        raise PreconditionError(f"round {round_row.number} is {round_row.state}; it cannot become {target.value}")
    round_row.state = target.value
    if target in (RoundState.COMMITTED, RoundState.FAILED):
        round_row.closed_at = now


def _central_dp(spec: JobSpec) -> DifferentialPrivacySpec | None:
    dp = spec.privacy.dp
    return dp if dp is not None and dp.mode == "central" else None


def _server_half(spec: JobSpec) -> ServerAlgorithm:
    entry = get_algorithm(spec.algorithm.name)
    return entry.server(entry.resolve_options(spec.algorithm.options))


def _same_update(
    session: Session, silo: SiloIdentity, job_id: str, round_number: int, size: int, sha256: str, num_samples: int
) -> Update | None:
    """The silo's accepted update for the round if it is this one (same size, digest and sample count)."""
    if find_job_row(session, job_id) is None:  # also keeps an id that is not one out of the query
        return None
    return session.scalars(
        select(Update).where(
            Update.job_id == job_id,
            Update.round_number == round_number,
            Update.silo_id == silo.id,
            Update.size_bytes == size,
            Update.sha256 == sha256,
            Update.num_samples == num_samples,
            Update.path != "",  # a training round's update, not an evaluation report
        )
    ).first()


def _weighted_mean(updates: Sequence[Update]) -> dict[str, float]:
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for update in updates:
        for key, value in update.metrics.items():
            totals[key] = totals.get(key, 0.0) + value * update.num_samples
            weights[key] = weights.get(key, 0.0) + update.num_samples
    return {key: totals[key] / weights[key] for key in totals if weights[key] > 0}


class Scheduler:
    def __init__(
        self,
        database: Database,
        artifacts: Artifacts,
        events: EventBus,
        settings: SchedulerSettings,
        metrics: CoordinatorMetrics,
        clock: Clock = utcnow,
    ) -> None:
        self._db = database
        self._metrics = metrics
        self._artifacts = artifacts
        self._events = events
        self._settings = settings
        self._now = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a round opened, closed, or a job ended
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._accumulators: dict[tuple[str, int], RoundAccumulator] = {}
        self._accumulators_lock = threading.Lock()
        self._ckks = CkksContexts(artifacts)
        # (job, round, silo) of cyclic rounds whose silo was told to wait for its turn: NextTask hands it other
        # work meanwhile, and the round again once its turn comes. In memory: after a restart the silo asks again.
        self._waiting_in_ring: set[tuple[str, int, str]] = set()
        # Folds run after the receipt is sent; aggregation folds whatever is not folded yet (idempotent).
        self._folder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmeki-fold")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._artifacts.clear_incoming()
        recovery.tidy(self._db, self._artifacts, self._settings.keep_updates)
        self._thread = threading.Thread(target=self._run, name="fedmeki-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._folder.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._wake.wait(self._settings.tick_seconds)
            self._wake.clear()

    def tick(self) -> None:
        """Advance every unfinished job as far as it can go now."""
        with self._db.read() as session:
            job_ids = list_job_ids(session, (JobState.PENDING, JobState.RUNNING))
        for job_id in job_ids:
            if self._stop.is_set():
                return
            try:
                self._advance(job_id)
            except StorageFullError as exc:  # nothing was committed: the round is aggregated again next tick
                logger.warning("advancing job %s: %s", job_id, exc.message)
            except Exception:
                logger.exception("advancing job %s failed; will retry", job_id)

    # -- jobs ------------------------------------------------------------------------------------

    def create_job(
        self,
        spec: JobSpec,
        weights: Spool,
        manifest: list[TensorSpec],
        submitted_by: str,
        ckks_public_context: bytes = b"",
    ) -> JobStatus:
        """Record a job with its initial weights (already received and verified) as checkpoint 0.

        `submitted_by` names who submitted it (a researcher's or admin's label, or "anonymous" without TLS). A CKKS
        job brings its public context: checked (no secret key, the spec's fingerprint) and stored.
        """
        context = job_context(spec, ckks_public_context)
        if spec.model.pretrained is not None and not spec.model.fingerprint:
            raise InvalidJobSpecError(
                "model.fingerprint",
                f"a job on the base {spec.model.pretrained!r} needs its fingerprint (fedmeki job submit --base FOLDER)",
            )
        bad = [t for t in manifest if t.dtype not in EXCHANGEABLE_DTYPES]
        if bad:
            raise InvalidInputError(
                f"initial weights: tensor {bad[0].name!r} is {bad[0].dtype}; exchanged tensors must be "
                f"{', '.join(sorted(EXCHANGEABLE_DTYPES))}"
            )
        if not manifest:
            raise InvalidInputError("initial weights hold no tensor")
        get_algorithm(spec.algorithm.name).check_manifest(t.name for t in manifest)
        job_id = uuid.uuid4().hex
        path = self._artifacts.checkpoint_path(job_id, 0)
        with self._lock, self._db.transaction() as session:
            self._require_enough_silos(session, spec)
            weights.commit(path)
            if context is not None:
                self._ckks.save(job_id, context, ckks_public_context)
            now = self._now()
            session.add(
                Job(
                    id=job_id,
                    name=spec.name,
                    spec=spec.model_dump(mode="json"),
                    state=JobState.PENDING.value,
                    manifest=[{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in manifest],
                    reason="",
                    current_round=0,
                    submitted_by=submitted_by,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()  # the job row first: the checkpoint refers to it
            session.add(
                Checkpoint(
                    job_id=job_id,
                    round_number=0,
                    path=self._artifacts.relative(path),
                    size_bytes=weights.size,
                    sha256=weights.sha256,
                    created_at=now,
                )
            )
        logger.info(
            "job %s (%s) submitted: task %s, %d rounds, %d tensors",
            job_id,
            spec.name,
            spec.task,
            spec.rounds,
            len(manifest),
        )
        self._wake.set()
        return self.status(job_id)

    def _require_enough_silos(self, session: Session, spec: JobSpec) -> None:
        enrolled_silos = select(func.count()).select_from(Silo).where(Silo.enrolled_at.is_not(None), ~Silo.revoked)
        query = enrolled_silos
        if spec.silos:
            query = query.where(Silo.name.in_(spec.silos))
            known = set(session.scalars(select(Silo.name).where(Silo.name.in_(spec.silos))))
            unknown = sorted(set(spec.silos) - known)
            if unknown:
                raise InvalidJobSpecError("silos", f"no silo named {unknown[0]!r}")
        enrolled = session.scalar(query.where(Silo.role == "trainer")) or 0
        if spec.min_silos > enrolled:
            raise InvalidJobSpecError("min_silos", f"{spec.min_silos} is more than the {enrolled} enrolled silos")
        needs_injector = spec.injection is not None and not spec.injection.federated
        if needs_injector and not session.scalar(enrolled_silos.where(Silo.role == "injector")):
            raise InvalidJobSpecError(
                "injection",
                "no enrolled injector silo: register one (fedmeki-coordinator silo add NAME --role injector)",
            )

    def cancel_job(self, job_id: str, reason: str, requester: str | None = None) -> JobStatus:
        """Cancel a job; a `requester` (a researcher's label) may cancel only the jobs it submitted."""
        with self._lock, self._db.transaction() as session:
            job = get_job_row(session, job_id)
            if requester is not None and job.submitted_by != requester:
                raise ForbiddenError(
                    f"job {job_id} was submitted by {job.submitted_by}: only they or an admin may cancel it"
                )
            if JobState(job.state).finished:
                raise PreconditionError(f"job {job_id} is already {job.state}")
            now = self._now()
            _transition_job(job, JobState.CANCELLED, now, reason or "cancelled by request")
            number = self._fail_open_round(session, job, now)
            injections.fail_pending(session, job_id, now)
            self._forget_accumulators(job_id)
        self._job_changed(job_id, number)
        return self.status(job_id)

    def status(self, job_id: str) -> JobStatus:
        with self._db.read() as session:
            return job_status(session, job_id)

    # -- silo side -------------------------------------------------------------------------------

    def next_task(
        self,
        silo: SiloIdentity,
        tasks: Sequence[str],
        device: str,
        wait_seconds: float,
        still_waiting: Callable[[], bool] = lambda: True,
    ) -> RoundTask | None:
        """Long poll: the silo's next task, waiting up to `wait_seconds` for one to appear."""
        self._touch_silo(silo, tasks, device)
        give_up = time.monotonic() + max(0.0, min(wait_seconds, self._settings.max_poll_seconds))
        with self._changed:
            while True:
                task = self._find_task(silo)
                remaining = give_up - time.monotonic()
                if task is not None or remaining <= 0 or self._stop.is_set() or not still_waiting():
                    return task
                self._changed.wait(min(remaining, 1.0))

    def checkpoint_for(self, job_id: str, round_number: int, silo: SiloIdentity | None) -> tuple[CheckpointInfo, Path]:
        """A checkpoint and its file; a silo may only read checkpoints of jobs it was selected for."""
        with self._db.read() as session:
            row = get_checkpoint_row(session, job_id, round_number)
            if silo is not None:
                rounds = session.scalars(select(Round).where(Round.job_id == job_id)).all()
                selected = any(silo.id in r.selected for r in rounds)
                if not selected and not injections.injector_may_read(session, silo, job_id, row.round_number):
                    raise NotFoundError(f"no job {job_id!r} for silo {silo.name!r}")
            return checkpoint_info(row), self._artifacts.absolute(row.path)

    def accepted_before(
        self, silo: SiloIdentity, job_id: str, round_number: int, size: int, sha256: str, num_samples: int
    ) -> UpdateReceipt | None:
        """The receipt of this very update (same bytes, same sample count) if it was accepted already: a silo that
        lost its receipt sends the update again and must get the same answer, even after the round closed."""
        with self._db.read() as session:
            existing = _same_update(session, silo, job_id, round_number, size, sha256, num_samples)
            return None if existing is None else UpdateReceipt(existing.size_bytes, existing.sha256)

    def upload_target(self, silo: SiloIdentity, job_id: str, round_number: int, hop: int = 0) -> list[TensorSpec]:
        """What an upload must match (the manifest in the job's delta encoding); raises when it may not come now.

        `hop` is the hop of a cyclic secure-aggregation round (1..K+1), 0 for every other upload."""
        with self._db.read() as session:
            job, ring_round = self._cyclic_round(session, silo, job_id, round_number, hop)
            if ring_round is not None:
                cyclic.require_upload_turn(session, ring_round, silo.id, silo.name, hop)
            else:
                job, _ = self._round_for_silo(session, silo, job_id, round_number, RoundKind.TRAIN)
            return encoded_manifest(manifest_of(job), DeltaEncoding.of(JobSpec.model_validate(job.spec)))

    def relay_turn(self, silo: SiloIdentity, job_id: str, round_number: int) -> RelayStep:
        """What a silo does next in a cyclic secure-aggregation round's ring."""
        with self._db.read() as session:
            _, ring_round = self._cyclic_round(session, silo, job_id, round_number, None)
            assert ring_round is not None
            turn = cyclic.relay_turn(session, ring_round, silo.id)
        with self._lock:
            key = (job_id, round_number, silo.id)
            if turn.action == RelayAction.WAIT:
                self._waiting_in_ring.add(key)
            else:
                self._waiting_in_ring.discard(key)
        source = turn.source
        return RelayStep(
            turn.action,
            turn.hop,
            turn.position,
            turn.silos,
            None if source is None else CheckpointInfo(job_id, round_number, source.size_bytes, source.sha256),
        )

    def relay_source(self, silo: SiloIdentity, job_id: str, round_number: int, hop: int) -> tuple[CheckpointInfo, Path]:
        """The running sum after `hop`, for the silo whose turn it is to add to it or unmask it."""
        with self._db.read() as session:
            _, ring_round = self._cyclic_round(session, silo, job_id, round_number, hop)
            assert ring_round is not None
            row = cyclic.require_download_turn(session, ring_round, silo.id, silo.name, hop)
            return CheckpointInfo(job_id, round_number, row.size_bytes, row.sha256), self._artifacts.absolute(row.path)

    def _cyclic_round(
        self, session: Session, silo: SiloIdentity, job_id: str, round_number: int, hop: int | None
    ) -> tuple[Job, Round | None]:
        """The job and, for a cyclic job, the training round a relay call names (`hop` None: a call of the ring
        that names no hop); the round is None for other jobs, which must not name a hop."""
        job = find_job_row(session, job_id)
        if job is None:
            raise PreconditionError(f"silo {silo.name!r} is not selected for round {round_number} of job {job_id!r}")
        if not uses_cyclic(JobSpec.model_validate(job.spec)):
            if hop is None:
                raise PreconditionError(f"job {job_id} does not use cyclic secure aggregation")
            if hop:
                raise InvalidInputError(f"job {job_id} does not use cyclic secure aggregation: relay_hop must be 0")
            return job, None
        if hop == 0:
            raise InvalidInputError(f"job {job_id} uses cyclic secure aggregation: an upload names its relay_hop")
        round_row = session.scalars(select(Round).where(Round.job_id == job_id, Round.number == round_number)).first()
        if round_row is None or silo.id not in round_row.selected or round_row.kind != RoundKind.TRAIN.value:
            raise PreconditionError(
                f"silo {silo.name!r} is not in the ring of a training round {round_number} of job {job_id!r}"
            )
        if job.state != JobState.RUNNING.value:
            raise PreconditionError(f"job {job_id} is {job.state}")
        return job, round_row

    def ckks_context(self, job_id: str) -> CkksContext | None:
        """The public context of a CKKS job (its updates are ciphertexts); None for a plaintext job."""
        with self._db.read() as session:
            spec = JobSpec.model_validate(get_job_row(session, job_id).spec)
        return self._ckks.get(job_id) if uses_ckks(spec) else None

    def accept_update(
        self,
        silo: SiloIdentity,
        job_id: str,
        round_number: int,
        num_samples: int,
        metrics: dict[str, float],
        spool: Spool,
        hop: int = 0,
    ) -> UpdateReceipt:
        """Record a verified, spooled delta and fold it into the round's running sum; returns its receipt (a hop of a
        cyclic round: `_accept_hop`).

        The same update accepted meanwhile (a concurrent retry got there first) is the same receipt, and this
        spool is not recorded: each (job, round, silo) counts once."""
        if hop:
            self._accept_hop(silo, job_id, round_number, num_samples, metrics, spool, hop)
            return UpdateReceipt(spool.size, spool.sha256)
        path = self._artifacts.update_path(job_id, round_number, silo.id)
        spool.sync()  # the slow part of making it durable, outside the lock
        receipt = UpdateReceipt(spool.size, spool.sha256)
        with self._lock, self._db.transaction() as session:
            if _same_update(session, silo, job_id, round_number, spool.size, spool.sha256, num_samples) is not None:
                return receipt
            job, round_row = self._round_for_silo(session, silo, job_id, round_number, RoundKind.TRAIN)
            spec = JobSpec.model_validate(job.spec)
            selected = list(round_row.selected)
            # Central DP averages uniformly: a sample-weighted mean would let a large silo exceed the clip.
            weight = 1.0 if _central_dp(spec) else _server_half(spec).update_weight(num_samples)
            spool.commit(path)
            session.add(self._update_row(silo, job_id, round_number, num_samples, weight, metrics, spool, path))
            manifest = manifest_of(job)
        crash_point("coordinator.update_durable")
        if not uses_ckks(spec):  # ciphertexts are added at the round's end (exact, so order does not matter)
            self._folder.submit(
                self._fold_in_background,
                self._accumulator(job_id, round_number, manifest, spec, selected),
                silo,
                path,
                weight,
            )
        self._events.publish(job_id, UpdateAccepted(silo.name, round_number, num_samples, metrics))
        self._wake.set()
        return receipt

    def abort_round(self, silo: SiloIdentity, job_id: str, round_number: int, reason: str) -> None:
        """A silo declines the round it was given, with a reason: a CKKS aggregate it cannot use (every later round
        would build on it), a privacy budget the job would exceed, a pretrained base it does not hold as the job's
        fingerprint says. The job fails with that reason. Only a silo selected for the open round may say so."""
        with self._lock, self._db.transaction() as session:
            job = find_job_row(session, job_id)
            if job is None or job.state != JobState.RUNNING.value:
                raise PreconditionError(f"job {job_id} has no open round for silo {silo.name!r} to abort")
            round_row = self._current_round(session, job)
            if round_row.number != round_number or silo.id not in round_row.selected:
                raise PreconditionError(f"round {round_number} of job {job_id} is not open for silo {silo.name!r}")
            why = reason.strip() or "no reason given"
            self._fail(session, job, round_row, self._now(), f"silo {silo.name!r} aborted round {round_number}: {why}")
        self._job_changed(job_id, round_number)
        self._wake.set()

    def _accept_hop(
        self,
        silo: SiloIdentity,
        job_id: str,
        round_number: int,
        num_samples: int,
        metrics: dict[str, float],
        spool: Spool,
        hop: int,
    ) -> None:
        """Record a hop of a cyclic round: a silo's running sum (its update row), or the initiator's unmasked sum,
        which closes the ring and moves the round to aggregating in the same transaction."""
        spool.sync()
        with self._lock, self._db.transaction() as session:
            job, ring_round = self._cyclic_round(session, silo, job_id, round_number, hop)
            assert ring_round is not None
            turn = cyclic.require_upload_turn(session, ring_round, silo.id, silo.name, hop)
            if turn.action == RelayAction.UNMASK:
                spool.commit(self._artifacts.cycle_final_path(job_id, round_number))
                _transition_round(ring_round, RoundState.AGGREGATING, self._now())
                logger.info("job %s: round %d's ring closed (hop %d)", job_id, round_number, hop)
            else:
                path = self._artifacts.update_path(job_id, round_number, silo.id)
                weight = _server_half(JobSpec.model_validate(job.spec)).update_weight(num_samples)
                spool.commit(path)
                session.add(self._update_row(silo, job_id, round_number, num_samples, weight, metrics, spool, path))
        if turn.action != RelayAction.UNMASK:
            self._events.publish(job_id, UpdateAccepted(silo.name, round_number, num_samples, metrics))
        with self._changed:  # the next silo's turn has come: wake its long poll
            self._changed.notify_all()
        self._wake.set()

    def _update_row(
        self,
        silo: SiloIdentity,
        job_id: str,
        round_number: int,
        num_samples: int,
        weight: float,
        metrics: dict[str, float],
        spool: Spool,
        path: Path,
    ) -> Update:
        return Update(
            job_id=job_id,
            round_number=round_number,
            silo_id=silo.id,
            num_samples=num_samples,
            weight=weight,
            metrics=metrics,
            size_bytes=spool.size,
            sha256=spool.sha256,
            path=self._artifacts.relative(path),
            received_at=self._now(),
        )

    def accept_evaluation(
        self, silo: SiloIdentity, job_id: str, round_number: int, num_samples: int, metrics: dict[str, float]
    ) -> None:
        if silo.role == "injector":
            with self._lock, self._db.transaction() as session:
                injections.record_injection(session, silo, job_id, round_number, metrics, self._now())
            logger.info("job %s: injection of checkpoint %d reported by %s", job_id, round_number, silo.name)
            self._events.publish(job_id, UpdateAccepted(silo.name, round_number, num_samples, metrics))
            self._wake.set()
            self._job_changed(job_id)
            return
        with self._lock, self._db.transaction() as session:
            self._round_for_silo(session, silo, job_id, round_number, RoundKind.EVALUATE)
            session.add(
                Update(
                    job_id=job_id,
                    round_number=round_number,
                    silo_id=silo.id,
                    num_samples=num_samples,
                    weight=float(num_samples),
                    metrics=metrics,
                    received_at=self._now(),
                )
            )
        self._events.publish(job_id, UpdateAccepted(silo.name, round_number, num_samples, metrics))
        self._wake.set()

    def _round_for_silo(
        self, session: Session, silo: SiloIdentity, job_id: str, round_number: int, kind: RoundKind
    ) -> tuple[Job, Round]:
        job = find_job_row(session, job_id)
        round_row = (
            None
            if job is None
            else session.scalars(select(Round).where(Round.job_id == job_id, Round.number == round_number)).first()
        )
        if job is None or round_row is None or silo.id not in round_row.selected:
            raise PreconditionError(f"silo {silo.name!r} is not selected for round {round_number} of job {job_id!r}")
        # Before the state checks: a silo retrying an accepted upload learns it is done, even after the round closed.
        duplicate = session.scalars(
            select(Update.id).where(
                Update.job_id == job_id, Update.round_number == round_number, Update.silo_id == silo.id
            )
        ).first()
        if duplicate is not None:
            raise AlreadyExistsError(f"silo {silo.name!r} already reported for round {round_number} of job {job_id}")
        if job.state != JobState.RUNNING.value:
            raise PreconditionError(f"job {job_id} is {job.state}")
        if round_row.kind != kind.value:
            raise PreconditionError(f"round {round_number} of job {job_id} is a {round_row.kind} round")
        if round_row.state != RoundState.TRAINING.value:
            raise PreconditionError(f"round {round_number} of job {job_id} is closed ({round_row.state})")
        return job, round_row

    def _touch_silo(self, silo: SiloIdentity, tasks: Sequence[str], device: str) -> None:
        with self._db.transaction() as session:
            row = session.get(Silo, silo.id)
            if row is None:
                raise NotFoundError(f"no silo {silo.name!r}")
            row.tasks = sorted(set(tasks))
            row.device = device[:100]
            row.last_seen_at = self._now()
        self._wake.set()

    def _find_task(self, silo: SiloIdentity) -> RoundTask | None:
        if silo.role == "injector":
            return self._find_injection()
        with self._db.read() as session:
            rows = session.execute(
                select(Round, Job)
                .join(Job, Job.id == Round.job_id)
                .where(Round.state == RoundState.TRAINING.value, Job.state == JobState.RUNNING.value)
                .order_by(Job.created_at)
            ).all()
            for round_row, job in rows:
                if silo.id not in round_row.selected:
                    continue
                done = session.scalars(
                    select(Update.id).where(
                        Update.job_id == job.id,
                        Update.round_number == round_row.number,
                        Update.silo_id == silo.id,
                    )
                ).first()
                spec = JobSpec.model_validate(job.spec)
                # A cyclic round's initiator still has the unmasking to do after its first hop.
                unmasking = uses_cyclic(spec) and cyclic.ring(round_row.selected, round_row.number)[0] == silo.id
                if done is not None and not (unmasking and round_row.kind == RoundKind.TRAIN.value):
                    continue
                if (job.id, round_row.number, silo.id) in self._waiting_in_ring:
                    if cyclic.relay_turn(session, round_row, silo.id).action == RelayAction.WAIT:
                        continue  # not its turn yet: other work first
                    self._waiting_in_ring.discard((job.id, round_row.number, silo.id))
                checkpoint_round = job.current_round
                checkpoint = session.get(Checkpoint, (job.id, checkpoint_round))
                assert checkpoint is not None
                return RoundTask(
                    job_id=job.id,
                    round=round_row.number,
                    kind=RoundKind(round_row.kind),
                    spec=spec,
                    checkpoint=CheckpointInfo(job.id, checkpoint_round, checkpoint.size_bytes, checkpoint.sha256),
                    manifest=manifest_of(job),
                    deadline_seconds=max(0.0, (round_row.deadline_at - self._now()).total_seconds()),
                )
        return None

    def _find_injection(self) -> RoundTask | None:
        with self._db.read() as session:
            row = injections.next_injection(session)
            if row is None:
                return None
            job = get_job_row(session, row.job_id)
            checkpoint = session.get(Checkpoint, (job.id, row.round_number))
            assert checkpoint is not None  # kept while its injection is pending
            return RoundTask(
                job_id=job.id,
                round=row.round_number,
                kind=RoundKind.INJECT,
                spec=JobSpec.model_validate(job.spec),
                checkpoint=CheckpointInfo(job.id, row.round_number, checkpoint.size_bytes, checkpoint.sha256),
                manifest=manifest_of(job),
                deadline_seconds=max(0.0, (row.deadline_at - self._now()).total_seconds()),
            )

    # -- the state machine -----------------------------------------------------------------------

    def _advance(self, job_id: str) -> None:
        while not self._stop.is_set():
            with self._lock, self._db.transaction() as session:
                job = get_job_row(session, job_id)
                if JobState(job.state).finished:
                    return
                spec = JobSpec.model_validate(job.spec)
                now = self._now()
                if job.state == JobState.PENDING.value:
                    _transition_job(job, JobState.RUNNING, now)
                    round_row = self._open_round(session, job, spec, 1, RoundKind.TRAIN, now)
                    injections.open_injection(session, job.id, 0, spec, now)
                    changed = True
                else:
                    round_row = self._current_round(session, job)
                    changed = self._step_injections(session, job, round_row, now) or self._step_round(
                        session, job, spec, round_row, now
                    )
                number, round_state = round_row.number, RoundState(round_row.state)
            if changed:
                if round_state == RoundState.TRAINING:
                    crash_point("coordinator.round_opened")
                self._job_changed(job_id, number)
            if round_state == RoundState.AGGREGATING:
                with self._metrics.aggregation_seconds.time():
                    self._aggregate(job_id)
            elif not changed:
                return

    def _current_round(self, session: Session, job: Job) -> Round:
        round_row = session.scalars(
            select(Round).where(Round.job_id == job.id).order_by(Round.number.desc()).limit(1)
        ).first()
        assert round_row is not None, f"running job {job.id} has no round"
        return round_row

    def _open_round(
        self, session: Session, job: Job, spec: JobSpec, number: int, kind: RoundKind, now: datetime
    ) -> Round:
        round_row = Round(
            job_id=job.id,
            number=number,
            kind=kind.value,
            state=RoundState.OPEN.value,
            selected=[],
            metrics={},
            opened_at=now,
            deadline_at=now + timedelta(seconds=spec.round_deadline_seconds),
        )
        session.add(round_row)
        session.flush()
        logger.info("job %s: round %d (%s) opened", job.id, number, kind.value)
        return round_row

    def _step_round(self, session: Session, job: Job, spec: JobSpec, round_row: Round, now: datetime) -> bool:
        state = RoundState(round_row.state)
        if state == RoundState.OPEN:
            eligible, uncovered = self._eligible_silos(session, spec, now)
            if len(eligible) >= spec.min_silos and not uncovered:
                round_row.selected = eligible
                round_row.deadline_at = now + timedelta(seconds=spec.round_deadline_seconds)
                _transition_round(round_row, RoundState.TRAINING, now)
                logger.info("job %s: round %d selected %d silos", job.id, round_row.number, len(eligible))
                return True
            if now >= round_row.deadline_at:
                self._fail(
                    session,
                    job,
                    round_row,
                    now,
                    f"round {round_row.number}: no eligible silo holds data for {', '.join(uncovered)} "
                    f"({len(eligible)} eligible, min_silos {spec.min_silos})"
                    if uncovered
                    else f"round {round_row.number}: only {len(eligible)} eligible silos (min_silos "
                    f"{spec.min_silos}) polled before the deadline",
                )
                return True
            return False
        if state != RoundState.TRAINING:
            return False
        updates = session.scalars(
            select(Update).where(Update.job_id == job.id, Update.round_number == round_row.number)
        ).all()
        # A selected silo revoked since the selection is not waited for: its update will never come.
        gone = set(session.scalars(select(Silo.id).where(Silo.id.in_(round_row.selected), Silo.revoked)))
        everyone = set(round_row.selected) <= {update.silo_id for update in updates} | gone
        if not everyone and now < round_row.deadline_at:
            return False
        if round_row.kind == RoundKind.TRAIN.value and uses_cyclic(spec):  # only the ring's last hop closes it
            if now < round_row.deadline_at:
                return False
            self._fail(session, job, round_row, now, cyclic.stalled_reason(session, round_row))
            return True
        if round_row.kind == RoundKind.EVALUATE.value:
            round_row.metrics = _weighted_mean(updates)
            _transition_round(round_row, RoundState.COMMITTED, now)
            if not updates:
                job.reason = "no silo reported the final evaluation before the deadline"
            self._complete_when_injected(session, job, now)
            return True
        if len(updates) < spec.min_silos:
            self._fail(
                session,
                job,
                round_row,
                now,
                f"round {round_row.number}: {len(updates)} updates before the deadline, min_silos is {spec.min_silos}",
            )
            return True
        _transition_round(round_row, RoundState.AGGREGATING, now)
        return True

    def _step_injections(self, session: Session, job: Job, round_row: Round, now: datetime) -> bool:
        """Fail the job on an overdue injection; complete it once the last one is in after the final evaluation."""
        overdue = injections.overdue_injection(session, job.id, now)
        if overdue is not None:
            self._fail(
                session,
                job,
                round_row,
                now,
                f"the injection of checkpoint {overdue.round_number} was not reported before its deadline "
                "(is the injector silo running, with data for every task of the suite? its log says)",
            )
            return True
        if round_row.kind == RoundKind.EVALUATE.value and round_row.state == RoundState.COMMITTED.value:
            return self._complete_when_injected(session, job, now)
        return False

    def _complete_when_injected(self, session: Session, job: Job, now: datetime) -> bool:
        if injections.pending_rounds(session, job.id):
            return False
        _transition_job(job, JobState.COMPLETED, now, job.reason)
        logger.info("job %s completed", job.id)
        return True

    def _eligible_silos(self, session: Session, spec: JobSpec, now: datetime) -> tuple[list[str], list[str]]:
        """The live trainers holding data for at least one of the job's training tasks (a hospital may hold some
        of a suite's tasks), and the training tasks none of them holds (a round waits until every one is held)."""
        seen_after = now - timedelta(seconds=self._settings.silo_liveness_seconds)
        query = select(Silo).where(
            Silo.enrolled_at.is_not(None), ~Silo.revoked, Silo.last_seen_at >= seen_after, Silo.role == "trainer"
        )
        if spec.silos:
            query = query.where(Silo.name.in_(spec.silos))
        needed = training_tasks(spec.task)
        silos = [silo for silo in session.scalars(query) if set(needed) & set(silo.tasks)]
        held = {task for silo in silos for task in silo.tasks}
        return sorted(silo.id for silo in silos), [task for task in needed if task not in held]

    def _fail(self, session: Session, job: Job, round_row: Round, now: datetime, reason: str) -> None:
        if round_row.state not in (RoundState.COMMITTED.value, RoundState.FAILED.value):
            _transition_round(round_row, RoundState.FAILED, now)
        _transition_job(job, JobState.FAILED, now, reason)
        injections.fail_pending(session, job.id, now)
        self._forget_accumulators(job.id)
        self._artifacts.drop_partials(job.id, round_row.number)
        logger.warning("job %s failed: %s", job.id, reason)

    def _forget_accumulators(self, job_id: str) -> None:
        with self._accumulators_lock:
            for key in [k for k in self._accumulators if k[0] == job_id]:
                del self._accumulators[key]

    def _fail_open_round(self, session: Session, job: Job, now: datetime) -> int:
        round_row = session.scalars(
            select(Round).where(Round.job_id == job.id).order_by(Round.number.desc()).limit(1)
        ).first()
        if round_row is None:
            return 0
        if round_row.state in (
            RoundState.OPEN.value,
            RoundState.TRAINING.value,
            RoundState.AGGREGATING.value,
        ):
            _transition_round(round_row, RoundState.FAILED, now)
        return round_row.number

    def _aggregate(self, job_id: str) -> None:
        """Fold every recorded update, write the next checkpoint, then commit the round in one transaction."""
        with self._db.read() as session:
            job = get_job_row(session, job_id)
            round_row = self._current_round(session, job)
            spec = JobSpec.model_validate(job.spec)
            manifest = manifest_of(job)
            updates = session.scalars(
                select(Update)
                .where(Update.job_id == job_id, Update.round_number == round_row.number)
                .order_by(Update.silo_id)
            ).all()
            current = session.get(Checkpoint, (job_id, job.current_round))
            assert current is not None
            number, selected = round_row.number, list(round_row.selected)
        started = time.monotonic()
        if uses_ckks(spec):  # the encrypted sum, with the total weight in the clear: the silos decrypt and divide
            path, size, sha256 = self._artifacts.write_encrypted_aggregate(
                job_id,
                number,
                self._ckks.get(job_id),
                # cyclic: the ring's unmasked sum, given the total weight in its header (a sum of one file)
                [self._artifacts.cycle_final_path(job_id, number)]
                if uses_cyclic(spec)
                else [self._artifacts.absolute(update.path) for update in updates],
                manifest,
                sum(update.weight for update in updates),
            )
        else:
            accumulator = self._accumulator(job_id, number, manifest, spec, selected)
            try:
                for update in updates:
                    accumulator.offer(update.silo_id, self._artifacts.absolute(update.path), update.weight)
                    crash_point("coordinator.mid_aggregation")
                accumulator.close()
                server_state = self._artifacts.read_server_state(job_id, current.round_number)
                order, tensors = accumulator.next_global(
                    self._artifacts.absolute(current.path), _server_half(spec), server_state
                )
                path, size, sha256 = self._artifacts.write_checkpoint(job_id, number, order, tensors)
                # Before the commit: a retry reads r-1's state.
                self._artifacts.write_server_state(job_id, number, server_state)
            finally:
                # Writing the checkpoint consumes the sums: a retry (after a full disk, say) folds the files anew.
                with self._accumulators_lock:
                    self._accumulators.pop((job_id, number), None)
        crash_point("coordinator.checkpoint_written")
        with self._lock, self._db.transaction() as session:
            job = get_job_row(session, job_id)
            round_row = self._current_round(session, job)
            if round_row.number != number or round_row.state != RoundState.AGGREGATING.value:
                return  # cancelled meanwhile
            now = self._now()
            round_row.metrics = _weighted_mean(updates)
            if (dp := _central_dp(spec)) is not None and dp.noise_multiplier > 0:  # the number-th release
                round_row.metrics = {
                    **round_row.metrics,
                    "dp_epsilon": gaussian_epsilon(dp.noise_multiplier, number, dp.delta),
                }
            _transition_round(round_row, RoundState.COMMITTED, now)
            session.merge(
                Checkpoint(
                    job_id=job_id,
                    round_number=number,
                    path=self._artifacts.relative(path),
                    size_bytes=size,
                    sha256=sha256,
                    created_at=now,
                )
            )
            job.current_round = number
            job.updated_at = now
            # A CKKS job's silos rebuild the model from checkpoint 0 and every encrypted aggregate: keep them all.
            expired = [] if uses_ckks(spec) else self._expire_checkpoints(session, job_id, number)
            next_kind = RoundKind.TRAIN if number < spec.rounds else RoundKind.EVALUATE
            self._open_round(session, job, spec, number + 1, next_kind, now)
            injections.open_injection(session, job_id, number, spec, now)
        crash_point("coordinator.round_committed")
        logger.info(
            "job %s: round %d committed from %d updates in %.2fs (checkpoint %s)",
            job_id,
            number,
            len(updates),
            time.monotonic() - started,
            sha256[:12],
        )
        if not self._settings.keep_updates:
            self._artifacts.drop_round_updates(job_id, number)
        self._artifacts.drop_partials(job_id, number)
        self._artifacts.drop_server_state(job_id, number - 1)  # round `number`'s state supersedes it
        for old in expired:
            self._artifacts.recycle(old)
        self._job_changed(job_id, number, number + 1)

    def _expire_checkpoints(self, session: Session, job_id: str, newest: int) -> list[Path]:
        """Forget checkpoints beyond the retention (rows now, files after the commit); round 0 stays."""
        keep = self._settings.keep_checkpoints
        if keep <= 0:
            return []
        waiting = injections.pending_rounds(session, job_id)  # the injector still needs these
        rows = [
            row
            for row in session.scalars(
                select(Checkpoint).where(
                    Checkpoint.job_id == job_id, Checkpoint.round_number > 0, Checkpoint.round_number <= newest - keep
                )
            )
            if row.round_number not in waiting
        ]
        for row in rows:
            session.delete(row)
        return [self._artifacts.absolute(row.path) for row in rows]

    def _fold_in_background(self, accumulator: RoundAccumulator, silo: SiloIdentity, path: Path, weight: float) -> None:
        try:
            accumulator.offer(silo.id, path, weight)
        except Exception:  # aggregation folds it again from the same file and reports what goes wrong
            logger.exception("folding the update of silo %s failed; aggregation will retry it", silo.name)

    def _accumulator(
        self, job_id: str, round_number: int, manifest: list[TensorSpec], spec: JobSpec, selected: list[str]
    ) -> RoundAccumulator:
        with self._accumulators_lock:
            key = (job_id, round_number)
            if key not in self._accumulators:
                robust = robust_aggregation(spec.algorithm.options)
                encoding = DeltaEncoding.of(spec)
                self._accumulators[key] = RoundAccumulator(manifest, selected, _central_dp(spec), robust, encoding)
            return self._accumulators[key]

    def _job_changed(self, job_id: str, *round_numbers: int) -> None:
        """Wake long polls and tell watchers: the changed rounds, then the job as stored."""
        with self._changed:
            self._changed.notify_all()
        with self._db.read() as session:
            for round_row in session.scalars(
                select(Round).where(Round.job_id == job_id, Round.number.in_(round_numbers)).order_by(Round.number)
            ):
                self._events.publish(job_id, round_summary(session, round_row))
            self._events.publish(job_id, job_status(session, job_id))
