"""Idempotent submission: a SubmitJob whose answer is lost on the wire after the coordinator recorded the job is sent
again by the client with the same request id and answers that job; two submissions with one id racing each other
make one job (the unique constraint decides); an id reused for a different job is refused. SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import Job
from coordinator.submissions import Submission
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from fedmeki_core.wire import read_manifest
from tests.conftest import address, enroll, wait_until
from tests.silo_wire import job_spec, submission_messages, submit_raw, weights_bytes

_PREFACE = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", then frames
_DATA, _END_STREAM = 0, 0x1


class AnswerCuttingProxy:
    """A TCP proxy to the coordinator that loses the answer of the first call made through it: once that
    connection's client has sent the end of its request (an HTTP/2 DATA frame with END_STREAM), every byte the
    coordinator sends back on it is dropped, and `cut()` then closes it, as a failing network would (unless the
    client's keepalive gave up on the silence first). Later connections are forwarded whole."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self.request_ended = threading.Event()  # the first connection's request went through, whole
        self.dropped_bytes = 0  # of the coordinator's answer on the first connection
        self._first: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        for sock in self._first:
            with contextlib.suppress(OSError):  # closed already: the client's keepalive gave up on the silence
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self.connections += 1
            lossy = self.connections == 1
            if lossy:
                self._first = [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream, lossy), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, lossy), daemon=True).start()

    def _requests(self, source: socket.socket, sink: socket.socket, lossy: bool) -> None:
        frames = b""
        with source, sink:
            try:
                while data := source.recv(1 << 16):
                    if lossy and not self.request_ended.is_set():  # before forwarding: no answer can come first
                        frames = self._watch_frames(frames + data)
                    sink.sendall(data)
            except OSError:
                pass

    def _watch_frames(self, frames: bytes) -> bytes:
        """Reads whole frames off the client's bytes (after the preface); sets `request_ended` at END_STREAM."""
        if len(frames) < _PREFACE:
            return frames
        view = frames[_PREFACE:]
        while len(view) >= 9 and len(view) >= 9 + int.from_bytes(view[:3], "big"):
            if view[3] == _DATA and view[4] & _END_STREAM:
                self.request_ended.set()
            view = view[9 + int.from_bytes(view[:3], "big") :]
        return frames[:_PREFACE] + view

    def _answers(self, source: socket.socket, sink: socket.socket, lossy: bool) -> None:
        with source, sink:
            try:
                while data := source.recv(1 << 16):
                    if lossy and self.request_ended.is_set():
                        self.dropped_bytes += len(data)  # the answer vanishes on the way
                        continue
                    sink.sendall(data)
            except OSError:
                pass


@pytest.fixture
def proxy(coordinator: Coordinator) -> Iterator[AnswerCuttingProxy]:
    instance = AnswerCuttingProxy(coordinator.port)
    yield instance
    instance.close()


def _job_ids(coordinator: Coordinator) -> list[str]:
    with coordinator.database.read() as session:
        return list(session.scalars(select(Job.id)))


def _checkpoint_folders(coordinator: Coordinator) -> list[str]:
    return sorted(p.name for p in (coordinator.artifacts.root / "checkpoints").iterdir())


