"""SiloAgent: the loop. Poll for work, download the global model, train or evaluate, upload, resume.

Every step is recorded in the agent's state once its result is durable; a restarted agent resumes at the
first unrecorded step, so it never trains or uploads the same round twice.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from fedmeki_core.errors import (
    AlreadyExistsError,
    AuthenticationError,
    FedmekiError,
    ForbiddenError,
    PreconditionError,
    UnavailableError,
)
from fedmeki_core.files import sha256_file
from fedmeki_core.records import RoundKind, RoundTask
from silo_agent.settings import SiloSettings
from silo_agent.state import FINAL, AgentState, TaskRecord
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import GrpcTransport

logger = logging.getLogger(__name__)

_BACKOFF_SECONDS = 2.0


class SiloAgent:
    def __init__(
        self,
        settings: SiloSettings,
        transport: GrpcTransport,
        state: AgentState,
        trainer: LocalTrainer,
        device_label: str,
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._state = state
        self._trainer = trainer
        self._device_label = device_label
        self._spare = settings.work_dir / "spare.safetensors"
        self._spare_download = settings.work_dir / "spare-download.safetensors"

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set. A revoked or unknown credential ends the loop with its error."""
        logger.info(
            "silo agent polling %s for tasks %s on %s",
            self._settings.coordinator,
            ", ".join(sorted(self._settings.data)),
            self._device_label,
        )
        while not stop.is_set():
            try:
                task = self.run_once()
            except (AuthenticationError, ForbiddenError):
                raise
            except UnavailableError as exc:
                logger.warning("coordinator unreachable: %s", exc.message)
                stop.wait(_BACKOFF_SECONDS)
            except FedmekiError as exc:
                logger.error("task failed: %s", exc.message)
                stop.wait(_BACKOFF_SECONDS)
            except Exception:
                logger.exception("task failed unexpectedly")
                stop.wait(_BACKOFF_SECONDS)
            else:
                if task is None and self._settings.poll_wait_seconds == 0:
                    stop.wait(_BACKOFF_SECONDS)

    def run_once(self) -> RoundTask | None:
        """One poll and, when it brings a task, that task carried to its end."""
        task = self._transport.next_task(
            sorted(self._settings.data), self._device_label, self._settings.poll_wait_seconds
        )
        if task is not None:
            self.handle(task)
        return task

    def handle(self, task: RoundTask) -> None:
        record = self._state.task(task.job_id, task.round)
        if record is not None and record.status in FINAL:
            # The coordinator asks again for a round this agent finished: never redo it, just do not spin.
            logger.warning(
                "job %s round %d is already %s here; not repeating it", task.job_id, task.round, record.status
            )
            time.sleep(_BACKOFF_SECONDS)
            return
        job_dir = self._settings.work_dir / "jobs" / task.job_id
        checkpoint = job_dir / f"global-{task.checkpoint.round:05d}.safetensors"
        if record is None or record.status == "downloaded":
            self._transport.download(task.checkpoint, checkpoint, spare=self._spare_download)
            self._state.record(task.job_id, task.round, task.kind.value, "downloaded")
            logger.info(
                "job %s round %d: downloaded checkpoint %d (%d bytes)",
                task.job_id,
                task.round,
                task.checkpoint.round,
                task.checkpoint.size_bytes,
            )
        if task.kind == RoundKind.EVALUATE:
            self._evaluate(task, checkpoint)
        else:
            self._train_and_upload(task, checkpoint, job_dir, record)

    def _evaluate(self, task: RoundTask, checkpoint: Path) -> None:
        samples, metrics = self._trainer.evaluate(task, checkpoint)
        status = "reported"
        try:
            self._transport.report_evaluation(task, samples, metrics)
        except AlreadyExistsError:
            pass
        except PreconditionError as exc:
            status = "abandoned"
            logger.warning("job %s round %d: report refused (%s)", task.job_id, task.round, exc.message)
        self._state.record(task.job_id, task.round, task.kind.value, status, num_samples=samples, metrics=metrics)
        if checkpoint.exists():
            checkpoint.replace(self._spare_download)  # the next download overwrites it
        logger.info(
            "job %s round %d: evaluation %s (%d samples, accuracy %.3f)",
            task.job_id,
            task.round,
            status,
            samples,
            metrics.get("eval_accuracy", float("nan")),
        )

    def _train_and_upload(self, task: RoundTask, checkpoint: Path, job_dir: Path, record: TaskRecord | None) -> None:
        if record is not None and record.status == "trained" and record.delta_path and record.delta_path.exists():
            delta, digest = record.delta_path, record.delta_sha256 or sha256_file(record.delta_path)
            samples, metrics = record.num_samples or 0, record.metrics
            logger.info("job %s round %d: resuming the upload of the recorded delta", task.job_id, task.round)
        else:
            started = time.monotonic()
            result = self._trainer.train(
                task, checkpoint, job_dir / f"delta-{task.round:05d}.safetensors", reuse=self._spare
            )
            delta, digest = result.delta_path, result.sha256
            samples, metrics = result.num_samples, result.metrics
            self._state.record(
                task.job_id,
                task.round,
                task.kind.value,
                "trained",
                delta_path=delta,
                delta_sha256=digest,
                num_samples=samples,
                metrics=metrics,
            )
            logger.info(
                "job %s round %d: trained on %d samples in %.1fs (global model accuracy %.3f, train loss %.4f)",
                task.job_id,
                task.round,
                samples,
                time.monotonic() - started,
                metrics.get("eval_accuracy", float("nan")),
                metrics.get("train_loss", float("nan")),
            )
        status = "uploaded"
        try:
            self._transport.upload(task, delta, digest, samples, metrics)
        except AlreadyExistsError:
            logger.info("job %s round %d: the coordinator already has this update", task.job_id, task.round)
        except PreconditionError as exc:
            status = "abandoned"
            logger.warning("job %s round %d: upload refused (%s)", task.job_id, task.round, exc.message)
        self._state.record(task.job_id, task.round, task.kind.value, status)
        logger.info(
            "job %s round %d: %s delta of %d bytes (sha256 %s)",
            task.job_id,
            task.round,
            status,
            delta.stat().st_size,
            digest[:12],
        )
        delta.replace(self._spare)  # the next delta overwrites it: faster than a new file
        if checkpoint.exists():
            checkpoint.replace(self._spare_download)  # the next download overwrites it
