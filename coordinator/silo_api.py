"""SiloService: the silo agents' API. Checks every call's identity, hands it to the scheduler, audits what changes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from coordinator.access import AccessControl
from coordinator.admission import UploadHeader
from coordinator.artifacts import Artifacts
from coordinator.audit import AuditedCall, AuditLog
from coordinator.credentials import PeerCredentials, SiloIdentity
from coordinator.download_deltas import DeltaSource, DeltaSources
from coordinator.jobs_api import checkpoint_stream
from coordinator.offload import Offload, per_hop
from coordinator.pacing import CallSlots, PacedStream
from coordinator.receiving import check_declared, check_metrics, check_sha256
from coordinator.scheduler import Scheduler
from coordinator.secure_aggregation import UPDATE_ENCODINGS
from coordinator.settings import CoordinatorSettings
from coordinator.silos import SiloRegistry
from coordinator.status import safe_text, streaming, unary
from coordinator.upload_turns import UploadTurns
from fedmeki_core import convert
from fedmeki_core.errors import (
    InvalidInputError,
)
from fedmeki_core.faults import crash_point
from fedmeki_core.proto.v1 import common_pb2, silo_pb2, silo_pb2_grpc
from fedmeki_core.recent import Recent
from fedmeki_core.records import CheckpointInfo, RoundTask, UpdateReceipt
from fedmeki_core.wire import iter_file_chunks

logger = logging.getLogger(__name__)


Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]  # gRPC ships no stubs for aio: Any to mypy


def delta_stream(source: DeltaSource, offset: int, chunk_bytes: int) -> Iterator[common_pb2.CheckpointChunk]:
    """A checkpoint as its delta: what it is (GlobalDelta), then the delta's bytes from `offset`."""
    if not 0 <= offset <= source.size_bytes:
        raise InvalidInputError(f"offset {offset} is outside the delta's {source.size_bytes} bytes")
    yield common_pb2.CheckpointChunk(
        delta=common_pb2.GlobalDelta(
            checkpoint=convert.checkpoint_to_proto(source.checkpoint),
            base_round=source.base_round,
            size_bytes=source.size_bytes,
            sha256=source.sha256,
        )
    )
    for chunk in iter_file_chunks(source.path, offset, chunk_bytes):
        yield convert.chunk_message(common_pb2.CheckpointChunk, chunk)


class TaskMessages:
    """Tasks as messages, each job's spec and manifest converted once: they do not change while it runs, and every
    silo polls for a task of it every round (at 256 silos their conversion was 4% of the coordinator's Python
    time). Used on the event loop only."""

    def __init__(self, kept_jobs: int = 64) -> None:
        self._templates: Recent[str, silo_pb2.TrainingTask] = Recent(kept_jobs)

    def of(self, task: RoundTask) -> silo_pb2.TrainingTask:
        template = self._templates.get(task.job_id)
        if template is None:
            template = convert.task_template(task)
            self._templates.put(task.job_id, template)
        return convert.task_to_proto(task, template)


async def _chunks(messages: AsyncIterable[silo_pb2.UploadUpdateRequest]) -> AsyncIterator[common_pb2.Chunk]:
    async for message in messages:
        if message.WhichOneof("payload") != "chunk":
            raise InvalidInputError("only the first UploadUpdate message may be the header; the others are chunks")
        yield message.chunk
        crash_point("coordinator.mid_upload")  # the receiver asks for the next chunk: this one is received


