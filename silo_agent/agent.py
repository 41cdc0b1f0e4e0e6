"""SiloAgent: the loop. Poll for work, download the global model, train or evaluate, upload, resume.

Every step is recorded in the agent's state once its result is durable; a restarted agent resumes at the
first unrecorded step (`state.next_step`), so it never trains or uploads the same round twice.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

from fedmeki_core.backoff import Backoff
from fedmeki_core.errors import (
    AlreadyExistsError,
    AuthenticationError,
    FedmekiError,
    ForbiddenError,
    InvalidInputError,
    InvalidUpdateError,
    LimitExceededError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)
from fedmeki_core.faults import crash_point
from fedmeki_core.files import recycle
from fedmeki_core.records import RoundKind, RoundTask
from fedmeki_core.rpc_errors import with_connection_hint
from silo_agent.cyclic import CyclicSilo
from silo_agent.distributed import injection_for, training_for
from silo_agent.error_feedback import residual_store
from silo_agent.job_state import JobStateStore
from silo_agent.metrics import AgentMetrics
from silo_agent.modes import SiloMode, task_mode
from silo_agent.privacy_budget import PrivacyBudget
from silo_agent.resources import ResourceBudget
from silo_agent.secure_aggregation import CkksSilo
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState, Step, StoredFile, TaskRecord, TaskStatus, next_step
from silo_agent.statistics import StatisticsRelease
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import GrpcTransport
from silo_agent.workloads import Workload, task_workload

logger = logging.getLogger(__name__)

_BACKOFF_SECONDS = 2.0
_MAX_BACKOFF_SECONDS = 60.0  # failures in a row wait up to this long (with jitter) before the next try
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# What the coordinator answers when it will never take this silo's result for the round.
_REFUSALS = (PreconditionError, InvalidInputError, LimitExceededError, NotFoundError)
_MAX_REASON_CHARS = 400  # of an error's text in a decline: enough to name the cause, not a whole traceback


class SiloAgent:
    def __init__(
        self, settings: SiloSettings, transport: GrpcTransport, state: AgentState, trainer: LocalTrainer
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._state = state
        self._trainer = trainer
        self._training = training_for(settings, trainer)  # over silo.yaml `devices` when there are several
        self._injector = injection_for(self._training, trainer, settings.work_dir)  # work only as an injector
        self.metrics = AgentMetrics(trainer.device_label)
        trainer.on_step = self.metrics.step
        self._ckks = CkksSilo(settings.ckks_secret_context, settings.work_dir, transport)  # CKKS jobs only
        self._ring = CyclicSilo(self._ckks, settings.work_dir, transport)  # cyclic CKKS jobs only (both: modes.py)
        self._budget = PrivacyBudget(settings.privacy_budget, settings.data, state)
        self._resources = ResourceBudget.from_settings(settings)
        self._statistics = StatisticsRelease(settings.data, settings.min_cell_count)  # statistics jobs only
        self._spare = settings.work_dir / "spare.safetensors"
        self._spare_download = settings.work_dir / "spare-download.safetensors"

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set. A refused credential ends the loop with AuthenticationError/ForbiddenError."""
        logger.info(
            "silo agent polling %s for tasks %s on %s",
            self._settings.coordinator,
            ", ".join(sorted(self._settings.data)),
            self._trainer.device_label,
        )
        backoff = Backoff(initial=_BACKOFF_SECONDS, maximum=_MAX_BACKOFF_SECONDS)
        while not stop.is_set():
            try:
                task = self.poll()
                if task is None:
                    backoff.reset()
                    if self._settings.poll_wait_seconds == 0:
                        stop.wait(_BACKOFF_SECONDS)  # short polls: the interval between them
                elif self.handle(task):
                    backoff.reset()
                else:
                    stop.wait(backoff.next_delay())  # the coordinator repeats a task finished here: do not spin
            except (AuthenticationError, ForbiddenError) as exc:
                remedy = (
                    "ask the operator for a new startup kit (fedmeki provision) and register the silo again"
                    if self._settings.kit
                    else "enroll again with a new token (fedmeki-silo enroll)"
                )
                raise type(exc)(
                    f"the coordinator refused this silo's {'certificate' if self._settings.kit else 'credential'} "
                    f"({exc.message}): it was revoked or is unknown; {remedy}"
                ) from None
            except UnavailableError as exc:
                hinted = with_connection_hint(exc, self._settings.coordinator, self._settings.kit is not None)
                logger.warning("coordinator unreachable: %s", hinted.message)
                stop.wait(backoff.next_delay())
            except FedmekiError as exc:
                logger.error("task failed: %s", exc.message)
                stop.wait(backoff.next_delay())
            except Exception:
                logger.exception("task failed unexpectedly")
                stop.wait(backoff.next_delay())

    def run_once(self) -> RoundTask | None:
        """One poll and, when it brings a task, that task carried to its end."""
        task = self.poll()
        if task is not None:
            self.handle(task)
        return task

    def poll(self) -> RoundTask | None:
        return self._transport.next_task(
            sorted(self._settings.data), self._trainer.device_label, self._settings.poll_wait_seconds
        )

    def handle(self, task: RoundTask) -> bool:
        """Carry a task from its first unrecorded step to its end; False when there was nothing left to do."""
        mode = task_mode(task.spec, self._transport, self._ckks, self._ring)  # the task's strategies, chosen once
        workload = task_workload(
            task, mode, self._training, self._trainer, self._statistics, self._injector, self._resources
        )
        self._settle_earlier_rounds(task, mode)
        record = self._state.task(task.job_id, task.round)
        step = next_step(record, task.kind)
        if step == Step.NOTHING:
            assert record is not None
            reason = self._state.failure_reason(task.job_id, task.round)
            if record.status == TaskStatus.ABANDONED and record.delta is None and reason is not None:
                # given up here (never trained: not a refused upload) and offered again: the decline was lost
                self._decline(task, reason)
                return False
            logger.warning(
                "job %s round %d is already %s here; not repeating it", task.job_id, task.round, record.status
            )
            return False
        if step in (Step.DOWNLOAD, Step.EVALUATE, Step.TRAIN) and self._declined(task, step, workload):
            return True
        if step == Step.DOWNLOAD:
            try:
                record = self._download(task, mode)
            except InvalidUpdateError as exc:  # a CKKS aggregate that does not decrypt to a usable mean
                if not mode.aborts_on_bad_aggregate:
                    raise
                self._transport.abort_round(task, exc.message)
                logger.error("job %s round %d: aborted, the coordinator was told: %s", task.job_id, task.round, exc)
                return True
            step = next_step(record, task.kind)
        assert record is not None
        if step == Step.EVALUATE:
            self._evaluate(task, record, workload)
            return True
        fresh = step == Step.TRAIN
        if fresh:
            record = self._train(task, record, mode, workload)
            if record.status != TaskStatus.TRAINED:
                return True
        else:
            logger.info("job %s round %d: resuming the upload of the recorded delta", task.job_id, task.round)
        self._upload(task, record, mode, fresh)
        return True

    def _declined(self, task: RoundTask, step: Step, workload: Workload) -> bool:
        """A pretrained base this silo does not hold as the job's fingerprint says, a model over this silo's
        resource budget or unlike the checkpoint's manifest (all checked before anything is downloaded or loaded),
        or for training a dataset over its privacy budget (or without DP where it is required): the coordinator is
        told why, and the job fails with that reason (AbortRound)."""
        reason = self._trainer.bases.decline_reason(task.spec) or workload.resource_refusal(task)
        if reason is None and task.kind == RoundKind.TRAIN and step in (Step.DOWNLOAD, Step.TRAIN):
            reason = self._budget.refusal(task, workload.release(task))
        if reason is not None:
            self._decline(task, reason)
        return reason is not None

    def _failed(self, task: RoundTask, checkpoint: Path, reason: str, retry: bool) -> TaskRecord | None:
        """A failed attempt at the round here, counted in the state (a restart does not reset it). One that may
        pass (`retry`: an exception in training, out of memory) is left to be tried again (None) until it has failed
        `max_task_failures` times; then, or at once for one that would fail the same way again, the round is given
        up and declined with the reason. Without this the coordinator offered the round at every poll until its
        deadline, and the researcher never learnt why."""
        failures = self._state.count_failure(task.job_id, task.round, reason)
        if retry and failures < self._settings.max_task_failures:
            logger.warning(
                "job %s round %d: attempt %d of %d failed: %s",
                task.job_id,
                task.round,
                failures,
                self._settings.max_task_failures,
                reason,
            )
            return None
        record = self._abandon(task, checkpoint, None, reason)
        self._decline(task, f"{reason} ({failures} attempts)" if retry else reason)
        return record

    def _decline(self, task: RoundTask, reason: str) -> None:
        """Tell the coordinator this silo will not do the round, and why (AbortRound: the job fails with it)."""
        try:
            self._transport.abort_round(task, reason)
        except _REFUSALS as exc:  # the round closed meanwhile (another silo's decline may have ended the job)
            logger.info("job %s round %d: not declined, %s", task.job_id, task.round, exc.message)
            return
        logger.error("job %s round %d: declined, the coordinator was told: %s", task.job_id, task.round, reason)

    def _settle_earlier_rounds(self, task: RoundTask, mode: SiloMode) -> None:
        """Earlier rounds of the job that a crash left unfinished here: the coordinator has moved on, so they are
        closed. A recorded delta is offered once more, which settles how the round ended for this silo: accepted
        before the crash (ALREADY_EXISTS: uploaded) or not (the round is closed: abandoned). Without its file, or
        never trained, the round is abandoned here."""
        for record in self._state.unfinished(task.job_id, task.round):
            earlier = replace(task, round=record.round, kind=record.kind)
            if record.status == TaskStatus.TRAINED and record.delta is not None and record.delta.path.exists():
                self._upload(earlier, record, mode)  # the same job: the same mode
            else:
                self._abandon(earlier, self._checkpoint(record), None, "the coordinator has closed the round")

    def _download(self, task: RoundTask, mode: SiloMode) -> TaskRecord:
        if not _SAFE_NAME.fullmatch(task.job_id):  # it names a folder here: never let it point elsewhere
            raise InvalidInputError(f"job id {task.job_id!r} is not a plain name")
        path = self._settings.work_dir / "jobs" / task.job_id / f"global-{task.checkpoint.round:05d}.safetensors"
        sha256 = mode.download(task, path, self._spare_download)
        return self._state.record_download(task.job_id, task.round, task.kind, StoredFile(path, sha256))

    def _evaluate(self, task: RoundTask, record: TaskRecord, workload: Workload) -> None:
        checkpoint = self._checkpoint(record)
        started = time.monotonic()
        try:
            samples, metrics = workload.evaluate(task, checkpoint, self._job_state(task))
        except (InvalidInputError, NotFoundError) as exc:
            self._failed(task, checkpoint, f"cannot {task.kind.value} the global model: {exc.message}", False)
            return
        except Exception as exc:  # it may pass: tried again at the next poll, a bounded number of times
            if self._failed(task, checkpoint, f"{task.kind.value} failed: {_describe(exc)}", True) is None:
                raise
            return
        status = TaskStatus.REPORTED
        try:
            self._transport.report_evaluation(task, samples, metrics)
        except AlreadyExistsError:
            logger.info("job %s round %d: the coordinator already has this report", task.job_id, task.round)
        except _REFUSALS as exc:
            status = TaskStatus.ABANDONED
            logger.warning("job %s round %d: report refused (%s)", task.job_id, task.round, exc.message)
        self._state.record_end(task.job_id, task.round, status, num_samples=samples, metrics=metrics)
        self._recycle(checkpoint, None)
        logger.info(
            "job %s round %d: %s %s in %.1fs (%d samples, %s)",
            task.job_id,
            task.round,
            task.kind.value,
            status,
            time.monotonic() - started,
            samples,
            ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.endswith(("accuracy", "bleu1"))),
        )

    def _train(self, task: RoundTask, record: TaskRecord, mode: SiloMode, workload: Workload) -> TaskRecord:
        checkpoint = self._checkpoint(record)
        delta_path = checkpoint.with_name(f"delta-{task.round:05d}.safetensors")
        started = time.monotonic()
        try:
            result = workload.train(task, checkpoint, delta_path, self._spare, self._job_state(task))
            result = mode.seal(task, result)
        except (InvalidInputError, NotFoundError) as exc:  # the same inputs would fail the same way again
            given_up = self._failed(task, checkpoint, f"cannot train: {exc.message}", False)
            assert given_up is not None
            return given_up
        except Exception as exc:  # it may pass (memory, the device): tried again at the next poll, a bounded number
            given_up = self._failed(task, checkpoint, f"training failed: {_describe(exc)}", True)
            if given_up is None:
                raise
            return given_up
        self.metrics.trained(result.num_samples * task.spec.algorithm.local_epochs, time.monotonic() - started)
        logger.info(
            "job %s round %d: trained on %d samples in %.1fs (global model accuracy %.3f, train loss %.4f)",
            task.job_id,
            task.round,
            result.num_samples,
            time.monotonic() - started,
            result.metrics.get("eval_accuracy", float("nan")),
            result.metrics.get("train_loss", float("nan")),
        )
        return self._state.record_training(
            task.job_id,
            task.round,
            StoredFile(result.delta_path, result.sha256),
            result.num_samples,
            result.metrics,
            # charged with the delta: a round that trains is paid for, once
            self._budget.charges(task, workload.release(task)),
        )

    def _upload(self, task: RoundTask, record: TaskRecord, mode: SiloMode, fresh: bool = False) -> None:
        delta = record.delta
        assert delta is not None and record.num_samples is not None  # recorded together with the delta
        size = delta.path.stat().st_size
        try:
            if not mode.send(task, delta, record.num_samples, record.metrics, fresh):
                return  # a ring's turn not come yet: the coordinator gives the round back when it is
            crash_point("silo.before_ack")
        except AlreadyExistsError:
            logger.info("job %s round %d: the coordinator already has this update", task.job_id, task.round)
        except _REFUSALS as exc:  # the round goes on without this update (a job's limits refuse it, or it closed)
            self._abandon(task, self._checkpoint(record), delta.path, f"upload refused: {exc.message}")
            return
        self._state.record_end(task.job_id, task.round, TaskStatus.UPLOADED)
        job_state = self._job_state(task)
        for store in (job_state, residual_store(job_state)):
            store.prune(task.round)
        logger.info(
            "job %s round %d: uploaded a delta of %d bytes (sha256 %s)",
            task.job_id,
            task.round,
            size,
            delta.sha256[:12],
        )
        self._recycle(self._checkpoint(record), delta.path)

    def _abandon(self, task: RoundTask, checkpoint: Path, delta: Path | None, reason: str) -> TaskRecord:
        logger.warning("job %s round %d: giving the round up, %s", task.job_id, task.round, reason)
        record = self._state.record_end(task.job_id, task.round, TaskStatus.ABANDONED)
        residual_store(self._job_state(task)).discard(task.round)  # what it would have sent waits for the next round
        self._recycle(checkpoint, delta)
        return record

    def _job_state(self, task: RoundTask) -> JobStateStore:
        return JobStateStore(self._settings.work_dir / "jobs" / task.job_id)

    def _checkpoint(self, record: TaskRecord) -> Path:
        assert record.checkpoint is not None  # recorded by the download step
        return record.checkpoint.path

    def _recycle(self, checkpoint: Path, delta: Path | None) -> None:
        """A finished task's files become the spares the next download and delta overwrite (faster than new)."""
        if delta is not None and delta.exists():
            delta.replace(self._spare)
        if checkpoint.exists():
            recycle(checkpoint, self._spare_download)  # only unlinked while it is also the held global model


def _describe(exc: Exception) -> str:
    """An exception as one short line for a decline: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."
