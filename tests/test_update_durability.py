"""An update is acknowledged only once durable, in this order: the spooled file fsynced, renamed into `updates/`,
its directory fsynced, then the row committed and the receipt sent. A failure at any of those OS calls refuses the
upload with nothing recorded, and the same upload is accepted once the fault is gone.

Faults are injected at the true edge, as tests/test_disk_full.py does: `os.replace` and `os.fsync` as the
coordinator's process sees them, failing with EIO for paths under the data directory's `updates/` only.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load, save
from sqlalchemy import create_engine, text

from coordinator.server import Coordinator
from fedmeki_core.records import RoundState
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes
from tests.test_scheduler import wait_for_state


class OsEdge:
    """`os.replace` and `os.fsync` watched (each call into `updates/` logged with the update rows visible then)
    and, while `failing` names one of them, that call refused with EIO for targets under `updates/`."""

    def __init__(self, root: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.updates = str(root / "updates")
        self.incoming = str(root / "incoming")
        self.failing = ""  # "replace", "fsync-dir" or nothing
        self.log: list[tuple[str, int]] = []
        self._engine = create_engine(database_url)
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            directory = stat.S_ISDIR(os.fstat(fd).st_mode)
            if directory and path.startswith(self.updates):
                self._happens("fsync-dir")
            elif not directory and path.startswith(self.incoming):
                self._happens("fsync-file")
            real_fsync(fd)

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            if str(dst).startswith(self.updates):
                self._happens("replace")
            real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def _happens(self, call: str) -> None:
        self.log.append((call, self.update_rows()))
        if call == self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def update_rows(self) -> int:
        """Update rows committed, as another connection to the database sees them."""
        with self._engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM updates")).scalar_one())

    def close(self) -> None:
        self._engine.dispose()


@pytest.fixture
def edge(coordinator: Coordinator, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[OsEdge]:
    watched = OsEdge(coordinator.artifacts.root, database_url, monkeypatch)
    yield watched
    watched.close()


def _open_round(coordinator: Coordinator) -> tuple[RawSilo, str, bytes]:
    silo = RawSilo(address(coordinator), enroll(coordinator, "a"))
    silo.poll()
    initial = weights_bytes()
    job = submit_raw(address(coordinator), job_spec(rounds=1, min_silos=1), initial)
    wait_for_state(coordinator, job.id, lambda s: s.rounds and s.rounds[-1].state == RoundState.TRAINING)
    return silo, job.id, initial


def _accepted_in_the_checkpoint(coordinator: Coordinator, job_id: str, initial: bytes, value: float) -> None:
    wait_for_state(coordinator, job_id, lambda s: s.current_round == 1)
    checkpoint = load(coordinator.artifacts.checkpoint_path(job_id, 1).read_bytes())
    for name, start in load(initial).items():
        np.testing.assert_allclose(checkpoint[name], start + value, rtol=1e-6)


def test_an_update_is_fsynced_renamed_and_its_directory_fsynced_before_its_row_commits(
    coordinator: Coordinator, edge: OsEdge
) -> None:
    silo, job_id, initial = _open_round(coordinator)
    edge.log.clear()
    silo.upload(job_id, 1, save(tensors(0.5)))
    assert edge.log == [("fsync-file", 0), ("replace", 0), ("fsync-dir", 0)]
    assert edge.update_rows() == 1  # committed before the receipt came back
    _accepted_in_the_checkpoint(coordinator, job_id, initial, 0.5)


@pytest.mark.parametrize("failing", ["replace", "fsync-dir"])
def test_a_failed_rename_or_directory_fsync_records_nothing_and_the_retry_is_accepted(
    coordinator: Coordinator, edge: OsEdge, failing: str
) -> None:
    silo, job_id, initial = _open_round(coordinator)
    payload = save(tensors(0.5))
    edge.failing = failing
    with pytest.raises(grpc.RpcError) as refused:  # no receipt
        silo.upload(job_id, 1, payload)
    assert refused.value.code() == grpc.StatusCode.INTERNAL, refused.value.details()
    assert edge.update_rows() == 0
    status = coordinator.scheduler.status(job_id)
    assert status.current_round == 0 and [r.reported_silos for r in status.rounds] == [()]

    edge.failing = ""
    receipt = silo.upload(job_id, 1, payload)
    assert receipt.size_bytes == len(payload)
    assert edge.update_rows() == 1
    _accepted_in_the_checkpoint(coordinator, job_id, initial, 0.5)
