"""The one place that translates between protobuf messages and domain values, both ways (job specs: in
`convert_spec`, which this module uses for the jobs that carry one)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2

from fedmeki_core.convert_spec import job_spec_from_proto, job_spec_to_proto
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, silo_pb2
from fedmeki_core.records import (
    CheckpointInfo,
    JobEvent,
    JobState,
    JobStatus,
    RelayAction,
    RelayStep,
    RoundKind,
    RoundState,
    RoundSummary,
    RoundTask,
    SiloResult,
    UpdateAccepted,
    UploadProgress,
)
from fedmeki_core.wire import FileChunk, TensorSpec

_JOB_STATES = {state: getattr(common_pb2, f"JOB_STATE_{state.name}") for state in JobState}
_ROUND_STATES = {state: getattr(common_pb2, f"ROUND_STATE_{state.name}") for state in RoundState}
_ROUND_KINDS = {kind: getattr(common_pb2, f"ROUND_KIND_{kind.name}") for kind in RoundKind}


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return message


def _datetime(message: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return message.ToDatetime(tzinfo=UTC) if present else None


def checkpoint_to_proto(info: CheckpointInfo) -> common_pb2.Checkpoint:
    return common_pb2.Checkpoint(job_id=info.job_id, round=info.round, size_bytes=info.size_bytes, sha256=info.sha256)


def checkpoint_from_proto(message: common_pb2.Checkpoint) -> CheckpointInfo:
    return CheckpointInfo(
        job_id=message.job_id, round=message.round, size_bytes=message.size_bytes, sha256=message.sha256
    )


def transfer_from_proto(message: common_pb2.CheckpointChunk) -> CheckpointInfo:
    """The bytes a download's first message announces: the checkpoint's, or those of the delta that rebuilds it
    (named by the checkpoint it rebuilds, with the delta's own size and sha256)."""
    if message.WhichOneof("payload") == "delta":
        target = message.delta.checkpoint
        return CheckpointInfo(
            job_id=target.job_id, round=target.round, size_bytes=message.delta.size_bytes, sha256=message.delta.sha256
        )
    return checkpoint_from_proto(message.checkpoint)


def relay_step_to_proto(step: RelayStep) -> silo_pb2.RelayStepResponse:
    message = silo_pb2.RelayStepResponse(
        action=_RELAY_ACTIONS[step.action], hop=step.hop, position=step.position, silos=step.silos
    )
    if step.source is not None:
        message.source.CopyFrom(checkpoint_to_proto(step.source))
    return message


def relay_step_from_proto(message: silo_pb2.RelayStepResponse) -> RelayStep:
    actions = {value: key for key, value in _RELAY_ACTIONS.items()}
    if message.action not in actions:
        raise InvalidInputError(f"unknown relay action {message.action}")
    source = checkpoint_from_proto(message.source) if message.HasField("source") else None
    return RelayStep(actions[message.action], message.hop, message.position, message.silos, source)


_RELAY_ACTIONS = {
    RelayAction.WAIT: silo_pb2.RelayStepResponse.WAIT,
    RelayAction.START: silo_pb2.RelayStepResponse.START,
    RelayAction.ADD: silo_pb2.RelayStepResponse.ADD,
    RelayAction.UNMASK: silo_pb2.RelayStepResponse.UNMASK,
    RelayAction.DONE: silo_pb2.RelayStepResponse.DONE,
}


def round_to_proto(summary: RoundSummary) -> common_pb2.RoundSummary:
    return common_pb2.RoundSummary(
        number=summary.number,
        kind=_ROUND_KINDS[summary.kind],
        state=_ROUND_STATES[summary.state],
        selected_silos=list(summary.selected_silos),
        reported_silos=list(summary.reported_silos),
        metrics=common_pb2.Metrics(values=summary.metrics),
        opened_at=timestamp(summary.opened_at),
        closed_at=timestamp(summary.closed_at),
        silo_results=[
            common_pb2.SiloResult(silo=r.silo, num_samples=r.num_samples, metrics=common_pb2.Metrics(values=r.metrics))
            for r in summary.silo_results
        ],
        eligible_silos=list(summary.eligible_silos),
    )


def round_from_proto(message: common_pb2.RoundSummary) -> RoundSummary:
    return RoundSummary(
        number=message.number,
        kind=_reverse(_ROUND_KINDS, message.kind),
        state=_reverse(_ROUND_STATES, message.state),
        selected_silos=tuple(message.selected_silos),
        reported_silos=tuple(message.reported_silos),
        metrics=dict(message.metrics.values),
        opened_at=_datetime(message.opened_at, message.HasField("opened_at")),
        closed_at=_datetime(message.closed_at, message.HasField("closed_at")),
        silo_results=tuple(
            SiloResult(silo=r.silo, num_samples=r.num_samples, metrics=dict(r.metrics.values))
            for r in message.silo_results
        ),
        eligible_silos=tuple(message.eligible_silos),
    )


def job_to_proto(job: JobStatus) -> common_pb2.Job:
    return common_pb2.Job(
        id=job.id,
        spec=job_spec_to_proto(job.spec),
        state=_JOB_STATES[job.state],
        reason=job.reason,
        current_round=job.current_round,
        rounds=[round_to_proto(r) for r in job.rounds],
        injections=[round_to_proto(r) for r in job.injections],
        evaluations=[round_to_proto(r) for r in job.evaluations],
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        latest_checkpoint=checkpoint_to_proto(job.latest_checkpoint) if job.latest_checkpoint else None,
    )


def job_from_proto(message: common_pb2.Job) -> JobStatus:
    return JobStatus(
        id=message.id,
        spec=job_spec_from_proto(message.spec),
        state=_reverse(_JOB_STATES, message.state),
        reason=message.reason,
        current_round=message.current_round,
        rounds=tuple(round_from_proto(r) for r in message.rounds),
        injections=tuple(round_from_proto(r) for r in message.injections),
        evaluations=tuple(round_from_proto(r) for r in message.evaluations),
        created_at=message.created_at.ToDatetime(tzinfo=UTC),
        updated_at=message.updated_at.ToDatetime(tzinfo=UTC),
        latest_checkpoint=(
            checkpoint_from_proto(message.latest_checkpoint) if message.HasField("latest_checkpoint") else None
        ),
    )


def job_state_to_proto(state: JobState) -> common_pb2.JobState.ValueType:
    return common_pb2.JobState.ValueType(_JOB_STATES[state])


def job_state_from_proto(value: int) -> JobState:
    return JobState(_reverse(_JOB_STATES, value))


def event_to_proto(event: JobEvent) -> jobs_pb2.JobEvent:
    if isinstance(event, JobStatus):
        return jobs_pb2.JobEvent(snapshot=job_to_proto(event))
    if isinstance(event, RoundSummary):
        return jobs_pb2.JobEvent(round=round_to_proto(event))
    if isinstance(event, UploadProgress):
        return jobs_pb2.JobEvent(
            upload=jobs_pb2.UploadProgress(
                silo=event.silo,
                round=event.round,
                received_bytes=event.received_bytes,
                total_bytes=event.total_bytes,
            )
        )
    return jobs_pb2.JobEvent(
        update=jobs_pb2.UpdateAccepted(
            silo=event.silo,
            round=event.round,
            num_samples=event.num_samples,
            metrics=common_pb2.Metrics(values=event.metrics),
        )
    )


def event_from_proto(message: jobs_pb2.JobEvent) -> JobEvent:
    kind = message.WhichOneof("event")
    if kind == "snapshot":
        return job_from_proto(message.snapshot)
    if kind == "round":
        return round_from_proto(message.round)
    if kind == "upload":
        u = message.upload
        return UploadProgress(silo=u.silo, round=u.round, received_bytes=u.received_bytes, total_bytes=u.total_bytes)
    a = message.update
    return UpdateAccepted(silo=a.silo, round=a.round, num_samples=a.num_samples, metrics=dict(a.metrics.values))


def manifest_to_proto(manifest: list[TensorSpec]) -> list[common_pb2.TensorSpec]:
    return [common_pb2.TensorSpec(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in manifest]


def manifest_from_proto(messages: Any) -> list[TensorSpec]:
    return [TensorSpec(name=m.name, dtype=m.dtype, shape=tuple(m.shape)) for m in messages]


def task_to_proto(task: RoundTask, template: silo_pb2.TrainingTask | None = None) -> silo_pb2.TrainingTask:
    """`template`, when given, holds the task's spec and manifest as messages already (`task_template`): copied,
    not converted again."""
    if template is None:
        template = task_template(task)
    message = silo_pb2.TrainingTask()
    message.CopyFrom(template)
    message.job_id = task.job_id
    message.round = task.round
    message.kind = _ROUND_KINDS[task.kind]
    message.checkpoint.CopyFrom(checkpoint_to_proto(task.checkpoint))
    message.deadline_seconds = task.deadline_seconds
    return message


def task_template(task: RoundTask) -> silo_pb2.TrainingTask:
    """The part of a task that every task of its job shares: its spec and manifest."""
    return silo_pb2.TrainingTask(spec=job_spec_to_proto(task.spec), manifest=manifest_to_proto(task.manifest))


def task_from_proto(message: silo_pb2.TrainingTask) -> RoundTask:
    return RoundTask(
        job_id=message.job_id,
        round=message.round,
        kind=_reverse(_ROUND_KINDS, message.kind),
        spec=job_spec_from_proto(message.spec),
        checkpoint=checkpoint_from_proto(message.checkpoint),
        manifest=manifest_from_proto(message.manifest),
        deadline_seconds=message.deadline_seconds,
    )


ChunkMessage = TypeVar(
    "ChunkMessage", jobs_pb2.SubmitJobRequest, silo_pb2.UploadUpdateRequest, common_pb2.CheckpointChunk
)


def chunk_message(message_type: type[ChunkMessage], chunk: FileChunk) -> ChunkMessage:
    """A stream message carrying `chunk`. Fields are set one by one: nesting a Chunk through the constructor
    copies its bytes once more (measured: 867 MB/s against 31 GB/s for the assignment, upb protobuf 7)."""
    message = message_type()
    message.chunk.offset = chunk.offset
    message.chunk.data = chunk.data
    return message


def _reverse(table: dict[Any, int], value: int) -> Any:
    for key, number in table.items():
        if number == value:
            return key
    raise ValueError(f"unknown enum value {value}")
