"""Messages that name the next step: a plaintext call to an mTLS coordinator says to use a kit, a wrong address
names the address, and a silo started with a kit is not told to enroll with a token."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.server import Coordinator
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import UnavailableError
from fedmeki_core.provision import provision
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
