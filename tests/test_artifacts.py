"""Reused files: a spool or an atomic write on a recycled file holds exactly the new bytes, nothing older; a file
that another name links (a silo's held global model) is never overwritten in place."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from coordinator.artifacts import Artifacts
from fedmeki_core.errors import StorageFullError
from fedmeki_core.files import atomic_write, link_replace, recycle
from fedmeki_core.transfer import ResumableDownload


def test_atomic_write_over_a_longer_spare_file_keeps_only_the_new_bytes(tmp_path: Path) -> None:
    spare = tmp_path / "spare"
    spare.write_bytes(b"x" * 1000)
    target = tmp_path / "out"
    with atomic_write(target, reuse=spare) as f:
        f.write(b"short")
    assert target.read_bytes() == b"short"
    assert not spare.exists()
    with atomic_write(tmp_path / "other", reuse=tmp_path / "missing") as f:  # no spare: a new file
        f.write(b"new")
    assert (tmp_path / "other").read_bytes() == b"new"


def test_a_spare_that_another_name_links_is_never_overwritten(tmp_path: Path) -> None:
    held = tmp_path / "held"
    held.write_bytes(b"the held model")
    task = tmp_path / "task"
    link_replace(held, task)  # the task's checkpoint and the held model: one file, two names
    assert task.samefile(held) and task.read_bytes() == b"the held model"
    recycle(task, tmp_path / "spare")  # a linked file is only unlinked, not made the spare
    assert not task.exists() and not (tmp_path / "spare").exists()

    link_replace(held, tmp_path / "spare")  # were it the spare anyway (a crash between the two steps)
    with atomic_write(tmp_path / "next", reuse=tmp_path / "spare", durable=False) as f:
        f.write(b"the next model")
    assert (tmp_path / "next").read_bytes() == b"the next model"
    link_replace(held, tmp_path / "spare")
    ResumableDownload(tmp_path / "download", spare=tmp_path / "spare").consume([])  # writes where a spare would be
    assert held.read_bytes() == b"the held model" and held.stat().st_nlink == 1
    assert not (tmp_path / "spare").exists()

    alone = tmp_path / "alone"
    alone.write_bytes(b"no other name")
    recycle(alone, tmp_path / "spare")  # an unlinked file becomes the spare
    assert (tmp_path / "spare").read_bytes() == b"no other name"


def test_spools_recycle_files_up_to_the_pool_limit(tmp_path: Path) -> None:
    artifacts = Artifacts(tmp_path, spool_pool_files=1)
    first = artifacts.spool("job")
    first.write(b"a" * 4096)
    first.commit(tmp_path / "updates" / "job" / "round-00001" / "silo.safetensors")
    artifacts.drop_round_updates("job", 1)
    assert len(list((tmp_path / "spool-pool").iterdir())) == 1

    reused = artifacts.spool("job")  # takes the pooled file
    assert not list((tmp_path / "spool-pool").iterdir())
    reused.write(b"bb")
    destination = tmp_path / "final"
    reused.commit(destination)
    assert destination.read_bytes() == b"bb"
    assert reused.sha256 == hashlib.sha256(b"bb").hexdigest()

    rejected, extra = artifacts.spool("job"), artifacts.spool("job")
    rejected.write(b"junk")
    artifacts.discard(rejected)
    artifacts.discard(extra)
    assert len(list((tmp_path / "spool-pool").iterdir())) == 1  # the limit: the second went away
    assert not list((tmp_path / "incoming").rglob("*.tmp"))


def _pooled(artifacts: Artifacts, sizes: list[int]) -> None:
    """Files of `sizes` bytes committed as round 1's updates, then recycled into the pool."""
    for index, size in enumerate(sizes):
        spool = artifacts.spool("job")
        spool.write(b"u" * size)
        spool.commit(artifacts.update_path("job", 1, f"silo-{index}"))
    artifacts.drop_round_updates("job", 1)


def test_a_writer_claims_the_smallest_pooled_file_that_holds_its_bytes_else_the_largest(tmp_path: Path) -> None:
    artifacts = Artifacts(tmp_path)
    _pooled(artifacts, [100, 4000, 1000, 300])
    claimed = [artifacts.claim_pooled(size) for size in (900, 5000, 1, 10)]
    assert [p.stat().st_size if p else None for p in claimed] == [1000, 4000, 100, 300]
    assert artifacts.claim_pooled() is None


def test_a_spool_that_finds_the_disk_full_gives_back_the_pools_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts = Artifacts(tmp_path)
    _pooled(artifacts, [4096, 4096])
    full = artifacts.spool("job", 4096)  # on one of the two

    def fsync(fd: int) -> None:  # how a full disk with delayed allocation reports itself
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    full.write(b"x" * 4096)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageFullError):
        full.commit(tmp_path / "received")
    artifacts.discard(full)
    assert not full.path.exists() and not list((tmp_path / "spool-pool").iterdir())


def _stream(data: bytes, offset: int, chunk: int = 3, stop_at: int | None = None):  # type: ignore[no-untyped-def]
    from fedmeki_core.proto.v1 import common_pb2

    yield common_pb2.CheckpointChunk(
        checkpoint=common_pb2.Checkpoint(
            job_id="j", round=1, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
    )
    for start in range(offset, len(data) if stop_at is None else stop_at, chunk):
        yield common_pb2.CheckpointChunk(chunk=common_pb2.Chunk(offset=start, data=data[start : start + chunk]))


def test_downloads_resume_overwrite_spares_and_verify(tmp_path: Path) -> None:
    import pytest

    from fedmeki_core.errors import InvalidUpdateError
    from fedmeki_core.transfer import ResumableDownload

    data = bytes(range(50))
    target = tmp_path / "model.safetensors"
    interrupted = ResumableDownload(target)
    interrupted.consume(_stream(data, 0, stop_at=21))
    resumed = ResumableDownload(target)  # a new process: picks up the partial file
    assert resumed.offset == 21
    resumed.consume(_stream(data, resumed.offset))
    assert resumed.finish().size_bytes == 50 and target.read_bytes() == data

    spare = tmp_path / "spare"
    spare.write_bytes(b"\xff" * 500)
    overwrite = ResumableDownload(tmp_path / "next.safetensors", spare)
    assert overwrite.offset == 0 and not spare.exists()
    overwrite.consume(_stream(data, 0))
    overwrite.finish()
    assert (tmp_path / "next.safetensors").read_bytes() == data

    bad = ResumableDownload(tmp_path / "bad.safetensors")
    bad.consume(_stream(data, 0, stop_at=30))
    with pytest.raises(InvalidUpdateError, match="does not match its size or sha256"):
        bad.finish()
    assert not list(tmp_path.glob("bad.safetensors*"))
