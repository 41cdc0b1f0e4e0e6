"""mTLS with startup kits, on loopback: identities come from verified certificates only; every refusal has its
exact status, leaves no job or update row behind and one audit row; no RPC lets a silo read another's update."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save
from sqlalchemy import func, select

from coordinator.cli import main as coordinator_main
from coordinator.server import Coordinator
from coordinator.store.models import AuditEvent, Job, Silo, Update
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.app.provision import CA_FOLDER, ProjectCA, provision
from fedmeki_core.channels import open_channel
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.kits import Kit, Role, load_kit
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, silo_pb2
from fedmeki_core.records import JobState, JobStatus, RoundState
from tests.agents import AGENTS_SEEN_SECONDS, describe_job, running_agents, wait_until
from tests.conftest import address, coordinator_settings
from tests.silo_wire import TASK, RawSilo, job_spec, submit_raw, tensors, weights_bytes

SILOS = ("a", "b", "unregistered", "to-revoke")
CANARY = b"CANARY-B"  # as float32s: 12.89 and 43.34, finite, so the update is valid
STREAMS = {"WatchJob", "DownloadCheckpoint", "DownloadModel"}


@dataclass
class Project:
    """A provisioned project and its coordinator, serving mTLS with the coordinator's kit."""

    coordinator: Coordinator
    kits: Path
    operator_args: list[str]  # --data-dir and --db of the coordinator, for the operator's commands

    @property
    def address(self) -> str:
        return address(self.coordinator)

    def kit(self, name: str) -> Kit:
        return load_kit(self.kits / name)

    def silo(self, name: str, credential: str = "") -> RawSilo:
        return RawSilo(self.address, credential, self.kit(name))

    def job_call(self, kit_name: str, method: str, request: object) -> object:
        """One JobService call as the named kit's site; streamed responses are read to the end."""
        with open_channel(self.address, self.kit(kit_name)) as channel:
            response = getattr(jobs_pb2_grpc.JobServiceStub(channel), method)(request)
            return list(response) if method in STREAMS else response

    def submit(self, kit_name: str, **fields: object) -> str:
        return str(submit_raw(self.address, job_spec(**fields), weights_bytes(), kit=self.kit(kit_name)).id)

    def count(self, model: type) -> int:
        with self.coordinator.database.read() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)

    def counts(self) -> tuple[int, int, int]:
        return self.count(Job), self.count(Update), self.count(AuditEvent)

    def last_audit(self) -> AuditEvent:
        with self.coordinator.database.read() as session:
            row = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).first()
        assert row is not None
        return row

    def wait(self, job_id: str, predicate: Callable[[JobStatus], bool], timeout: float = 20.0) -> JobStatus:
        give_up = time.monotonic() + timeout
        while True:
            status = self.coordinator.scheduler.status(job_id)
            if predicate(status):
                return status
            assert time.monotonic() < give_up, f"job stuck: {status.state} {status.rounds}"
            time.sleep(0.02)


def _start_project(tmp_path: Path, database_url: str) -> Iterator[Project]:
    kits = tmp_path / "kits"
    provision(kits, "127.0.0.1", silos=SILOS, researchers=["alice", "bob"])
    data_dir = tmp_path / "coordinator"
    coordinator = Coordinator(coordinator_settings(data_dir, database_url, kit=kits / "coordinator", keep_updates=True))
    coordinator.start()
    for name in ("a", "b", "to-revoke"):  # "unregistered" has a kit but no silo row
        coordinator.registry.add(name)
    try:
        yield Project(coordinator, kits, ["--data-dir", str(data_dir), "--db", database_url])
    finally:
        coordinator.stop(grace=0)


@pytest.fixture
def project(tmp_path: Path, database_url: str) -> Iterator[Project]:
    yield from _start_project(tmp_path, database_url)


@pytest.fixture
def sqlite_project(tmp_path: Path) -> Iterator[Project]:
    yield from _start_project(tmp_path, f"sqlite:///{tmp_path / 'coordinator.db'}")


def _rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _update(value: float = 0.25) -> bytes:
    return save(tensors(value))