class SiloServicer(silo_pb2_grpc.SiloServiceServicer):
    """Each call: what it presented read on the event loop, then its blocking part (identity, audit, the use case)
    on the blocking pool; the long poll and the upload's bytes are awaited on the loop."""

    def __init__(
        self,
        scheduler: Scheduler,
        registry: SiloRegistry,
        access: AccessControl,
        audit: AuditLog,
        artifacts: Artifacts,
        settings: CoordinatorSettings,
        slots: CallSlots,
        offload: Offload,
    ) -> None:
        self._scheduler = scheduler
        self._registry = registry
        self._access = access
        self._audit = audit
        self._artifacts = artifacts
        self._settings = settings
        self._slots = slots
        self._offload = offload
        self._deltas = DeltaSources(artifacts)
        self._tasks = TaskMessages()
        self._upload_turns = UploadTurns(
            slots.uploads,
            settings.max_concurrent_uploads,
            memory_bytes=settings.upload_memory_bytes,
            stream_window_bytes=settings.stream_window_bytes,
        )

    @unary
    async def Enroll(self, request: silo_pb2.EnrollRequest, context: Context) -> silo_pb2.EnrollResponse:
        return await self._offload.run(self._enroll, request, PeerCredentials.of(context))

    def _enroll(self, request: silo_pb2.EnrollRequest, call: PeerCredentials) -> silo_pb2.EnrollResponse:
        self._access.enrollment(call, "Enroll")
        with self._audit.call("Enroll", "unknown", call.peer) as audited:
            enrollment = self._registry.enroll(request.token)
            audited.actor = f"silo:{enrollment.silo_name}"
        logger.info("silo %s enrolled", enrollment.silo_name)
        return silo_pb2.EnrollResponse(
            silo_id=enrollment.silo_id, silo_name=enrollment.silo_name, credential=enrollment.credential
        )

    @unary
    async def NextTask(self, request: silo_pb2.NextTaskRequest, context: Context) -> silo_pb2.NextTaskResponse:
        silo = await self._offload.run(self._access.silo, PeerCredentials.of(context), "NextTask")
        with self._slots.polls.hold() if request.wait_seconds > 0 else nullcontext():
            task = await self._scheduler.next_task(silo, list(request.tasks), request.device, request.wait_seconds)
        if task is None:
            return silo_pb2.NextTaskResponse()
        return silo_pb2.NextTaskResponse(task=self._tasks.of(task))

    @streaming
    async def DownloadModel(
        self, request: silo_pb2.DownloadModelRequest, context: Context
    ) -> AsyncIterator[common_pb2.CheckpointChunk]:
        info, path, delta = await self._offload.run(self._model_source, request, PeerCredentials.of(context))
        chunk_bytes = self._settings.chunk_bytes
        if delta is not None:
            stream = delta_stream(delta, request.offset, chunk_bytes)
        else:  # asked for a delta that is not here: the whole checkpoint, from its start
            stream = checkpoint_stream(info, path, 0 if request.base_sha256 else request.offset, chunk_bytes)
        async for message in self._offload.iterate(stream, per_hop(chunk_bytes)):
            yield message
            crash_point("coordinator.mid_download")

    def _model_source(
        self, request: silo_pb2.DownloadModelRequest, call: PeerCredentials
    ) -> tuple[CheckpointInfo, Path, DeltaSource | None]:
        silo = self._access.silo(call, "DownloadModel", request.job_id)
        peer, job_id, round_number = call.peer, request.job_id, request.round
        with self._audit.call("DownloadModel", silo.label, peer, job_id, round_number, failures_only=True):
            if request.relay_hop:  # a running sum of a cyclic secure-aggregation round, not a checkpoint
                info, path = self._scheduler.relay_source(silo, request.job_id, request.round, request.relay_hop)
                return info, path, None
            info, path = self._scheduler.checkpoint_for(request.job_id, request.round, silo)
            if not request.base_sha256:
                return info, path, None
            return info, path, self._deltas.source(info, request.base_round, request.base_sha256)

    @unary
    async def UploadUpdate(
        self, request_iterator: AsyncIterable[silo_pb2.UploadUpdateRequest], context: Context
    ) -> silo_pb2.UploadReceipt:
        call = PeerCredentials.of(context)
        silo = await self._offload.run(self._access.silo, call, "UploadUpdate")
        async with (
            self._audit.awaited_call(self._offload, "UploadUpdate", silo.label, call.peer) as audited,
            PacedStream.of_chunks(request_iterator, self._settings) as messages,
        ):
            header = await self._read_header(messages)
            audited.job_id, audited.round_number = header.job_id, header.round
            with self._upload_turns.hold(silo.id, header.total_size):  # charged by what it declares
                receipt = await self._receive(silo, header, messages, audited, call.peer)
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

    async def _read_header(self, messages: AsyncIterator[silo_pb2.UploadUpdateRequest]) -> silo_pb2.UpdateHeader:
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidInputError("the first UploadUpdate message must be the header")
        return first.header

    async def _receive(
        self,
        silo: SiloIdentity,
        header: silo_pb2.UpdateHeader,
        messages: AsyncIterator[silo_pb2.UploadUpdateRequest],
        audited: AuditedCall,
        peer: str,
    ) -> UpdateReceipt:
        """Check the header at the door, then two calls: admit it (an update the coordinator already holds, a retry
        whose receipt was lost, gets its receipt at once, without reading the bytes again), and record its bytes,
        with the call's audit row in the update's transaction."""
        if header.encoding not in UPDATE_ENCODINGS:
            raise InvalidInputError(f"unsupported update encoding {header.encoding!r}; use 'safetensors' or 'ckks'")
        self._check_samples(header.num_samples)
        metrics = check_metrics(header.metrics.values)
        check_declared("update", header.total_size, header.sha256, self._settings.max_update_bytes)
        admitted = await self._offload.run(
            self._scheduler.admit,
            silo,
            UploadHeader(
                job_id=header.job_id,
                round=header.round,
                num_samples=header.num_samples,
                metrics=metrics,
                encoding=header.encoding,
                total_size=header.total_size,
                sha256=header.sha256,
                relay_hop=header.relay_hop,
                offset=header.offset,
            ),
        )
        if isinstance(admitted, UpdateReceipt):
            return admitted
        witness = self._audit.witness("UploadUpdate", audited, peer)
        return await self._scheduler.record(admitted, _chunks(messages), (witness,))

    def _check_samples(self, num_samples: int) -> None:
        # A sample count weighs an update in the mean: an absurd one would drown every other silo's.
        if not 1 <= num_samples <= self._settings.max_update_samples:
            raise InvalidInputError(
                f"num_samples must be between 1 and {self._settings.max_update_samples} (max_update_samples), "
                f"got {num_samples}"
            )

    @unary
    async def RelayStep(self, request: silo_pb2.RelayStepRequest, context: Context) -> silo_pb2.RelayStepResponse:
        return await self._offload.run(self._relay_step, request, PeerCredentials.of(context))

    def _relay_step(self, request: silo_pb2.RelayStepRequest, call: PeerCredentials) -> silo_pb2.RelayStepResponse:
        silo = self._access.silo(call, "RelayStep", request.job_id)
        return convert.relay_step_to_proto(self._scheduler.relay_turn(silo, request.job_id, request.round))

    @unary
    async def AbortRound(self, request: silo_pb2.AbortRoundRequest, context: Context) -> silo_pb2.AbortRoundResponse:
        return await self._offload.run(self._abort_round, request, PeerCredentials.of(context))

    def _abort_round(self, request: silo_pb2.AbortRoundRequest, call: PeerCredentials) -> silo_pb2.AbortRoundResponse:
        silo = self._access.silo(call, "AbortRound", request.job_id)
        with self._audit.call("AbortRound", silo.label, call.peer, request.job_id, request.round):
            self._scheduler.abort_round(silo, request.job_id, request.round, safe_text(request.reason))
        return silo_pb2.AbortRoundResponse()

    @unary
    async def UploadOffset(
        self, request: silo_pb2.UploadOffsetRequest, context: Context
    ) -> silo_pb2.UploadOffsetResponse:
        return await self._offload.run(self._upload_offset, request, PeerCredentials.of(context))

    def _upload_offset(
        self, request: silo_pb2.UploadOffsetRequest, call: PeerCredentials
    ) -> silo_pb2.UploadOffsetResponse:
        silo = self._access.silo(call, "UploadOffset", request.job_id)
        check_sha256("update", request.sha256)
        # An upload's first call: refused here at the cap, with its turn, it has sent no bytes and written no row.
        self._upload_turns.check(silo.id, request.total_size)
        self._scheduler.check_upload(silo, request.job_id, request.round, request.relay_hop)  # an upload's refusals
        held = self._artifacts.partial_size(request.job_id, request.round, silo.id, request.sha256)
        return silo_pb2.UploadOffsetResponse(offset=held)

    @unary
    async def ReportEvaluation(
        self, request: silo_pb2.ReportEvaluationRequest, context: Context
    ) -> silo_pb2.ReportEvaluationResponse:
        return await self._offload.run(self._report_evaluation, request, PeerCredentials.of(context))

    def _report_evaluation(
        self, request: silo_pb2.ReportEvaluationRequest, call: PeerCredentials
    ) -> silo_pb2.ReportEvaluationResponse:
        silo = self._access.silo(call, "ReportEvaluation", request.job_id)
        with self._audit.call("ReportEvaluation", silo.label, call.peer, request.job_id, request.round):
            self._check_samples(request.num_samples)
            metrics = check_metrics(request.metrics.values)
            self._scheduler.accept_evaluation(silo, request.job_id, request.round, request.num_samples, metrics)
        return silo_pb2.ReportEvaluationResponse()
