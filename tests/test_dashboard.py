"""The dashboard over real HTTP: every endpoint against a coordinator running a real job (SQLite and PostgreSQL),
its errors, and its mTLS door: the API's credentials, researcher or admin only, revocation at the next request."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from conftest import address, coordinator_settings
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from in_process import in_process_agents
from sqlalchemy import select

from coordinator.access import AccessControl
from coordinator.audit import AuditLog
from coordinator.certificates import RevocationList
from coordinator.credentials import TokenAuthenticator
from coordinator.dashboard import DashboardEndpoint
from coordinator.server import Coordinator
from coordinator.store.database import Database
from coordinator.store.models import AuditEvent, utcnow
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.app.provision import provision
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import UnavailableError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.kits import CA_FILE, CERT_FILE, KEY_FILE, load_kit
from fedmeki_core.records import JobState
from fedmeki_core.report import task_report
from fedmeki_core.round_report import round_rows
from silo_agent.state import AgentState
from tests.agents import wait_until
from tests.topology import coordinator_process

TASK = "synthetic-vitals"
ROUNDS = 2


@contextmanager
def running(coordinator: Coordinator) -> Iterator[Coordinator]:
    coordinator.start()
    try:
        yield coordinator
    finally:
        coordinator.stop(grace=0)


def get(port: int, path: str, method: str = "GET", tls: ssl.SSLContext | None = None) -> tuple[int, Any, str]:
    """One request on its own connection: the status, the body (parsed when JSON) and the content type."""
    connection = (
        http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        if tls is None
        else http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    )
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        kind = response.headers["Content-Type"]
        if kind == "application/json":
            return response.status, json.loads(body), kind
        return response.status, body.decode(), kind
    finally:
        connection.close()


def as_json(value: object) -> object:
    return json.loads(json.dumps(value))


def test_every_endpoint_follows_a_real_job(tmp_path: Path, database_url: str) -> None:
    settings = coordinator_settings(tmp_path / "coordinator", database_url, dashboard_address="127.0.0.1:0")
    with running(Coordinator(settings)) as coordinator:
        port = coordinator.dashboard_port
        assert port is not None
        agents = in_process_agents(coordinator, tmp_path, TASK, 60)
        spec = parse_job_spec(
            {
                "name": "watched",
                "task": TASK,
                "rounds": ROUNDS,
                "min_silos": 3,
                "algorithm": {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.05},
            }
        )
        with FedmekiClient(address(coordinator)) as client:
            job_id = client.submit_job(spec).id
            assert get(port, f"/api/jobs/{job_id}")[0] == 200
            wait_until(lambda: get(port, f"/api/jobs/{job_id}")[1]["rounds"], 30, lambda: "round 1 never opened")
            started = get(port, f"/api/jobs/{job_id}")[1]
            assert (started["state"], started["current_round"], started["total_rounds"]) == ("running", 0, ROUNDS)
            assert [(r["number"], r["updates"], r["closed_at"]) for r in started["rounds"]] == [(1, 0, None)]
            while not client.get_job(job_id).state.finished:
                for agent in agents:
                    agent.run_once()
                # The list follows the job round by round (the tick may commit a round between two reads).
                before = coordinator.scheduler.status(job_id).current_round
                _, seen, _ = get(port, "/api/jobs")
                assert before <= seen["jobs"][0]["current_round"] <= coordinator.scheduler.status(job_id).current_round
        final = coordinator.scheduler.status(job_id)
        assert final.state == JobState.COMPLETED, final.reason

        status, page, kind = get(port, "/")
        assert (status, kind) == (200, "text/html; charset=utf-8")
        assert '<script src="/static/dashboard.js"' in page
        for path, expected in (("/static/dashboard.js", "text/javascript"), ("/static/dashboard.css", "text/css")):
            status, _, kind = get(port, path)
            assert status == 200 and kind.startswith(expected)

        status, listed, _ = get(port, "/api/jobs?unused=1")
        assert status == 200
        (line,) = listed["jobs"]
        assert line["id"] == job_id
        assert (line["name"], line["state"], line["task"], line["algorithm"]) == (
            "watched",
            "completed",
            TASK,
            "fedavg",
        )
        assert line["current_round"] == final.current_round

        status, job, _ = get(port, f"/api/jobs/{job_id}")
        assert status == 200
        assert [(r["number"], r["kind"], r["state"]) for r in job["rounds"]] == [
            (1, "train", "committed"),
            (2, "train", "committed"),
            (3, "evaluate", "committed"),
        ]
        for summary, shown in zip(final.rounds, job["rounds"], strict=True):
            assert shown["selected_silos"] == ["silo-0", "silo-1", "silo-2"]
            assert shown["reported_silos"] == list(summary.reported_silos) and shown["updates"] == 3
            assert summary.opened_at is not None and summary.closed_at is not None
            assert shown["seconds"] == (summary.closed_at - summary.opened_at).total_seconds()
            assert shown["metrics"] == summary.metrics
        assert final.latest_checkpoint is not None
        assert job["latest_checkpoint"]["round"] == final.latest_checkpoint.round == ROUNDS

        status, metrics, _ = get(port, f"/api/jobs/{job_id}/metrics")
        assert status == 200
        assert metrics["rows"] == as_json([asdict(row) for row in round_rows(final)])
        assert metrics["tasks"] == as_json([asdict(row) for row in task_report(final)])
        curve = [(r["checkpoint"], r["value"]) for r in metrics["rows"] if r["silo"] == "all"]
        assert [checkpoint for checkpoint, _ in curve] == [0, 1, 2] and all(v is not None for _, v in curve)

        status, silos, _ = get(port, "/api/silos")
        assert status == 200
        assert [(s["name"], s["role"], s["enrolled"], s["revoked"], s["connected"]) for s in silos["silos"]] == [
            (f"silo-{i}", "trainer", True, False, True) for i in range(3)
        ]
        assert all(s["last_seen_at"] and s["device"] == "cpu" for s in silos["silos"])
        enrollments = [AgentState(tmp_path / f"silo-{i}").enrollment() for i in range(3)]
        credentials = [enrollment.credential for enrollment in enrollments if enrollment is not None]
        assert len(credentials) == 3
        for path in ("/api/jobs", f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/metrics", "/api/silos"):
            text = json.dumps(get(port, path)[1])
            assert not any(credential in text for credential in credentials)
            assert "hash" not in text and "token" not in text

        for path in ("/nowhere", "/api/jobs/not-a-job", f"/api/jobs/{'0' * 32}/metrics", "/api/jobs/x/y/z"):
            status, body, kind = get(port, path)
            assert (status, kind) == (404, "application/json"), path
            assert body["error"].startswith("no "), body
        for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request(method, f"/api/jobs/{job_id}", body=b"{}")
            response = connection.getresponse()
            assert (response.status, response.headers["Allow"]) == (405, "GET"), method
            if method != "HEAD":
                assert "read-only" in json.loads(response.read())["error"]
            connection.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # http.server's own 400, as JSON
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            answer = raw.makefile("rb").read()
        assert json.loads(answer) == {"error": "Bad request version ('ALL')"}  # no status line: it is no HTTP/1.x
        assert coordinator.scheduler.status(job_id) == final  # nothing a request did changed the job

    with pytest.raises(ConnectionRefusedError):  # stopped with the coordinator
        get(port, "/api/jobs")


def test_the_serve_command_opens_the_dashboard_and_sigterm_closes_it(tmp_path: Path) -> None:
    with coordinator_process(
        tmp_path / "coordinator", ["--data-dir", str(tmp_path / "data"), "--dashboard-address", "127.0.0.1:0"]
    ) as process:
        assert process.dashboard_port is not None
        assert get(process.dashboard_port, "/api/jobs") == (200, {"jobs": []}, "application/json")
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(timeout=30) == 0, process.output()
    with pytest.raises(ConnectionRefusedError):
        get(process.dashboard_port, "/api/jobs")


def test_a_dashboard_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'coordinator.db'}")
    access = AccessControl(TokenAuthenticator(database), AuditLog(database))
    first = DashboardEndpoint("127.0.0.1:0", database, access, 120.0, utcnow)
    port = first.start()
    try:
        with pytest.raises(UnavailableError, match=rf"cannot listen on 127.0.0.1:{port} \(dashboard_address\)"):
            DashboardEndpoint(f"127.0.0.1:{port}", database, access, 120.0, utcnow).start()
    finally:
        first.stop()
        database.dispose()


def test_an_unreadable_database_answers_503_and_the_page_still_loads(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'no-such-folder' / 'coordinator.db'}")
    endpoint = DashboardEndpoint(
        "127.0.0.1:0", database, AccessControl(TokenAuthenticator(database), AuditLog(database)), 120.0, utcnow
    )
    port = endpoint.start()
    try:
        for path in ("/api/jobs", "/api/silos", f"/api/jobs/{'a' * 32}"):
            status, body, _ = get(port, path)
            assert (status, body) == (503, {"error": "the coordinator's database is unavailable; try again shortly"})
        assert get(port, "/")[0] == 200
    finally:
        endpoint.stop()
        database.dispose()


# -- mTLS -----------------------------------------------------------------------------------------------------------


def kit_context(kit: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A client context that trusts the project CA (`ca`, default the kit's) and presents the kit's certificate."""
    context = ssl.create_default_context(cafile=str((ca or kit) / CA_FILE))
    context.load_cert_chain(kit / CERT_FILE, kit / KEY_FILE)
    return context


