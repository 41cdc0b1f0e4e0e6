"""Hospital deltas stay private on the coordinator's disk: files 0600 and folders 0700 whatever the umask, and no
silo's bytes (an accepted delta once its round committed, or a refused upload) left behind in the spool pool."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from safetensors.numpy import save

from coordinator.server import Coordinator
from silo_agent.state import AgentState
from tests.conftest import address, coordinator_settings, enroll, serving
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # the usual default: files 0644, folders 0755
    try:
        yield
    finally:
        os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_a_round_leaves_private_files_and_no_silo_bytes_in_the_pool(
    tmp_path: Path, database_url: str, open_umask: None
) -> None:
    data_dir = tmp_path / "data"
    accepted, refused = save(tensors(0.123)), save(tensors(0.456))
    for coordinator in serving(Coordinator(coordinator_settings(data_dir, database_url, spool_pool_files=8))):
        silos = [RawSilo(address(coordinator), enroll(coordinator, name)) for name in ("a", "b")]
        for silo in silos:
            silo.poll()
        job = submit_raw(address(coordinator), job_spec(min_silos=2, rounds=2), weights_bytes()).id
        give_up = time.monotonic() + 20
        while any(silo.poll() is None for silo in silos):
            assert time.monotonic() < give_up
        with pytest.raises(grpc.RpcError):  # a refused upload: its bytes went to a spool, then to the pool
            silos[0].upload(job, 1, refused, sha256="0" * 64)
        for silo in silos:
            silo.upload(job, 1, accepted)
        while coordinator.scheduler.status(job).current_round < 1:
            assert time.monotonic() < give_up
            time.sleep(0.02)
    modes = _modes(data_dir)
    assert any(name.startswith("checkpoints/") for name in modes) and "spool-pool" in modes
    wrong = {name: oct(mode) for name, mode in modes.items() if mode not in (0o600, 0o700)}
    assert not wrong, wrong
    assert all(mode == 0o700 for name, mode in modes.items() if (data_dir / name).is_dir() or name == ".")
    if database_url.startswith("sqlite"):
        database = Path(database_url.removeprefix("sqlite:///"))
        assert stat.S_IMODE(database.stat().st_mode) == 0o600
    pooled = list((data_dir / "spool-pool").iterdir())
    assert pooled and all(path.stat().st_size == 0 for path in pooled)  # recycled, emptied
    for path in data_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert accepted[100:] not in content and refused[100:] not in content, path


def test_the_agent_work_dir_is_private_whatever_the_umask(tmp_path: Path, open_umask: None) -> None:
    work_dir = tmp_path / "deep" / "work"
    with AgentState(work_dir):
        pass
    assert stat.S_IMODE(work_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == 0o700
    assert stat.S_IMODE((work_dir / "state.sqlite").stat().st_mode) == 0o600
