"""Hospital deltas stay private on the coordinator's disk: files 0600 and folders 0700 whatever the umask, and no
silo's bytes (an accepted delta once its round committed, or a refused upload) left behind in the spool pool: a
pooled file is overwritten with zeros in place (its pages kept for the next write), and a file written over it
holds its own bytes and nothing after them."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save

from coordinator.artifacts import Artifacts
from coordinator.server import Coordinator
from fedmeki_core.wire import TensorSpec
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
    assert pooled and all(_zeros(path) for path in pooled)  # recycled: overwritten with zeros, in place
    assert any(path.stat().st_size > 0 for path in pooled)  # its pages kept for the next write
    for path in data_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert accepted[100:] not in content and refused[100:] not in content, path


def _zeros(path: Path) -> bool:
    return not path.read_bytes().strip(b"\0")


def test_a_shorter_file_written_over_a_longer_pooled_one_holds_only_its_own_bytes(tmp_path: Path) -> None:
    """A spool and a checkpoint each overwrite a pooled file that held a longer silo delta: neither ever holds a
    byte of that delta (zeroed when it entered the pool), and each ends at its own last byte."""
    artifacts = Artifacts(tmp_path, spool_pool_files=2)
    long = b"silo-delta" * 1000
    for name in ("a", "b"):
        spool = artifacts.spool("job")
        spool.write(long)
        spool.commit(artifacts.update_path("job", 1, name))
    artifacts.drop_round_updates("job", 1)
    pooled = list((tmp_path / "spool-pool").iterdir())
    assert len(pooled) == 2 and all(p.stat().st_size == len(long) and _zeros(p) for p in pooled)

    refused = artifacts.spool("job", 10)  # a refused upload: back to the pool, zeroed
    assert _zeros(refused.path) and refused.path.stat().st_size == len(long)  # written in place, not emptied
    refused.write(b"refused!")
    artifacts.discard(refused)
    short = artifacts.spool("job", 10)
    short.write(b"short")
    short.commit(tmp_path / "short")
    assert (tmp_path / "short").read_bytes() == b"short"
    manifest = [TensorSpec("w", "F32", (3,))]
    path, size, _ = artifacts.write_checkpoint("job", 1, manifest, [np.ones(3, dtype=np.float32)])
    assert path.stat().st_size == size < len(long) and b"silo-delta" not in path.read_bytes()
    for file in tmp_path.rglob("*"):
        assert not file.is_file() or (b"silo-delta" not in file.read_bytes() and b"refused!" not in file.read_bytes())


def test_the_agent_work_dir_is_private_whatever_the_umask(tmp_path: Path, open_umask: None) -> None:
    work_dir = tmp_path / "deep" / "work"
    with AgentState(work_dir):
        pass
    assert stat.S_IMODE(work_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == 0o700
    assert stat.S_IMODE((work_dir / "state.sqlite").stat().st_mode) == 0o600
