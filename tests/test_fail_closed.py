"""The coordinator fails closed: plaintext only on loopback unless asked for, one coordinator per port, data
directory and database (a second one refuses to start and names what holds it)."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.cli import main
from coordinator.instance import is_loopback
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from fedmeki_core.errors import PreconditionError, UnavailableError
from tests.agents import serve_coordinator, stop_coordinator
from tests.conftest import coordinator_settings, serving


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_without_a_kit_a_wildcard_address_is_refused_before_anything_is_bound_or_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()
    data_dir = tmp_path / "data"
    code = main(["serve", "--address", f"0.0.0.0:{port}", "--data-dir", str(data_dir)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"refusing to serve plaintext on 0.0.0.0:{port}" in error and "--insecure-plaintext" in error
    assert not (data_dir / "coordinator.db").exists()  # nothing migrated, nothing tidied
    with socket.socket() as again:
        again.bind(("0.0.0.0", port))  # noqa: S104 - the port was never taken


@pytest.mark.parametrize(
    "overrides",
    [
        {"address": "0.0.0.0:0"},
        {"address": "[::]:0"},
        {"address": "fl.example.org:0"},
        {"address": "127.0.0.1:0", "dashboard_address": "0.0.0.0:0"},
    ],
)
def test_plaintext_off_loopback_needs_the_explicit_flag(tmp_path: Path, overrides: dict[str, str]) -> None:
    coordinator = Coordinator(coordinator_settings(tmp_path / "c", **overrides))
    with pytest.raises(PreconditionError, match="refusing to serve plaintext"):
        coordinator.start()


def test_the_insecure_flag_serves_plaintext_on_every_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMEKI_COORDINATOR_INSECURE_PLAINTEXT", "true")
    settings = CoordinatorSettings.load(None, address="0.0.0.0:0", data_dir=tmp_path / "c", grace_seconds=0)
    assert settings.insecure_plaintext
    for coordinator in serving(Coordinator(settings)):
        with grpc.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_loopback_addresses() -> None:
    assert all(is_loopback(a) for a in ("127.0.0.1:1", "127.1.2.3:1", "[::1]:1", "localhost:1"))
    assert not any(is_loopback(a) for a in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "host.example.org:1"))


def test_a_second_coordinator_on_a_bound_port_fails_to_start(tmp_path: Path) -> None:
    for first in serving(Coordinator(coordinator_settings(tmp_path / "first"))):
        second = Coordinator(coordinator_settings(tmp_path / "second", address=f"127.0.0.1:{first.port}"))
        with pytest.raises(UnavailableError, match=f"cannot listen on 127.0.0.1:{first.port} \\(address\\)"):
            second.start()
        second.stop(grace=0)


def test_a_second_coordinator_on_the_same_data_directory_refuses_to_start(tmp_path: Path, database_url: str) -> None:
    data_dir = tmp_path / "data"
    for _first in serving(Coordinator(coordinator_settings(data_dir, database_url))):
        partial = data_dir / "incoming" / "job" / "r00001-silo-abc.part"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"half an upload")
        second = Coordinator(coordinator_settings(data_dir, f"sqlite:///{tmp_path / 'other.db'}"))
        with pytest.raises(UnavailableError, match=r"another coordinator .*pid \d+.* the data directory"):
            second.start()
        assert partial.read_bytes() == b"half an upload"  # the refused one tidied nothing
    for _third in serving(Coordinator(coordinator_settings(data_dir, database_url))):
        pass  # the lock went with the first


def test_a_second_coordinator_on_the_same_database_refuses_to_start(tmp_path: Path, database_url: str) -> None:
    for _first in serving(Coordinator(coordinator_settings(tmp_path / "first", database_url))):
        second = Coordinator(coordinator_settings(tmp_path / "second", database_url))
        with pytest.raises(UnavailableError, match=r"another coordinator .* the database"):
            second.start()
        second.stop(grace=0)
    for _third in serving(Coordinator(coordinator_settings(tmp_path / "third", database_url))):
        pass


def test_a_running_coordinator_process_is_named_and_its_death_frees_the_locks(
    tmp_path: Path, database_url: str
) -> None:
    data_dir = tmp_path / "data"
    process, _ = serve_coordinator(data_dir, database_url, "127.0.0.1:0", tmp_path / "first.log")
    try:
        second = Coordinator(coordinator_settings(data_dir, database_url))
        with pytest.raises(UnavailableError, match=f"another coordinator \\(pid {process.pid} on "):
            second.start()
        process.kill()  # a crash: the kernel and the database drop its locks
        process.wait(timeout=30)
    finally:
        stop_coordinator(process)
    for _after in serving(Coordinator(coordinator_settings(data_dir, database_url))):
        pass