def test_a_submission_whose_answer_was_lost_is_sent_again_and_answers_the_same_job(
    coordinator: Coordinator, proxy: AnswerCuttingProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedmeki_core.client")
    enroll(coordinator, "a")
    weights = tmp_path / "initial.safetensors"
    weights.write_bytes(weights_bytes())
    spec = parse_job_spec({"name": "once", "task": "synthetic-vitals", "rounds": 1})
    answers: list[str] = []
    with FedmekiClient(f"127.0.0.1:{proxy.port}") as client:
        submitting = threading.Thread(
            target=lambda: answers.append(client.submit_job(spec, weights, check_model=False).id)
        )
        submitting.start()
        assert proxy.request_ended.wait(timeout=120)  # the client imports torch first: slow on a loaded machine
        wait_until(lambda: _job_ids(coordinator) and proxy.dropped_bytes)  # recorded; its answer dropped on the wire
        assert not answers
        proxy.cut()
        submitting.join(timeout=60)
    assert not submitting.is_alive()
    assert proxy.connections == 2, "the submission was not sent again"
    assert "no answer from the coordinator" in caplog.text
    assert answers == _job_ids(coordinator), "a second job was made, or the retry answered another"
    assert _checkpoint_folders(coordinator) == answers  # no second weights file either


def test_two_submissions_racing_with_one_request_id_make_one_job(coordinator: Coordinator) -> None:
    # The first reads its header and looks for an earlier job (none), then stalls before its weights; the second
    # comes and goes whole meanwhile. When the first's weights arrive, only the unique constraint can stop it.
    enroll(coordinator, "a")
    weights, spec = weights_bytes(), job_spec(name="raced")
    release = threading.Event()

    def held() -> Iterator[jobs_pb2.SubmitJobRequest]:
        messages = submission_messages(spec, weights, request_id="run-7")
        yield next(messages)
        release.wait(timeout=60)
        yield from messages

    answers: list[common_pb2.Job] = []
    with grpc.insecure_channel(address(coordinator)) as channel:
        first = threading.Thread(target=lambda: answers.append(jobs_pb2_grpc.JobServiceStub(channel).SubmitJob(held())))
        first.start()
        incoming = coordinator.artifacts.root / "incoming" / "submissions"
        wait_until(lambda: incoming.is_dir() and any(incoming.iterdir()))  # the first passed its lookup
        second = submit_raw(address(coordinator), spec, weights, request_id="run-7")
        release.set()
        first.join(timeout=60)
    assert [a.id for a in answers] == [second.id] == _job_ids(coordinator)
    assert _checkpoint_folders(coordinator) == [second.id]


def test_a_request_id_reused_for_another_job_is_refused(coordinator: Coordinator) -> None:
    enroll(coordinator, "a")
    job = submit_raw(address(coordinator), job_spec(name="first"), weights_bytes(), request_id="r1")
    again = submit_raw(address(coordinator), job_spec(name="first"), weights_bytes(), request_id="r1")
    assert again.id == job.id
    for spec, weights in ((job_spec(name="second"), weights_bytes()), (job_spec(name="first"), weights_bytes(1))):
        with pytest.raises(grpc.RpcError) as info:
            submit_raw(address(coordinator), spec, weights, request_id="r1")
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert f"request id 'r1' was already used for job {job.id}" in (info.value.details() or "")
    assert _job_ids(coordinator) == [job.id]


@pytest.mark.parametrize("request_id", ["x" * 65, "with space", "new\nline", "é"])
def test_a_malformed_request_id_is_invalid_argument(coordinator: Coordinator, request_id: str) -> None:
    enroll(coordinator, "a")
    with pytest.raises(grpc.RpcError) as info:
        submit_raw(address(coordinator), job_spec(), weights_bytes(), request_id=request_id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id must be 1 to 64 characters" in (info.value.details() or "")
    assert _job_ids(coordinator) == []


def test_a_request_id_is_one_submitters_own(coordinator: Coordinator) -> None:
    enroll(coordinator, "a")
    spec = parse_job_spec({"name": "mine", "task": "synthetic-vitals", "rounds": 1})
    jobs = []
    for researcher in ("researcher:ann", "researcher:bob", "researcher:ann"):
        spool = coordinator.artifacts.spool("submissions")
        spool.write(weights_bytes())
        spool.sync()
        submission = Submission.of(researcher, "same-id", spec, spool.size, spool.sha256)
        jobs.append(coordinator.scheduler.create_job(spec, spool, read_manifest(spool.path), submission).id)
        coordinator.artifacts.discard(spool)
    assert jobs[0] != jobs[1] and jobs[2] == jobs[0]
    assert sorted(_job_ids(coordinator)) == sorted(jobs[:2])
