"""The scheduler: builds the round's parts, runs the tick thread, and is the one entry point the servicers call.

Every transition is decided by the table in `coordinator/round_table.py` and persisted in the same transaction as
its cause. A background thread advances jobs (`RoundDriver`: select silos, close rounds at completion or deadline,
`Commit`: aggregate and commit); RPC handlers call in to create jobs (`JobLifecycle`), hand out tasks
(`Dispatcher`) and record updates (`Intake`). After a restart the thread picks every unfinished job up where the
database says it is. The long poll and an update's bytes are awaited on the server's event loop (`next_task`,
`record`); every other entry point blocks, and the servicers call it on the blocking pool (`Offload`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterable, Callable, Sequence
from datetime import datetime
from pathlib import Path

from coordinator import recovery
from coordinator.admission import Admission, UploadAdmission, UploadHeader
from coordinator.artifacts import Artifacts, Spool
from coordinator.commit import Commit
from coordinator.credentials import SiloIdentity
from coordinator.dispatcher import Dispatcher
from coordinator.driver import RoundDriver
from coordinator.effects import Effects
from coordinator.eligibility import Eligibility
from coordinator.events import EventBus
from coordinator.intake import Chunk, Intake
from coordinator.jobs import JobLifecycle
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Modes
from coordinator.offload import Offload
from coordinator.publisher import Publisher
from coordinator.retention import Retention
from coordinator.running_sums import RunningSums
from coordinator.secure_aggregation import CkksContexts
from coordinator.settings import SchedulerSettings
from coordinator.status import database_unavailable
from coordinator.store.database import Database
from coordinator.store.models import Base, utcnow
from coordinator.store.views import list_job_ids
from coordinator.submissions import Submission
from coordinator.sum_buffers import SumBuffers
from fedmeki_core.errors import StorageFullError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.privacy.he import CkksContext
from fedmeki_core.records import CheckpointInfo, JobState, JobStatus, RelayStep, RoundTask, UpdateReceipt
from fedmeki_core.wire import TensorSpec

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


class Scheduler:
    def __init__(
        self,
        database: Database,
        artifacts: Artifacts,
        events: EventBus,
        settings: SchedulerSettings,
        metrics: CoordinatorMetrics,
        offload: Offload,
        clock: Clock = utcnow,
    ) -> None:
        self._db = database
        self._artifacts = artifacts
        self._settings = settings
        self._lock = threading.RLock()  # one writer of job and round state at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        eligibility = Eligibility(settings.silo_liveness_seconds, clock)
        self.publisher = Publisher(database, events, eligibility)
        self._sums = RunningSums(SumBuffers(settings.sum_buffer_bytes), settings.running_sum_bytes)
        ckks = CkksContexts(artifacts)
        modes = Modes(artifacts, self._sums, ckks, database)
        retention = Retention(artifacts, settings.keep_updates, settings.keep_checkpoints)
        effects = Effects(artifacts, self._sums, retention, modes)
        commit = Commit(database, artifacts, modes, effects, retention, self.publisher, self._lock, clock)
        self.jobs = JobLifecycle(
            database, artifacts, ckks, modes, effects, self.publisher, eligibility, self._lock, self._wake, clock
        )
        self.dispatcher = Dispatcher(
            database,
            artifacts,
            self.publisher,
            offload,
            modes,
            settings.max_poll_seconds,
            self._wake,
            self._stop,
            clock,
        )
        self.admission = UploadAdmission(database, modes)
        self.intake = Intake(
            database,
            artifacts,
            modes,
            self.publisher,
            offload,
            self._lock,
            self._wake,
            clock,
            settings.max_header_bytes,
        )
        self._driver = RoundDriver(
            database,
            effects,
            modes,
            commit,
            self.publisher,
            metrics,
            eligibility,
            self._lock,
            self._stop,
            clock,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._artifacts.clear_incoming()
        recovery.tidy(self._db, self._artifacts, self._settings.keep_updates)
        self._thread = threading.Thread(target=self._run, name="fedmeki-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.publisher.work_changed()
        if self._thread is not None:
            self._thread.join()
        self._sums.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the database is down: the next tick tries again; the thread must live on
                if not database_unavailable(exc):
                    raise
                logger.warning("tick: the database is unavailable (%s); trying again", str(exc).splitlines()[0])
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
                self._driver.advance(job_id)
            except StorageFullError as exc:  # nothing was committed: the round is aggregated again next tick
                logger.warning("advancing job %s: %s", job_id, exc.message)
            except Exception:
                logger.exception("advancing job %s failed; will retry", job_id)

    # -- the use cases, one part each --------------------------------------------------------------

    def create_job(
        self,
        spec: JobSpec,
        weights: Spool,
        manifest: list[TensorSpec],
        submission: Submission,
        ckks_public_context: bytes = b"",
    ) -> JobStatus:
        return self.jobs.create_job(spec, weights, manifest, submission, ckks_public_context)

    def submitted(self, submission: Submission) -> JobStatus | None:
        return self.jobs.submitted(submission)

    def cancel_job(self, job_id: str, reason: str, requester: str | None = None) -> JobStatus:
        return self.jobs.cancel_job(job_id, reason, requester)

    def status(self, job_id: str) -> JobStatus:
        return self.jobs.status(job_id)

    def checkpoint_for(self, job_id: str, round_number: int, silo: SiloIdentity | None) -> tuple[CheckpointInfo, Path]:
        return self.jobs.checkpoint_for(job_id, round_number, silo)

    def abort_round(self, silo: SiloIdentity, job_id: str, round_number: int, reason: str) -> None:
        self.jobs.abort_round(silo, job_id, round_number, reason)

    async def next_task(
        self, silo: SiloIdentity, tasks: Sequence[str], device: str, wait_seconds: float
    ) -> RoundTask | None:
        return await self.dispatcher.next_task(silo, tasks, device, wait_seconds)

    def relay_turn(self, silo: SiloIdentity, job_id: str, round_number: int) -> RelayStep:
        return self.dispatcher.relay_turn(silo, job_id, round_number)

    def relay_source(self, silo: SiloIdentity, job_id: str, round_number: int, hop: int) -> tuple[CheckpointInfo, Path]:
        return self.dispatcher.relay_source(silo, job_id, round_number, hop)

    def admit(self, silo: SiloIdentity, header: UploadHeader) -> UpdateReceipt | Admission:
        return self.admission.admit(silo, header)

    async def record(
        self, admission: Admission, chunks: AsyncIterable[Chunk], witness: Sequence[Base] = ()
    ) -> UpdateReceipt:
        return await self.intake.record(admission, chunks, witness)

    def check_upload(self, silo: SiloIdentity, job_id: str, round_number: int, hop: int = 0) -> None:
        self.admission.check(silo, job_id, round_number, hop)

    def ckks_context(self, job_id: str) -> CkksContext | None:
        return self.admission.ckks_context(job_id)

    def accept_evaluation(
        self, silo: SiloIdentity, job_id: str, round_number: int, num_samples: int, metrics: dict[str, float]
    ) -> None:
        self.intake.accept_evaluation(silo, job_id, round_number, num_samples, metrics)
