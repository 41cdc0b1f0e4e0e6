"""NextTask's messages: each job's spec and manifest converted once, every task still its own."""

from __future__ import annotations

from coordinator.silo_api import TaskMessages
from fedmeki_core import convert
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import CheckpointInfo, RoundKind, RoundTask
from fedmeki_core.wire import TensorSpec


def _task(job: str, round_number: int, kind: RoundKind = RoundKind.TRAIN) -> RoundTask:
    spec = parse_job_spec({"name": job, "task": "mortality", "rounds": 3 + len(job)})
    manifest = [TensorSpec(f"{job}.layer{i}.weight", "F32", (i + 1, 2)) for i in range(3)]
    checkpoint = CheckpointInfo(job, round_number - 1, 1000 + round_number, f"{round_number:064x}")
    return RoundTask(job, round_number, kind, spec, checkpoint, manifest, deadline_seconds=30.0 + round_number)


def test_every_task_of_every_job_is_its_own_with_its_jobs_spec_and_manifest() -> None:
    messages = TaskMessages(kept_jobs=2)
    tasks = [_task(job, number, kind) for number in (1, 2) for job in ("a", "bb", "ccc") for kind in RoundKind]
    for task in tasks + tasks[::-1]:  # three jobs through a cache of two: taken, kept, dropped, taken again
        message = messages.of(task)
        assert convert.task_from_proto(message) == task
        assert message == convert.task_to_proto(task)