def p12_context(kits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """What a browser holds after importing `fedmeki kit export-p12 kits/alice`: alice's key and certificate."""
    bundle = tmp_path / "alice.p12"
    monkeypatch.setenv("P12_PASSWORD", "correct horse")
    assert (
        fedmeki_main(["kit", "export-p12", str(kits / "alice"), "-o", str(bundle), "--password-env", "P12_PASSWORD"])
        == 0
    )
    assert bundle.stat().st_mode & 0o777 == 0o600
    assert fedmeki_main(["kit", "export-p12", str(kits / "hospital-a"), "-o", str(tmp_path / "silo.p12")]) != 0
    key, certificate, cas = pkcs12.load_key_and_certificates(bundle.read_bytes(), b"correct horse")
    assert key is not None and certificate is not None and len(cas) == 1
    pem = tmp_path / "alice-from-p12.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + certificate.public_bytes(serialization.Encoding.PEM)
    )
    context = ssl.create_default_context(cadata=cas[0].public_bytes(serialization.Encoding.PEM).decode())
    context.load_cert_chain(pem)
    return context


def test_mtls_takes_researchers_and_admins_and_refuses_everyone_else(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kits = tmp_path / "kits"
    provision(kits, "127.0.0.1", silos=["hospital-a"], researchers=["alice", "bob"])
    provision(tmp_path / "foreign", "127.0.0.1", researchers=["mallory"])
    settings = coordinator_settings(
        tmp_path / "coordinator", database_url, kit=kits / "coordinator", dashboard_address="127.0.0.1:0"
    )
    with running(Coordinator(settings)) as coordinator:
        coordinator.registry.add("hospital-a")
        port = coordinator.dashboard_port
        assert port is not None

        for name in ("alice", "admin", "bob"):
            for path in ("/", "/api/jobs", "/api/silos"):
                assert get(port, path, tls=kit_context(kits / name))[0] == 200, (name, path)
        assert get(port, "/", tls=p12_context(kits, tmp_path, monkeypatch))[0] == 200

        def refused(tls: ssl.SSLContext) -> tuple[int, str, str]:
            before = audit_ids(coordinator)
            status, body, _ = get(port, "/api/jobs", tls=tls)
            (row,) = audit_rows(coordinator, before)
            return status, body["error"], f"{row.action} {row.actor} {row.status}"

        assert refused(kit_context(kits / "hospital-a")) == (
            403,
            "this call needs a researcher or admin certificate; it presents the silo certificate of 'hospital-a'",
            "Dashboard silo:hospital-a PERMISSION_DENIED",
        )
        anonymous = ssl.create_default_context(cafile=str(kits / "alice" / CA_FILE))
        assert refused(anonymous) == (
            401,
            "no verified client certificate: connect with a startup kit",
            "Dashboard unknown UNAUTHENTICATED",
        )
        bob = load_kit(kits / "bob").identity
        RevocationList(coordinator.database).revoke(bob.serial, bob.label, "left the project")
        status, message, audited = refused(kit_context(kits / "bob"))
        assert (status, audited) == (403, "Dashboard researcher:bob PERMISSION_DENIED")
        assert "has been revoked" in message

        before = audit_ids(coordinator)
        with pytest.raises((ssl.SSLError, ConnectionError)):  # another CA's certificate: the handshake fails
            get(port, "/api/jobs", tls=kit_context(tmp_path / "foreign" / "mallory", ca=kits / "alice"))
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):  # plain HTTP on the TLS port
            get(port, "/api/jobs")
        assert audit_rows(coordinator, before) == []
        assert get(port, "/api/jobs", tls=kit_context(kits / "alice"))[0] == 200  # and the port still serves


def audit_ids(coordinator: Coordinator) -> set[int]:
    with coordinator.database.read() as session:
        return set(session.scalars(select(AuditEvent.id)))


def audit_rows(coordinator: Coordinator, before: set[int]) -> list[AuditEvent]:
    with coordinator.database.read() as session:
        return [row for row in session.scalars(select(AuditEvent).order_by(AuditEvent.id)) if row.id not in before]
