"""The silo agent's own SQLite: durable steps, allowed transitions, and where a restarted agent resumes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fedmeki_core.records import RoundKind
from silo_agent.state import (
    AgentState,
    Enrollment,
    InvalidTransitionError,
    Step,
    StoredFile,
    TaskStatus,
    next_step,
)

ENROLLMENT = Enrollment(silo_id="s-1", silo_name="st-anne", coordinator="10.0.0.1:50051", credential="secret")


def _file(path: Path, content: bytes = b"bytes") -> StoredFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return StoredFile(path, "ab" * 32)


def test_the_enrollment_survives_a_reopen_in_a_private_file(tmp_path: Path) -> None:
    with AgentState(tmp_path) as state:
        assert state.enrollment() is None
        state.save_enrollment(ENROLLMENT)
    with AgentState(tmp_path) as state:
        assert state.enrollment() == ENROLLMENT
        renewed = Enrollment("s-1", "st-anne", "10.0.0.1:50051", "new-secret")
        state.save_enrollment(renewed)  # enrolling again replaces the credential
        assert state.enrollment() == renewed
    for path in tmp_path.glob("state.sqlite*"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_a_training_task_records_each_step_durably(tmp_path: Path) -> None:
    checkpoint = _file(tmp_path / "jobs" / "j" / "global-00000.safetensors")
    delta = _file(tmp_path / "jobs" / "j" / "delta-00001.safetensors")
    metrics = {"eval_accuracy": 0.5, "train_loss": 0.7}
    with AgentState(tmp_path) as state:
        record = state.record_download("j", 1, RoundKind.TRAIN, checkpoint)
        assert (record.status, record.checkpoint, record.delta) == (TaskStatus.DOWNLOADED, checkpoint, None)
    with AgentState(tmp_path) as state:
        assert state.task("j", 1) == record
        record = state.record_training("j", 1, delta, 40, metrics)
    with AgentState(tmp_path) as state:
        assert state.task("j", 1) == record
        assert (record.status, record.delta, record.num_samples, record.metrics) == (
            TaskStatus.TRAINED,
            delta,
            40,
            metrics,
        )
        record = state.record_end("j", 1, TaskStatus.UPLOADED)
    with AgentState(tmp_path) as state:
        final = state.task("j", 1)
        assert final == record
        assert final is not None and final.status == TaskStatus.UPLOADED and final.delta == delta
        assert [r.round for r in state.recent_tasks()] == [1]


def test_an_evaluation_task_ends_reported_with_its_metrics(tmp_path: Path) -> None:
    with AgentState(tmp_path) as state:
        state.record_download("j", 3, RoundKind.EVALUATE, _file(tmp_path / "global-00002.safetensors"))
        state.record_end("j", 3, TaskStatus.REPORTED, num_samples=10, metrics={"eval_accuracy": 0.9})
    with AgentState(tmp_path) as state:
        record = state.task("j", 3)
    assert record is not None
    assert (record.kind, record.status, record.num_samples, record.metrics) == (
        RoundKind.EVALUATE,
        TaskStatus.REPORTED,
        10,
        {"eval_accuracy": 0.9},
    )


def test_steps_out_of_order_are_refused_and_change_nothing(tmp_path: Path) -> None:
    delta = _file(tmp_path / "delta.safetensors")
    with AgentState(tmp_path) as state:
        with pytest.raises(InvalidTransitionError, match="None -> trained"):
            state.record_training("j", 1, delta, 1, {})
        assert state.task("j", 1) is None
        state.record_download("j", 1, RoundKind.TRAIN, _file(tmp_path / "global.safetensors"))
        with pytest.raises(InvalidTransitionError, match="downloaded -> uploaded"):
            state.record_end("j", 1, TaskStatus.UPLOADED)
        state.record_training("j", 1, delta, 1, {})
        state.record_end("j", 1, TaskStatus.ABANDONED)
        attempts: list[Callable[[], object]] = [
            lambda: state.record_download("j", 1, RoundKind.TRAIN, delta),
            lambda: state.record_training("j", 1, delta, 1, {}),
            lambda: state.record_end("j", 1, TaskStatus.UPLOADED),
        ]
        for attempt in attempts:
            with pytest.raises(InvalidTransitionError, match="abandoned -> "):
                attempt()
        with pytest.raises(InvalidTransitionError, match="does not end a task"):
            state.record_end("j", 1, TaskStatus.TRAINED)
        record = state.task("j", 1)
    assert record is not None and record.status == TaskStatus.ABANDONED


def test_an_agent_killed_after_training_uploads_the_recorded_delta_instead_of_retraining(tmp_path: Path) -> None:
    checkpoint = _file(tmp_path / "global.safetensors")
    delta = _file(tmp_path / "delta.safetensors")
    with AgentState(tmp_path) as state:
        assert next_step(state.task("j", 1), RoundKind.TRAIN) == Step.DOWNLOAD
        state.record_download("j", 1, RoundKind.TRAIN, checkpoint)
        assert next_step(state.task("j", 1), RoundKind.TRAIN) == Step.TRAIN
        state.record_training("j", 1, delta, 40, {"train_loss": 0.3})
    # killed here: the upload never finished
    with AgentState(tmp_path) as restarted:
        record = restarted.task("j", 1)
        assert next_step(record, RoundKind.TRAIN) == Step.UPLOAD
        assert record is not None and record.delta == delta and record.num_samples == 40
        restarted.record_end("j", 1, TaskStatus.UPLOADED)
    # killed again after the upload was recorded: nothing left to do
    with AgentState(tmp_path) as restarted:
        assert next_step(restarted.task("j", 1), RoundKind.TRAIN) == Step.NOTHING


def test_lost_files_send_the_agent_back_to_the_download(tmp_path: Path) -> None:
    checkpoint = _file(tmp_path / "global.safetensors")
    delta = _file(tmp_path / "delta.safetensors")
    with AgentState(tmp_path) as state:
        state.record_download("j", 1, RoundKind.EVALUATE, checkpoint)
        assert next_step(state.task("j", 1), RoundKind.EVALUATE) == Step.EVALUATE
        checkpoint.path.unlink()
        assert next_step(state.task("j", 1), RoundKind.EVALUATE) == Step.DOWNLOAD

        state.record_download("j", 2, RoundKind.TRAIN, _file(checkpoint.path))
        state.record_training("j", 2, delta, 40, {})
        delta.path.unlink()  # never uploaded, since an upload is recorded before its file is recycled
        assert next_step(state.task("j", 2), RoundKind.TRAIN) == Step.DOWNLOAD
        again = state.record_download("j", 2, RoundKind.TRAIN, checkpoint)
    assert (again.status, again.delta) == (TaskStatus.DOWNLOADED, None)


def test_failed_attempts_are_counted_per_round_across_a_reopen_with_the_last_reason(tmp_path: Path) -> None:
    """The bound on a round's failed attempts (max_task_failures) holds across restarts of the agent."""
    with AgentState(tmp_path) as state:
        assert state.failure_reason("j", 1) is None
        assert state.count_failure("j", 1, "training failed: MemoryError") == 1
        assert state.count_failure("j", 2, "another round") == 1
    with AgentState(tmp_path) as state:
        assert state.count_failure("j", 1, "training failed: RuntimeError: out of memory") == 2
        assert state.failure_reason("j", 1) == "training failed: RuntimeError: out of memory"
        assert state.failure_reason("j", 2) == "another round"
