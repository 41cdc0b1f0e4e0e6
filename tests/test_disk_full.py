"""A full disk while an upload is spooled or a checkpoint is written: RESOURCE_EXHAUSTED to the caller, the
previous checkpoint kept, the coordinator still serving, and success once space returns.

Two ways to fill the disk, one scenario: a real small filesystem (a tmpfs mounted for the test, where the
kernel itself refuses the writes; skipped where mounting is not allowed), and ENOSPC injected at the true edge,
`os.fsync` of files under the data directory (how delayed-allocation and network filesystems report a full disk),
which always runs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load, save

from coordinator.server import Coordinator
from fedmeki_core.client import FedmekiClient
from fedmeki_core.records import JobState, RoundState
from tests.conftest import address, coordinator_settings, enroll, serving, wait_until
from tests.silo_wire import RawSilo, job_spec, submit_raw
from tests.test_scheduler import FakeClock, wait_for_state

SHAPE = (64, 256)  # 64 KiB a tensor: larger than what a full tmpfs has left (under one 4 KiB page)


def _weights(value: float | None = None) -> bytes:
    if value is None:
        return save({"w": np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)})
    return save({"w": np.full(SHAPE, value, dtype=np.float32)})


class SmallFilesystem:
    """A tmpfs of a few MiB; `fill()` takes every free byte with a filler file, `free()` deletes it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._filler = root / "filler"

    def fill(self) -> None:
        with self._filler.open("ab", buffering=0) as f:  # unbuffered: the last refused write is not retried
            for block in (1 << 20, 4096, 1):
                try:
                    while True:
                        f.write(b"\0" * block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc

    def free(self) -> None:
        self._filler.unlink()


class FsyncRefused:
    """ENOSPC from `os.fsync` of any regular file under `root` while full, as a full filesystem reports it."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.full = False
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if self.full and regular and os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False


Disk = SmallFilesystem | FsyncRefused


@pytest.fixture(params=["tmpfs", "fsync-enospc"])
def disk(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    root = tmp_path / "data"
    root.mkdir()
    if request.param == "fsync-enospc":
        yield FsyncRefused(root, monkeypatch)
        return
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC variant covers the same paths")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused ({result.stderr.strip()}); the injected-ENOSPC variant still runs")
    try:
        yield SmallFilesystem(root)
    finally:
        subprocess.run(["umount", str(root)], check=True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def disk_coordinator(disk: Disk, database_url: str, clock: FakeClock) -> Iterator[Coordinator]:
    # The database lives elsewhere (as PostgreSQL would): the disk that fills is the data directory's.
    instance = Coordinator(coordinator_settings(disk.root, database_url), clock=clock)
    yield from serving(instance)


def _files(root: Path, pattern: str) -> list[Path]:
    return [p for p in root.rglob(pattern) if p.is_file()]


def test_a_full_disk_refuses_uploads_and_checkpoints_and_recovers(
    disk_coordinator: Coordinator, disk: Disk, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = disk_coordinator
    target = address(coordinator)
    a, b, c = (RawSilo(target, enroll(coordinator, name)) for name in ("a", "b", "c"))
    for silo in (a, b, c):
        silo.poll()
    initial = _weights()
    job = submit_raw(target, job_spec(rounds=1, min_silos=2), initial, chunk=1 << 16)
    wait_for_state(coordinator, job.id, lambda s: s.rounds and s.rounds[-1].state == RoundState.TRAINING)
    checkpoint_0 = coordinator.artifacts.checkpoint_path(job.id, 0)
    a.upload(job.id, 1, _weights(1.0), num_samples=10, chunk=1 << 16)

    disk.fill()
    with pytest.raises(grpc.RpcError) as refused:
        b.upload(job.id, 1, _weights(4.0), num_samples=30, chunk=1 << 16)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert "no space left on disk" in refused.value.details()
    with pytest.raises(grpc.RpcError) as submit_refused:
        submit_raw(target, job_spec(rounds=1), initial, chunk=1 << 16)
    assert submit_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with FedmekiClient(target) as client:  # still serving, and nothing of the refused calls was kept
        status = client.get_job(job.id)
        assert [r.reported_silos for r in status.rounds] == [("a",)]
        assert len(client.list_jobs()) == 1
    assert not _files(coordinator.artifacts.root / "incoming", "*")

    disk.free()
    b.upload(job.id, 1, _weights(4.0), num_samples=30, chunk=1 << 16)  # the same upload, now that there is room

    disk.fill()
    clock.advance(61)  # c never reports: the round closes at its deadline with a and b, and must write round 1
    wait_for_state(coordinator, job.id, lambda s: s.rounds[0].state == RoundState.AGGREGATING)
    wait_until(lambda: any("no space left on disk to write round-00001" in r.getMessage() for r in caplog.records))
    status = coordinator.scheduler.status(job.id)
    assert status.state == JobState.RUNNING and status.current_round == 0
    assert hashlib.sha256(checkpoint_0.read_bytes()).hexdigest() == status.latest_checkpoint.sha256
    assert not _files(checkpoint_0.parent, "*round-00001*")  # no checkpoint, no temp file

    disk.free()
    status = wait_for_state(coordinator, job.id, lambda s: s.current_round == 1)
    expected = load(initial)["w"] + (1.0 * 10 + 4.0 * 30) / 40
    checkpoint_1 = load(coordinator.artifacts.checkpoint_path(job.id, 1).read_bytes())["w"]
    np.testing.assert_allclose(checkpoint_1, expected, rtol=1e-6)
    assert hashlib.sha256(checkpoint_0.read_bytes()).hexdigest() == hashlib.sha256(initial).hexdigest()
