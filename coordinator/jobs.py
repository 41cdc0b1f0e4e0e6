"""Job lifecycle: submission (with checkpoint 0), cancellation, a silo's abort of a CKKS round, status, and who
may read which checkpoint."""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator import evaluations, injections
from coordinator.artifacts import Artifacts, Spool
from coordinator.credentials import SiloIdentity
from coordinator.effects import Effects, fire
from coordinator.eligibility import Eligibility
from coordinator.modes import Modes, mode_class
from coordinator.normaliser import with_normaliser
from coordinator.publisher import Publisher
from coordinator.round_table import Event
from coordinator.rounds import current_round, latest_round
from coordinator.secure_aggregation import CkksContexts
from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Job, Round, Silo
from coordinator.store.views import checkpoint_info, find_job_row, get_checkpoint_row, get_job_row, job_status
from coordinator.submissions import Submission, earlier_job
from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.errors import ForbiddenError, InvalidInputError, InvalidJobSpecError, NotFoundError, PreconditionError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.records import CheckpointInfo, JobState, JobStatus
from fedmeki_core.stored_spec import stored_spec
from fedmeki_core.wire import TensorSpec

logger = logging.getLogger(__name__)

EXCHANGEABLE_DTYPES = frozenset({"F32", "F64", "F16"})


class JobLifecycle:
    def __init__(
        self,
        database: Database,
        artifacts: Artifacts,
        ckks: CkksContexts,
        modes: Modes,
        effects: Effects,
        publisher: Publisher,
        eligibility: Eligibility,
        lock: threading.RLock,
        wake: threading.Event,
        clock: Callable[[], datetime],
    ) -> None:
        self._db = database
        self._artifacts = artifacts
        self._ckks = ckks
        self._modes = modes
        self._effects = effects
        self._publisher = publisher
        self._eligibility = eligibility
        self._lock = lock
        self._wake = wake
        self._now = clock

    def create_job(
        self,
        spec: JobSpec,
        weights: Spool,
        manifest: list[TensorSpec],
        submission: Submission,
        ckks_public_context: bytes = b"",
    ) -> JobStatus:
        """Record a job with its initial weights (already received and verified) as checkpoint 0.

        `submission` names who submitted it (a researcher's or admin's label, or "anonymous" without TLS) and under
        which request id: when that id created a job meanwhile (a retry that raced its first try), the unique
        index refuses this insert and the answer is that job. A CKKS job brings its public context: checked
        (no secret key, the spec's fingerprint) and stored.
        """
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
        context = mode_class(spec).check_submission(spec, manifest, ckks_public_context)
        with self._db.read() as session:
            spec = with_normaliser(session, self._artifacts, spec)
        job_id = uuid.uuid4().hex
        path = self._artifacts.checkpoint_path(job_id, 0)
        try:
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
                        spec=stored_spec(spec),
                        state=JobState.PENDING.value,
                        manifest=[{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in manifest],
                        reason="",
                        current_round=0,
                        submitted_by=submission.submitted_by,
                        request_id=submission.request_id or None,
                        request_digest=submission.digest,
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
        except BaseException as exc:  # a failed insert leaves no file behind: the job's folder is its own (a fresh id)
            shutil.rmtree(path.parent, ignore_errors=True)
            earlier = self.submitted(submission) if isinstance(exc, IntegrityError) else None
            if earlier is None:
                raise
            logger.info("job %s: a concurrent submission with its request id got there first", earlier.id)
            return earlier
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

    def submitted(self, submission: Submission) -> JobStatus | None:
        """The job this submission's request id created already (its answer was lost), or None."""
        with self._db.read() as session:
            job = earlier_job(session, submission)
            return None if job is None else job_status(session, job.id)

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
        evaluations.check_evaluator(session, spec)

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
            rule = fire(job, Event.CANCEL, now)
            assert rule is not None
            job.reason = reason or "cancelled by request"
            round_row = latest_round(session, job)
            self._effects.apply(session, job, round_row, rule, now)
        self._publisher.job_changed(job_id, 0 if round_row is None else round_row.number)
        return self.status(job_id)

    def status(self, job_id: str) -> JobStatus:
        with self._db.read() as session:
            return job_status(session, job_id, self._eligibility.names)

    def checkpoint_for(self, job_id: str, round_number: int, silo: SiloIdentity | None) -> tuple[CheckpointInfo, Path]:
        """A checkpoint and its file; a silo may only read checkpoints of jobs it was selected for."""
        with self._db.read() as session:
            row = get_checkpoint_row(session, job_id, round_number)
            if silo is not None:
                # The latest round's selection first: a silo downloads for the round it was just selected for. The
                # earlier rounds' (a list of silos each, JSON to decode) only when it is not in that one.
                latest = select(Round.selected).where(Round.job_id == job_id).order_by(Round.number.desc()).limit(1)
                selected = silo.id in (session.scalar(latest) or ()) or any(
                    silo.id in ids for ids in session.scalars(select(Round.selected).where(Round.job_id == job_id))
                )
                if (
                    not selected
                    and not injections.injector_may_read(session, silo, job_id, row.round_number)
                    and not evaluations.evaluator_may_read(session, silo, job_id, row.round_number)
                ):
                    raise NotFoundError(f"no job {job_id!r} for silo {silo.name!r}")
            return checkpoint_info(row), self._artifacts.absolute(row.path)

    def abort_round(self, silo: SiloIdentity, job_id: str, round_number: int, reason: str) -> None:
        """A silo declines the round it was given, with a reason: a CKKS aggregate it cannot use (every later round
        would build on it), a privacy budget the job would exceed, a pretrained base it does not hold as the job's
        fingerprint says. The job fails with that reason. Only a silo selected for the open round may say so."""
        with self._lock, self._db.transaction() as session:
            if evaluations.decline_evaluation(session, silo, job_id, round_number, self._now()):
                logger.warning(
                    "job %s: the evaluator %s cannot score checkpoint %d: %s",
                    job_id,
                    silo.name,
                    round_number,
                    reason.strip()[:400],
                )
                return
            job = find_job_row(session, job_id)
            if job is None or job.state != JobState.RUNNING.value:
                raise PreconditionError(f"job {job_id} has no open round for silo {silo.name!r} to abort")
            round_row = current_round(session, job)
            if round_row.number != round_number or silo.id not in round_row.selected:
                raise PreconditionError(f"round {round_number} of job {job_id} is not open for silo {silo.name!r}")
            why = reason.strip() or "no reason given"
            why = f"silo {silo.name!r} aborted round {round_number}: {why}"
            self._effects.fail(session, job, round_row, self._now(), why, Event.ABORT)
        self._publisher.job_changed(job_id, round_number)
        self._wake.set()
