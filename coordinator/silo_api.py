"""SiloService: the silo agents' API. Checks every call's identity, hands it to the scheduler, audits what changes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import grpc

from coordinator.access import AccessControl
from coordinator.artifacts import Artifacts, Spool
from coordinator.audit import AuditLog
from coordinator.credentials import SiloIdentity
from coordinator.events import EventBus
from coordinator.jobs_api import checkpoint_stream
from coordinator.pacing import CallSlots, PacedStream
from coordinator.receiving import check_declared, check_sha256, receive
from coordinator.scheduler import Scheduler
from coordinator.secure_aggregation import UPDATE_ENCODINGS, ciphertext_header_check, require_encoding
from coordinator.settings import CoordinatorSettings
from coordinator.silos import SiloRegistry
from coordinator.status import safe_text, streaming, unary
from fedmeki_core import convert
from fedmeki_core.errors import (
    ConflictError,
    InvalidInputError,
    StalledError,
    TruncatedUpdateError,
    UnavailableError,
)
from fedmeki_core.faults import crash_point
from fedmeki_core.privacy.he import verify_ciphertext_file
from fedmeki_core.proto.v1 import common_pb2, silo_pb2, silo_pb2_grpc
from fedmeki_core.records import UpdateReceipt, UploadProgress

logger = logging.getLogger(__name__)


def _finite_metrics(metrics: common_pb2.Metrics) -> dict[str, float]:
    values = dict(metrics.values)
    for key, value in values.items():
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidInputError(f"metric {key!r} is not finite")
    return values


def _chunks(messages: Iterator[silo_pb2.UploadUpdateRequest]) -> Iterator[common_pb2.Chunk]:
    for message in messages:
        if message.WhichOneof("payload") != "chunk":
            raise InvalidInputError("only the first UploadUpdate message may be the header; the others are chunks")
        yield message.chunk
        crash_point("coordinator.mid_upload")  # the receiver asks for the next chunk once this one is spooled


class SiloServicer(silo_pb2_grpc.SiloServiceServicer):
    def __init__(
        self,
        scheduler: Scheduler,
        registry: SiloRegistry,
        access: AccessControl,
        audit: AuditLog,
        artifacts: Artifacts,
        events: EventBus,
        settings: CoordinatorSettings,
        slots: CallSlots,
    ) -> None:
        self._scheduler = scheduler
        self._registry = registry
        self._access = access
        self._audit = audit
        self._artifacts = artifacts
        self._events = events
        self._settings = settings
        self._slots = slots
        self._uploading: set[tuple[str, int, str]] = set()
        self._uploading_lock = threading.Lock()

    @unary
    def Enroll(self, request: silo_pb2.EnrollRequest, context: grpc.ServicerContext) -> Any:
        self._access.enrollment(context, "Enroll")
        with self._audit.call("Enroll", "unknown", context.peer()) as audited:
            enrollment = self._registry.enroll(request.token)
            audited.actor = f"silo:{enrollment.silo_name}"
        logger.info("silo %s enrolled", enrollment.silo_name)
        return silo_pb2.EnrollResponse(
            silo_id=enrollment.silo_id, silo_name=enrollment.silo_name, credential=enrollment.credential
        )

    @unary
    def NextTask(self, request: silo_pb2.NextTaskRequest, context: grpc.ServicerContext) -> Any:
        silo = self._access.silo(context, "NextTask")
        with self._slots.polls.hold() if request.wait_seconds > 0 else nullcontext():
            task = self._scheduler.next_task(
                silo, list(request.tasks), request.device, request.wait_seconds, context.is_active
            )
        if task is None:
            return silo_pb2.NextTaskResponse()
        return silo_pb2.NextTaskResponse(task=convert.task_to_proto(task))

    @streaming
    def DownloadModel(self, request: silo_pb2.DownloadModelRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        silo = self._access.silo(context, "DownloadModel", request.job_id)
        peer = context.peer()
        with self._audit.call("DownloadModel", silo.label, peer, request.job_id, request.round, failures_only=True):
            if request.relay_hop:  # a running sum of a cyclic secure-aggregation round, not a checkpoint
                info, path = self._scheduler.relay_source(silo, request.job_id, request.round, request.relay_hop)
            else:
                info, path = self._scheduler.checkpoint_for(request.job_id, request.round, silo)
        for message in checkpoint_stream(info, path, request.offset, self._settings.chunk_bytes):
            yield message
            crash_point("coordinator.mid_download")

    @unary
    def UploadUpdate(
        self, request_iterator: Iterator[silo_pb2.UploadUpdateRequest], context: grpc.ServicerContext
    ) -> Any:
        silo = self._access.silo(context, "UploadUpdate")
        with self._audit.call("UploadUpdate", silo.label, context.peer()) as audited, self._slots.uploads.hold():
            messages = PacedStream(
                request_iterator,
                self._settings.upload_idle_seconds,
                self._settings.upload_min_bytes_per_second,
                lambda message: len(message.chunk.data),
            )
            try:
                header = self._read_header(messages)
                audited.job_id, audited.round_number = header.job_id, header.round
                receipt = self._receive(silo, header, messages)
            finally:
                messages.close()
        logger.info(
            "job %s round %d: update from %s accepted (%d bytes)",
            header.job_id,
            header.round,
            silo.name,
            header.total_size,
        )
        return silo_pb2.UploadReceipt(
            job_id=header.job_id, round=header.round, size_bytes=receipt.size_bytes, sha256=receipt.sha256
        )

    def _read_header(self, request_iterator: Iterator[silo_pb2.UploadUpdateRequest]) -> silo_pb2.UpdateHeader:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidInputError("the first UploadUpdate message must be the header")
        return first.header

    def _receive(
        self,
        silo: SiloIdentity,
        header: silo_pb2.UpdateHeader,
        request_iterator: Iterator[silo_pb2.UploadUpdateRequest],
    ) -> UpdateReceipt:
        """Check the header, receive the update's bytes and hand the verified update to the scheduler.

        An update the coordinator already holds (same bytes and sample count: a retry whose receipt was lost)
        gets its receipt at once, without reading the bytes again."""
        if header.encoding not in UPDATE_ENCODINGS:
            raise InvalidInputError(f"unsupported update encoding {header.encoding!r}; use 'safetensors' or 'ckks'")
        self._check_samples(header.num_samples)
        metrics = _finite_metrics(header.metrics)
        check_declared("update", header.total_size, header.sha256, self._settings.max_update_bytes)
        receipt = self._scheduler.accepted_before(
            silo, header.job_id, header.round, header.total_size, header.sha256, header.num_samples
        )
        if receipt is not None:
            return receipt
        manifest = self._scheduler.upload_target(silo, header.job_id, header.round, header.relay_hop)
        ckks = self._scheduler.ckks_context(header.job_id)  # None: a plaintext job
        require_encoding(header.encoding, ckks)
        key = (header.job_id, header.round, silo.id)
        with self._uploading_lock:
            if key in self._uploading:
                raise ConflictError(f"an upload from silo {silo.name!r} for this round is already in progress")
            self._uploading.add(key)
        spool: Spool | None = None
        kept = False
        try:
            spool = (
                self._artifacts.resume(header.job_id, header.round, silo.id, header.sha256, header.offset)
                if header.offset
                else self._artifacts.spool(header.job_id)
            )

            def progress(received: int, total: int) -> None:
                self._events.publish(header.job_id, UploadProgress(silo.name, header.round, received, total))

            receive(
                _chunks(request_iterator),
                spool,
                manifest if ckks is None else None,  # ciphertexts: U8 blobs, checked by their header and parse
                header.total_size,
                header.sha256,
                self._settings.max_header_bytes,
                progress,
                header_check=None if ckks is None else ciphertext_header_check(manifest, ckks),
            )
            if ckks is not None:
                spool.sync()
                verify_ciphertext_file(ckks, spool.path, manifest)
            return self._scheduler.accept_update(
                silo, header.job_id, header.round, header.num_samples, metrics, spool, header.relay_hop
            )
        # Cut off (cancelled, stalled, its connection dead, or ended short): what came stays, for it to resume.
        except (grpc.RpcError, StalledError, TruncatedUpdateError, UnavailableError):
            if spool is not None:
                kept = self._artifacts.keep_partial(spool, header.job_id, header.round, silo.id, header.sha256)
            raise
        finally:
            if spool is not None and not kept:
                self._artifacts.discard(spool)
            with self._uploading_lock:
                self._uploading.discard(key)

    def _check_samples(self, num_samples: int) -> None:
        # A sample count weighs an update in the mean: an absurd one would drown every other silo's.
        if not 1 <= num_samples <= self._settings.max_update_samples:
            raise InvalidInputError(
                f"num_samples must be between 1 and {self._settings.max_update_samples} (max_update_samples), "
                f"got {num_samples}"
            )

    @unary
    def RelayStep(self, request: silo_pb2.RelayStepRequest, context: grpc.ServicerContext) -> Any:
        silo = self._access.silo(context, "RelayStep", request.job_id)
        return convert.relay_step_to_proto(self._scheduler.relay_turn(silo, request.job_id, request.round))

    @unary
    def AbortRound(self, request: silo_pb2.AbortRoundRequest, context: grpc.ServicerContext) -> Any:
        silo = self._access.silo(context, "AbortRound", request.job_id)
        with self._audit.call("AbortRound", silo.label, context.peer(), request.job_id, request.round):
            self._scheduler.abort_round(silo, request.job_id, request.round, safe_text(request.reason))
        return silo_pb2.AbortRoundResponse()

    @unary
    def UploadOffset(self, request: silo_pb2.UploadOffsetRequest, context: grpc.ServicerContext) -> Any:
        silo = self._access.silo(context, "UploadOffset", request.job_id)
        check_sha256("update", request.sha256)
        self._scheduler.upload_target(silo, request.job_id, request.round, request.relay_hop)  # an upload's refusals
        held = self._artifacts.partial_size(request.job_id, request.round, silo.id, request.sha256)
        return silo_pb2.UploadOffsetResponse(offset=held)

    @unary
    def ReportEvaluation(self, request: silo_pb2.ReportEvaluationRequest, context: grpc.ServicerContext) -> Any:
        silo = self._access.silo(context, "ReportEvaluation", request.job_id)
        with self._audit.call("ReportEvaluation", silo.label, context.peer(), request.job_id, request.round):
            self._check_samples(request.num_samples)
            metrics = _finite_metrics(request.metrics)
            self._scheduler.accept_evaluation(silo, request.job_id, request.round, request.num_samples, metrics)
        return silo_pb2.ReportEvaluationResponse()
