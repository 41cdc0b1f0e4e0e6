"""The coordinator as an operator meets it: health, reflection, the silo commands (migrations: test_migrations)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.cli import main as coordinator_main
from coordinator.server import Coordinator
from fedmeki_core.errors import InvalidInputError
from tests.conftest import address


def test_health_reports_serving_for_both_services(sqlite_coordinator: Coordinator) -> None:
    with grpc.insecure_channel(address(sqlite_coordinator)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedmeki.v1.JobService", "fedmeki.v1.SiloService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services(sqlite_coordinator: Coordinator) -> None:
    with grpc.insecure_channel(address(sqlite_coordinator)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"fedmeki.v1.JobService", "fedmeki.v1.SiloService", "grpc.health.v1.Health"} <= names


def test_silo_commands_register_list_and_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = ["--data-dir", str(tmp_path)]
    assert coordinator_main(["silo", "add", "st-mary", *data_dir]) == 0
    out = capsys.readouterr().out
    assert "enrollment token (shown once, good for 7 days, 0:00:00): fmk-enroll-" in out
    assert coordinator_main(["silo", "add", "st-mary", *data_dir]) == 2
    assert "already exists" in capsys.readouterr().err
    assert coordinator_main(["silo", "add", "bad name!", *data_dir]) == 2
    assert coordinator_main(["silo", "list", *data_dir]) == 0
    listing = capsys.readouterr().out
    assert "st-mary" in listing and " no " in listing
    assert coordinator_main(["silo", "revoke", "st-mary", *data_dir]) == 0
    assert coordinator_main(["silo", "revoke", "nobody", *data_dir]) == 2
    assert "no silo named 'nobody'" in capsys.readouterr().err


def test_settings_come_from_yaml_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.settings import CoordinatorSettings

    config = tmp_path / "coordinator.yaml"
    config.write_text("address: 0.0.0.0:7000\nkeep_updates: true\nmax_poll_seconds: 5\n")
    monkeypatch.setenv("FEDMEKI_COORDINATOR_MAX_POLL_SECONDS", "7")
    settings = CoordinatorSettings.load(config, data_dir=tmp_path / "d", address=None)
    assert settings.address == "0.0.0.0:7000" and settings.keep_updates and settings.max_poll_seconds == 7
    assert settings.database_url == f"sqlite:///{(tmp_path / 'd' / 'coordinator.db').resolve()}"
    assert CoordinatorSettings.load(config, address="127.0.0.1:9").address == "127.0.0.1:9"
    config.write_text("adress: typo\n")
    with pytest.raises(InvalidInputError, match="setting adress: Extra inputs are not permitted"):
        CoordinatorSettings.load(config)