def _canary_update() -> bytes:
    sizes = {name: array.nbytes for name, array in tensors(0.0).items()}
    return save(
        {
            name: np.frombuffer((CANARY * (size // len(CANARY) + 1))[:size], dtype=np.float32).reshape(array.shape)
            for (name, size), array in zip(sizes.items(), tensors(0.0).values(), strict=True)
        }
    )


def _training(project: Project, job_id: str, silos: tuple[str, ...]) -> None:
    project.wait(
        job_id,
        lambda s: bool(s.rounds) and s.rounds[-1].state == RoundState.TRAINING and s.rounds[-1].selected_silos == silos,
    )


def _two_jobs(project: Project) -> tuple[str, str]:
    """Job 1 trains on a and b; job 2 on b only. Both in round 1."""
    project.silo("a").poll()
    project.silo("b").poll()  # a certificate's first call enrolls its registered silo
    job1 = project.submit("alice", min_silos=2)
    job2 = project.submit("alice", silos=["b"])
    _training(project, job1, ("a", "b"))
    _training(project, job2, ("b",))
    return job1, job2


def test_every_refusal_has_its_exact_status_changes_nothing_and_is_audited(project: Project) -> None:
    job1, job2 = _two_jobs(project)
    a, alice_as_silo = project.silo("a"), project.silo("alice")
    code = grpc.StatusCode
    cases: list[tuple[str, Callable[[], object], grpc.StatusCode, str, str]] = [
        (
            "a certificate of the CA for a silo the operator never registered",
            lambda: project.silo("unregistered").poll(),
            code.UNAUTHENTICATED,
            "silo:unregistered",
            "no registered silo named 'unregistered'",
        ),
        (
            "a researcher's certificate polling for silo work",
            lambda: alice_as_silo.poll(),
            code.PERMISSION_DENIED,
            "researcher:alice",
            "this call needs a silo certificate; it presents the researcher certificate of 'alice'",
        ),
        (
            "a researcher's certificate uploading an update",
            lambda: alice_as_silo.upload(job1, 1, _update()),
            code.PERMISSION_DENIED,
            "researcher:alice",
            "needs a silo certificate",
        ),
        (
            "a researcher's certificate downloading a silo's model",
            lambda: alice_as_silo.call("DownloadModel", silo_pb2.DownloadModelRequest(job_id=job1)),
            code.PERMISSION_DENIED,
            "researcher:alice",
            "needs a silo certificate",
        ),
        (
            "a researcher's certificate reporting an evaluation",
            lambda: alice_as_silo.call(
                "ReportEvaluation", silo_pb2.ReportEvaluationRequest(job_id=job1, round=1, num_samples=5)
            ),
            code.PERMISSION_DENIED,
            "researcher:alice",
            "needs a silo certificate",
        ),
        (
            "a silo submitting a job",
            lambda: submit_raw(project.address, job_spec(), weights_bytes(), kit=project.kit("a")),
            code.PERMISSION_DENIED,
            "silo:a",
            "this call needs a researcher or admin certificate; it presents the silo certificate of 'a'",
        ),
        *[
            (
                f"a silo calling {method}",
                lambda method=method, request=request: project.job_call("a", method, request),
                code.PERMISSION_DENIED,
                "silo:a",
                "needs a researcher or admin certificate",
            )
            for method, request in [
                ("ListJobs", jobs_pb2.ListJobsRequest()),
                ("GetJob", jobs_pb2.GetJobRequest(job_id=job2)),
                ("WatchJob", jobs_pb2.WatchJobRequest(job_id=job2)),
                ("DownloadCheckpoint", jobs_pb2.DownloadCheckpointRequest(job_id=job2, round=0)),
                ("CancelJob", jobs_pb2.CancelJobRequest(job_id=job1)),
            ]
        ],
        (
            "a researcher cancelling another researcher's job (an admin's call)",
            lambda: project.job_call("bob", "CancelJob", jobs_pb2.CancelJobRequest(job_id=job1)),
            code.PERMISSION_DENIED,
            "researcher:bob",
            "was submitted by researcher:alice: only they or an admin may cancel it",
        ),
        (
            "a silo downloading the model of a job it was not selected for",
            lambda: a.call("DownloadModel", silo_pb2.DownloadModelRequest(job_id=job2, round=0)),
            code.NOT_FOUND,
            "silo:a",
            f"no job {job2!r} for silo 'a'",
        ),
        (
            "a silo uploading to a job it was not selected for",
            lambda: a.upload(job2, 1, _update()),
            code.FAILED_PRECONDITION,
            "silo:a",
            "silo 'a' is not selected for round 1",
        ),
        (
            "a silo reporting an evaluation of a job it was not selected for",
            lambda: a.call("ReportEvaluation", silo_pb2.ReportEvaluationRequest(job_id=job2, round=1, num_samples=5)),
            code.FAILED_PRECONDITION,
            "silo:a",
            "silo 'a' is not selected for round 1",
        ),
        (
            "a silo asking to enroll with a token over mTLS",
            lambda: a.call("Enroll", silo_pb2.EnrollRequest(token="fmk-enroll_anything")),
            code.FAILED_PRECONDITION,
            "silo:a",
            "identifies silos by their startup-kit certificates",
        ),
    ]
    for what, call, status, actor, detail in cases:
        jobs, updates, audits = project.counts()
        error = _rpc_error(call)
        assert (error.code(), detail in (error.details() or "")) == (status, True), (what, error.details())
        assert project.counts() == (jobs, updates, audits + 1), what
        row = project.last_audit()
        assert (row.actor, row.status, row.detail) == (actor, status.name, error.details()), what
        assert row.peer.startswith("ipv4:127.0.0.1:"), what
    assert {s.state.value for s in (project.coordinator.scheduler.status(j) for j in (job1, job2))} == {"running"}


def test_the_certificate_names_the_silo_whatever_the_request_says(project: Project) -> None:
    job1, _ = _two_jobs(project)
    # a's certificate, with a bearer credential and a header that both claim to be b: neither is read
    a_claiming_b = project.silo("a", credential="fmk-silo_b")
    receipt = a_claiming_b.upload(job1, 1, _update(0.25))
    assert receipt.round == 1
    with project.coordinator.database.read() as session:
        silo_of_update = session.scalars(
            select(Silo.name).join(Update, Update.silo_id == Silo.id).where(Update.job_id == job1)
        ).all()
    assert silo_of_update == ["a"]
    row = project.last_audit()
    assert (row.actor, row.action, row.job_id, row.round_number, row.status) == (
        "silo:a",
        "UploadUpdate",
        job1,
        1,
        "OK",
    )
    error = _rpc_error(lambda: a_claiming_b.upload(job1, 1, _update(0.5)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "silo 'a' already reported" in error.details()
    assert project.silo("b").upload(job1, 1, _update(0.5)).round == 1  # b's place was never taken
    project.wait(job1, lambda s: s.rounds[0].state == RoundState.COMMITTED)
    assert project.coordinator.scheduler.status(job1).rounds[0].reported_silos == ("a", "b")


def test_the_handshake_refuses_missing_foreign_and_expired_certificates(project: Project, tmp_path: Path) -> None:
    project.silo("a").poll()
    ca_pem = (project.kits / CA_FOLDER / "ca.crt").read_bytes()
    now = datetime.now(UTC)
    foreign = ProjectCA.create("elsewhere").issue(Role.SILO, "a")
    expired = ProjectCA.load(project.kits / CA_FOLDER).issue(
        Role.SILO, "a", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )

    def as_silo(issued_cert: bytes, issued_key: bytes) -> RawSilo:
        kit = Kit(tmp_path, Role.SILO, "a", project.address, ca_pem, issued_cert, issued_key)
        return RawSilo(project.address, kit=kit)

    def without_certificate() -> object:
        with grpc.secure_channel(project.address, grpc.ssl_channel_credentials(ca_pem)) as channel:
            return jobs_pb2_grpc.JobServiceStub(channel).ListJobs(jobs_pb2.ListJobsRequest(), timeout=10)

    cases: dict[str, Callable[[], object]] = {
        "no client certificate": without_certificate,
        "a certificate from a foreign CA": lambda: as_silo(foreign.cert_pem, foreign.key_pem).poll(),
        "an expired certificate of the project CA": lambda: as_silo(expired.cert_pem, expired.key_pem).poll(),
        "plaintext": lambda: RawSilo(project.address).poll(),
    }
    before = project.counts()
    for what, call in cases.items():
        error = _rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (what, error.details())
    # Refused by TLS before any RPC: nothing reached a servicer, so there is nothing to audit either.
    assert project.counts() == before
    assert project.silo("a").poll() is None  # the real kit still works


def test_revocations_take_effect_at_the_next_call_without_a_restart(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    project.silo("to-revoke").poll()
    project.silo("a").poll()
    assert project.job_call("bob", "ListJobs", jobs_pb2.ListJobsRequest()) == jobs_pb2.ListJobsResponse()
    a_serial = project.kit("a").identity.serial
    operator = project.operator_args
    assert coordinator_main(["silo", "revoke", "to-revoke", *operator]) == 0
    assert coordinator_main(["cert", "revoke", "--kit", str(project.kits / "bob"), "--reason", "left", *operator]) == 0
    assert coordinator_main(["cert", "revoke", "--serial", format(a_serial, "X"), *operator]) == 0
    assert coordinator_main(["cert", "revoke", "--serial", format(a_serial, "x"), *operator]) == 2
    assert "is already revoked" in capsys.readouterr().err
    assert coordinator_main(["cert", "list", *operator]) == 0
    listing = capsys.readouterr().out
    assert "researcher:bob" in listing and "left" in listing and format(a_serial, "x") in listing

    cases: list[tuple[Callable[[], object], str, str]] = [
        (lambda: project.silo("to-revoke").poll(), "silo:to-revoke", "silo 'to-revoke' has been revoked"),
        (
            lambda: project.job_call("bob", "ListJobs", jobs_pb2.ListJobsRequest()),
            "researcher:bob",
            f"certificate {project.kit('bob').identity.serial:x} (researcher:bob) has been revoked",
        ),
        (lambda: project.submit("bob"), "researcher:bob", "has been revoked"),
        (lambda: project.silo("a").poll(), "silo:a", f"certificate {a_serial:x} (silo:a) has been revoked"),
    ]
    for call, actor, detail in cases:
        jobs, updates, audits = project.counts()
        error = _rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and detail in error.details(), error.details()
        assert project.counts() == (jobs, updates, audits + 1)
        assert (project.last_audit().actor, project.last_audit().status) == (actor, "PERMISSION_DENIED")
    with project.coordinator.database.read() as session:
        commands = session.scalars(select(AuditEvent.action).where(AuditEvent.actor == "operator")).all()
    assert commands == ["silo revoke", "cert revoke", "cert revoke"]
    assert project.silo("b").poll() is None  # everyone else goes on


def test_a_revoked_silo_certificate_is_never_selected_nor_waited_for(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    project.silo("a").poll()
    project.silo("b").poll()
    waiting = project.submit("alice", rounds=2, round_deadline_seconds=600)
    _training(project, waiting, ("a", "b"))
    assert coordinator_main(["cert", "revoke", "--kit", str(project.kits / "a"), *project.operator_args]) == 0
    capsys.readouterr()
    assert coordinator_main(["silo", "list", *project.operator_args]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["a"][3] == "yes" and rows["b"][3] == "no", rows
    # Round 1 of the running job closes on b's update without waiting 600 s for a; round 2 selects b alone.
    project.silo("b").upload(waiting, 1, _update())
    status = project.wait(waiting, lambda s: len(s.rounds) == 2 and s.rounds[-1].state == RoundState.TRAINING)
    assert status.rounds[-1].selected_silos == ("b",)
    fresh = project.submit("alice")  # a is still "live" (it polled seconds ago), yet never selected
    _training(project, fresh, ("b",))


def test_an_admin_may_cancel_any_job_and_a_researcher_their_own(sqlite_project: Project) -> None:
    project = sqlite_project
    project.silo("a").poll()
    jobs = [project.submit("alice") for _ in range(2)]
    cancelled = project.job_call("alice", "CancelJob", jobs_pb2.CancelJobRequest(job_id=jobs[0]))
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED  # type: ignore[attr-defined]
    cancelled = project.job_call("admin", "CancelJob", jobs_pb2.CancelJobRequest(job_id=jobs[1]))
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED  # type: ignore[attr-defined]
    with project.coordinator.database.read() as session:
        rows = session.execute(
            select(AuditEvent.actor, AuditEvent.action, AuditEvent.job_id, AuditEvent.status).order_by(AuditEvent.id)
        ).all()
    assert [tuple(row) for row in rows] == [
        ("researcher:alice", "SubmitJob", jobs[0], "OK"),
        ("researcher:alice", "SubmitJob", jobs[1], "OK"),
        ("researcher:alice", "CancelJob", jobs[0], "OK"),
        ("admin:admin", "CancelJob", jobs[1], "OK"),
    ]


def test_no_read_path_from_one_silos_update_to_another_silo(sqlite_project: Project) -> None:
    """Silo b's update carries a canary; silo a calls every RPC there is, allowed or not: the canary is in no
    response. (The coordinator does hold it, in b's stored update: the bytes were there to leak.)"""
    project = sqlite_project
    a, b = project.silo("a"), project.silo("b")
    a.poll()
    b.poll()
    job = project.submit("alice", min_silos=2)
    _training(project, job, ("a", "b"))
    canary_update = _canary_update()
    assert CANARY in canary_update
    responses: list[bytes] = []

    def seen(call: Callable[[], object]) -> None:
        try:
            result = call()
        except grpc.RpcError as error:
            responses.append((error.details() or "").encode())
            return
        for message in result if isinstance(result, list) else [result]:
            if message is not None:
                responses.append(message.SerializeToString())

    def download(job_id: str, round_number: int) -> Callable[[], object]:
        request = silo_pb2.DownloadModelRequest(job_id=job_id, round=round_number)
        return lambda: a.call("DownloadModel", request)

    assert b.upload(job, 1, canary_update).round == 1
    seen(lambda: a.poll())
    seen(download(job, 0))
    seen(lambda: a.upload(job, 1, _update(0.0)))
    status = project.wait(job, lambda s: len(s.rounds) == 2 and s.rounds[1].state == RoundState.TRAINING)
    assert status.rounds[0].reported_silos == ("a", "b")
    stored = list((project.coordinator.artifacts.root / "updates").rglob("*.safetensors"))
    assert sum(CANARY in path.read_bytes() for path in stored) == 1

    for round_number in (-1, 0, 1, 2, 7):
        seen(download(job, round_number))
    seen(download("no-such-job", 0))
    seen(lambda: a.poll())
    seen(lambda: a.upload(job, 1, _update(0.0)))
    seen(lambda: a.upload(job, 2, _update(0.0)))
    seen(lambda: a.call("ReportEvaluation", silo_pb2.ReportEvaluationRequest(job_id=job, round=2, num_samples=5)))
    seen(lambda: a.call("ReportEvaluation", silo_pb2.ReportEvaluationRequest(job_id=job, round=1, num_samples=5)))
    seen(lambda: a.call("Enroll", silo_pb2.EnrollRequest(token="fmk-enroll_x")))
    canary_sha256 = hashlib.sha256(canary_update).hexdigest()  # b's partial uploads are b's: a learns nothing
    for round_number in (1, 2):
        offset = silo_pb2.UploadOffsetRequest(job_id=job, round=round_number, sha256=canary_sha256)
        seen(lambda offset=offset: a.call("UploadOffset", offset))
    for method, request in [
        ("ListJobs", jobs_pb2.ListJobsRequest()),
        ("GetJob", jobs_pb2.GetJobRequest(job_id=job)),
        ("WatchJob", jobs_pb2.WatchJobRequest(job_id=job)),
        ("DownloadCheckpoint", jobs_pb2.DownloadCheckpointRequest(job_id=job, round=1)),
        ("CancelJob", jobs_pb2.CancelJobRequest(job_id=job)),
    ]:
        seen(lambda method=method, request=request: project.job_call("a", method, request))
    seen(lambda: submit_raw(project.address, job_spec(), canary_update, kit=project.kit("a")))

    assert TASK.encode() in responses[0]  # a's first poll got its task: responses are what a really saw
    assert len(responses) > 10 and any(len(r) > 100 for r in responses)  # models did come back
    assert [r for r in responses if CANARY in r] == []


def test_silo_agents_and_a_researcher_run_a_job_with_their_kits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kits = tmp_path / "kits"
    provision(kits, "127.0.0.1", silos=["silo-0", "silo-1"], researchers=["alice"])
    coordinator = Coordinator(coordinator_settings(tmp_path / "coordinator", kit=kits / "coordinator"))
    coordinator.start()
    spec = parse_job_spec(
        {
            "name": "over-mtls",
            "task": TASK,
            "rounds": 1,
            "min_silos": 2,
            "round_deadline_seconds": 120,
            "algorithm": {"local_epochs": 1, "batch_size": 32},
        }
    )
    try:
        with (
            running_agents(coordinator, tmp_path / "silos", samples=(96, 64), kits=kits) as agents,
            FedmekiClient(address(coordinator), kit=kits / "alice") as client,
        ):

            def logs() -> str:
                return "\n".join(agent.output()[-2000:] for agent in agents)

            wait_until(
                lambda: all(s.enrolled and s.last_seen_at for s in coordinator.registry.list()),
                AGENTS_SEEN_SECONDS,
                logs,
            )
            job = client.submit_job(spec)
            wait_until(lambda: client.get_job(job.id).state.finished, 180, logs)
            final = client.get_job(job.id)
            assert all("(mTLS)" in agent.output() for agent in agents), logs()
        assert final.state == JobState.COMPLETED, describe_job(final)
        assert final.rounds[0].reported_silos == ("silo-0", "silo-1")
        show = ["job", "show", job.id, "--kit", str(kits / "alice"), "--coordinator", address(coordinator)]
        assert fedmeki_main(show) == 0
        assert "state: completed" in capsys.readouterr().out
    finally:
        coordinator.stop(grace=0)
