"""Messages that name the next step: a plaintext call to an mTLS coordinator says to use a kit, a wrong address
names the address, and a silo started with a kit is not told to enroll with a token."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from coordinator.cli import main as coordinator_main
from coordinator.server import Coordinator
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.app.provision import provision
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import UnavailableError
from fedmeki_core.privacy.he import SECRET_FILE, write_key_files
from fedmeki_core.records import RoundKind
from silo_agent.cli import main as silo_main
from silo_agent.state import AgentState, StoredFile
from tests.conftest import address, coordinator_settings


@pytest.fixture
def mtls_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    provision(tmp_path / "kits", "127.0.0.1", silos=["a"], researchers=["alice"])
    coordinator = Coordinator(coordinator_settings(tmp_path / "co", kit=tmp_path / "kits" / "coordinator"))
    coordinator.start()
    try:
        yield coordinator
    finally:
        coordinator.stop(grace=0)


def test_a_plaintext_call_to_an_mtls_coordinator_says_to_use_a_kit(mtls_coordinator: Coordinator) -> None:
    with FedmekiClient(address(mtls_coordinator)) as client, pytest.raises(UnavailableError) as info:
        client.list_jobs()
    assert f"the coordinator at {address(mtls_coordinator)} closed a plaintext connection" in info.value.message
    assert "connect with a startup kit (--kit DIR)" in info.value.message


def test_enrolling_with_a_token_at_an_mtls_coordinator_says_to_use_a_kit(
    mtls_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enroll = ["enroll", "--coordinator", address(mtls_coordinator), "--token", "t", "--work-dir", str(tmp_path / "s")]
    assert silo_main(enroll) == 2
    assert "connect with a startup kit (--kit DIR)" in capsys.readouterr().err


def test_a_wrong_address_is_named_with_what_to_check() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening: the connection is refused
        with FedmekiClient(closed) as client, pytest.raises(UnavailableError) as info:
            client.get_job("x")
    assert info.value.message.startswith(f"nothing answers at {closed}: check the address and port")


def test_the_status_of_a_silo_started_with_a_kit_is_not_not_enrolled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work_dir = tmp_path / "silo"
    assert silo_main(["status", "--work-dir", str(work_dir)]) == 0
    assert "not enrolled" in capsys.readouterr().out
    with AgentState(work_dir) as state:  # a kit silo's state: tasks, and no token enrollment
        state.record_download("job-1", 1, RoundKind.TRAIN, StoredFile(tmp_path / "checkpoint", "0" * 64))
    assert silo_main(["status", "--work-dir", str(work_dir)]) == 0
    shown = capsys.readouterr().out
    assert "not enrolled" not in shown and "identified by its certificate" in shown and "job-1" in shown


def test_he_model_speaks_mtls_with_a_kit(
    mtls_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    write_key_files(keys)
    model = ["he", "model", "nope", "--key", str(keys / SECRET_FILE), "-o", str(tmp_path / "m.safetensors")]
    kit = ["--kit", str(tmp_path / "kits" / "alice"), "--coordinator", address(mtls_coordinator)]
    assert fedmeki_main([*model, *kit]) == 2
    assert "no job 'nope'" in capsys.readouterr().err  # through the handshake, as alice: the job is unknown


def test_operator_commands_name_their_database_and_a_missing_one_says_how_to_create_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="coordinator")
    assert coordinator_main(["silo", "add", "a"]) == 0
    assert f"database sqlite:///{tmp_path / 'fedmeki-data' / 'coordinator.db'}: the default" in caplog.text
    assert "give --data-dir DIR or --db URL" in caplog.text
    caplog.clear()
    assert coordinator_main(["silo", "list", "--data-dir", str(tmp_path / "co")]) == 0
    assert f"database sqlite:///{tmp_path / 'co' / 'coordinator.db'}" in caplog.text
    assert "the default" not in caplog.text
    capsys.readouterr()
    assert coordinator_main(["silo", "add", "b", "--kit", str(tmp_path / "kits" / "coordinator")]) == 0
    added = capsys.readouterr().out
    assert "token" in added and "fmk-enroll" not in added  # "no token": an mTLS coordinator refuses enrollment


@pytest.mark.postgres
def test_a_postgresql_database_that_does_not_exist_is_one_line_saying_how_to_create_it(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = make_url(postgres_url).set(database="fedmeki_no_such_database")
    assert coordinator_main(["silo", "list", "--db", missing.render_as_string(hide_password=False)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1, captured.err
    assert 'PostgreSQL database "fedmeki_no_such_database" does not exist' in captured.err
    assert 'CREATE DATABASE "fedmeki_no_such_database"' in captured.err
