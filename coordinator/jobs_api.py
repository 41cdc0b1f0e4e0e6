"""JobService: the researcher's API. Checks the caller, translates protobuf to scheduler calls and back."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc

from coordinator.access import AccessControl
from coordinator.artifacts import Artifacts
from coordinator.audit import AuditLog
from coordinator.credentials import Principal
from coordinator.events import EventBus
from coordinator.job_pages import job_page
from coordinator.pacing import CallSlots, PacedStream
from coordinator.receiving import check_declared, receive
from coordinator.scheduler import Scheduler
from coordinator.settings import CoordinatorSettings
from coordinator.status import streaming, unary
from coordinator.store.database import Database
from coordinator.submissions import Submission
from fedmeki_core import convert
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from fedmeki_core.records import CheckpointInfo, JobStatus
from fedmeki_core.wire import iter_file_chunks, read_manifest

logger = logging.getLogger(__name__)

_WATCH_POLL_SECONDS = 1.0


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        scheduler: Scheduler,
        database: Database,
        artifacts: Artifacts,
        events: EventBus,
        settings: CoordinatorSettings,
        access: AccessControl,
        audit: AuditLog,
        slots: CallSlots,
    ) -> None:
        self._access = access
        self._audit = audit
        self._scheduler = scheduler
        self._db = database
        self._artifacts = artifacts
        self._events = events
        self._settings = settings
        self._slots = slots

    @unary
    def SubmitJob(
        self, request_iterator: Iterator[jobs_pb2.SubmitJobRequest], context: grpc.ServicerContext
    ) -> common_pb2.Job:
        principal = self._access.researcher(context, "SubmitJob")
        with self._audit.call("SubmitJob", principal.label, context.peer()) as audited, self._slots.submissions.hold():
            messages = PacedStream(
                request_iterator,
                self._settings.upload_idle_seconds,
                self._settings.upload_min_bytes_per_second,
                lambda message: len(message.chunk.data),
            )
            try:
                job = self._submit(messages, principal)
            finally:
                messages.close()
            audited.job_id = job.id
        return convert.job_to_proto(job)

    def _submit(self, request_iterator: Iterator[jobs_pb2.SubmitJobRequest], principal: Principal) -> JobStatus:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidInputError("the first SubmitJob message must be the header (spec, weights size, sha256)")
        header = first.header
        spec = convert.job_spec_from_proto(header.spec, submission=True)
        check_declared("initial weights", header.weights_size, header.weights_sha256, self._settings.max_update_bytes)
        submission = Submission.of(
            principal.label,
            header.request_id,
            spec,
            header.weights_size,
            header.weights_sha256,
            header.ckks_public_context,
        )
        earlier = self._scheduler.submitted(submission)
        if earlier is not None:  # a retry whose first answer was lost: the same job, its weights not read again
            return earlier
        spool = self._artifacts.spool("submissions")
        try:
            receive(
                (message.chunk for message in request_iterator),
                spool,
                None,
                header.weights_size,
                header.weights_sha256,
                self._settings.max_job_header_bytes,
            )
            spool.sync()
            manifest = read_manifest(spool.path)
            return self._scheduler.create_job(spec, spool, manifest, submission, header.ckks_public_context)
        finally:
            self._artifacts.discard(spool)

    @unary
    def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> common_pb2.Job:
        self._access.researcher(context, "GetJob", request.job_id)
        return convert.job_to_proto(self._scheduler.status(request.job_id))

    @unary
    def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext) -> jobs_pb2.ListJobsResponse:
        self._access.researcher(context, "ListJobs")
        states = [convert.job_state_from_proto(s) for s in request.states]
        return job_page(
            self._db,
            states,
            request,
            lambda job_id: convert.job_to_proto(self._scheduler.status(job_id)),
            self._settings.max_message_bytes,
        )

    @unary
    def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext) -> common_pb2.Job:
        principal = self._access.researcher(context, "CancelJob", request.job_id)
        requester = None if principal.manages_all_jobs else principal.label
        with self._audit.call("CancelJob", principal.label, context.peer(), request.job_id):
            job = self._scheduler.cancel_job(request.job_id, request.reason, requester)
        return convert.job_to_proto(job)

    @streaming
    def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[jobs_pb2.JobEvent]:
        self._access.researcher(context, "WatchJob", request.job_id)
        with self._slots.watches.hold(), self._events.subscribe(request.job_id) as subscription:
            status = self._scheduler.status(request.job_id)  # after subscribing: no event falls in between
            yield jobs_pb2.JobEvent(snapshot=convert.job_to_proto(status))
            while not status.state.finished and context.is_active():
                event = subscription.get(timeout=_WATCH_POLL_SECONDS)
                if event is None:
                    continue
                if isinstance(event, JobStatus):
                    status = event
                yield convert.event_to_proto(event)

    @streaming
    def DownloadCheckpoint(
        self, request: jobs_pb2.DownloadCheckpointRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.CheckpointChunk]:
        self._access.researcher(context, "DownloadCheckpoint", request.job_id)
        info, path = self._scheduler.checkpoint_for(request.job_id, request.round, silo=None)
        yield from checkpoint_stream(info, path, request.offset, self._settings.chunk_bytes)


def checkpoint_stream(
    info: CheckpointInfo, path: Path, offset: int, chunk_bytes: int
) -> Iterator[common_pb2.CheckpointChunk]:
    """The checkpoint's metadata, then its bytes from `offset`, read from the file chunk by chunk."""
    if not 0 <= offset <= info.size_bytes:
        raise InvalidInputError(f"offset {offset} is outside the checkpoint's {info.size_bytes} bytes")
    yield common_pb2.CheckpointChunk(checkpoint=convert.checkpoint_to_proto(info))
    for chunk in iter_file_chunks(path, offset, chunk_bytes):
        yield convert.chunk_message(common_pb2.CheckpointChunk, chunk)
