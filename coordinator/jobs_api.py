"""JobService: the researcher's API. Checks the caller, translates protobuf to scheduler calls and back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from coordinator.access import AccessControl
from coordinator.artifacts import Artifacts, Spool
from coordinator.audit import AuditLog
from coordinator.credentials import PeerCredentials, Principal
from coordinator.events import EventBus
from coordinator.job_pages import job_page
from coordinator.offload import Offload, per_hop
from coordinator.pacing import CallSlots, PacedStream
from coordinator.receiving import Receiver, check_declared
from coordinator.scheduler import Scheduler
from coordinator.settings import CoordinatorSettings
from coordinator.status import streaming, unary
from coordinator.store.database import Database
from coordinator.submissions import Submission
from fedmeki_core import convert, convert_spec
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from fedmeki_core.records import CheckpointInfo, JobStatus
from fedmeki_core.wire import iter_file_chunks, read_manifest

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]  # gRPC ships no stubs for aio: Any to mypy


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    """Each call: what it presented read on the event loop, then its blocking part on the blocking pool; the streams
    (a submission's weights, WatchJob, a checkpoint's bytes) are awaited on the loop."""

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
        offload: Offload,
    ) -> None:
        self._access = access
        self._audit = audit
        self._scheduler = scheduler
        self._db = database
        self._artifacts = artifacts
        self._events = events
        self._settings = settings
        self._slots = slots
        self._offload = offload

    @unary
    async def SubmitJob(
        self, request_iterator: AsyncIterable[jobs_pb2.SubmitJobRequest], context: Context
    ) -> common_pb2.Job:
        call = PeerCredentials.of(context)
        principal = await self._offload.run(self._access.researcher, call, "SubmitJob")
        async with self._audit.awaited_call(self._offload, "SubmitJob", principal.label, call.peer) as audited:
            with self._slots.submissions.hold():
                async with PacedStream.of_chunks(request_iterator, self._settings) as messages:
                    job = await self._submit(messages, principal)
            audited.job_id = job.id
        return convert.job_to_proto(job)

    async def _submit(self, messages: AsyncIterator[jobs_pb2.SubmitJobRequest], principal: Principal) -> JobStatus:
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidInputError("the first SubmitJob message must be the header (spec, weights size, sha256)")
        header = first.header
        spec = convert_spec.job_spec_from_proto(header.spec, submission=True)
        check_declared("initial weights", header.weights_size, header.weights_sha256, self._settings.max_update_bytes)
        submission = Submission.of(
            principal.label,
            header.request_id,
            spec,
            header.weights_size,
            header.weights_sha256,
            header.ckks_public_context,
        )
        earlier = await self._offload.run(self._scheduler.submitted, submission)
        if earlier is not None:  # a retry whose first answer was lost: the same job, its weights not read again
            return earlier
        spool = await self._offload.run(self._artifacts.spool, "submissions")
        try:
            receiver = await self._offload.run(
                Receiver,
                spool,
                None,
                header.weights_size,
                header.weights_sha256,
                self._settings.max_job_header_bytes,
            )
            async for message in messages:
                await self._offload.run(receiver.feed, message.chunk)
            return await self._offload.run(self._create_job, receiver, spool, spec, submission, header)
        finally:
            await self._offload.run(self._artifacts.discard, spool)

    def _create_job(
        self,
        receiver: Receiver,
        spool: Spool,
        spec: JobSpec,
        submission: Submission,
        header: jobs_pb2.SubmitJobHeader,
    ) -> JobStatus:
        receiver.finish()
        spool.sync()
        manifest = read_manifest(spool.path)
        return self._scheduler.create_job(spec, spool, manifest, submission, header.ckks_public_context)

    @unary
    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Context) -> common_pb2.Job:
        return await self._offload.run(self._get_job, request, PeerCredentials.of(context))

    def _get_job(self, request: jobs_pb2.GetJobRequest, call: PeerCredentials) -> common_pb2.Job:
        self._access.researcher(call, "GetJob", request.job_id)
        return convert.job_to_proto(self._scheduler.status(request.job_id))

    @unary
    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: Context) -> jobs_pb2.ListJobsResponse:
        return await self._offload.run(self._list_jobs, request, PeerCredentials.of(context))

    def _list_jobs(self, request: jobs_pb2.ListJobsRequest, call: PeerCredentials) -> jobs_pb2.ListJobsResponse:
        self._access.researcher(call, "ListJobs")
        states = [convert.job_state_from_proto(s) for s in request.states]
        return job_page(
            self._db,
            states,
            request,
            lambda job_id: convert.job_to_proto(self._scheduler.status(job_id)),
            self._settings.max_message_bytes,
        )

    @unary
    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Context) -> common_pb2.Job:
        return await self._offload.run(self._cancel_job, request, PeerCredentials.of(context))

    def _cancel_job(self, request: jobs_pb2.CancelJobRequest, call: PeerCredentials) -> common_pb2.Job:
        principal = self._access.researcher(call, "CancelJob", request.job_id)
        requester = None if principal.manages_all_jobs else principal.label
        with self._audit.call("CancelJob", principal.label, call.peer, request.job_id):
            job = self._scheduler.cancel_job(request.job_id, request.reason, requester)
        return convert.job_to_proto(job)

    @streaming
    async def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: Context) -> AsyncIterator[jobs_pb2.JobEvent]:
        await self._offload.run(self._access.researcher, PeerCredentials.of(context), "WatchJob", request.job_id)
        with self._slots.watches.hold(), self._events.subscribe(request.job_id) as subscription:
            status = await self._offload.run(self._scheduler.status, request.job_id)  # after subscribing: none missed
            yield jobs_pb2.JobEvent(snapshot=convert.job_to_proto(status))
            while not status.state.finished:  # a watcher that goes away cancels this wait
                event = await subscription.get()
                if isinstance(event, JobStatus):
                    status = event
                yield convert.event_to_proto(event)

    @streaming
    async def DownloadCheckpoint(
        self, request: jobs_pb2.DownloadCheckpointRequest, context: Context
    ) -> AsyncIterator[common_pb2.CheckpointChunk]:
        info, path = await self._offload.run(self._checkpoint_source, request, PeerCredentials.of(context))
        chunk_bytes = self._settings.chunk_bytes
        async for message in self._offload.iterate(
            checkpoint_stream(info, path, request.offset, chunk_bytes), per_hop(chunk_bytes)
        ):
            yield message

    def _checkpoint_source(
        self, request: jobs_pb2.DownloadCheckpointRequest, call: PeerCredentials
    ) -> tuple[CheckpointInfo, Path]:
        self._access.researcher(call, "DownloadCheckpoint", request.job_id)
        return self._scheduler.checkpoint_for(request.job_id, request.round, silo=None)


def checkpoint_stream(
    info: CheckpointInfo, path: Path, offset: int, chunk_bytes: int
) -> Iterator[common_pb2.CheckpointChunk]:
    """The checkpoint's metadata, then its bytes from `offset`, read from the file chunk by chunk."""
    if not 0 <= offset <= info.size_bytes:
        raise InvalidInputError(f"offset {offset} is outside the checkpoint's {info.size_bytes} bytes")
    yield common_pb2.CheckpointChunk(checkpoint=convert.checkpoint_to_proto(info))
    for chunk in iter_file_chunks(path, offset, chunk_bytes):
        yield convert.chunk_message(common_pb2.CheckpointChunk, chunk)
