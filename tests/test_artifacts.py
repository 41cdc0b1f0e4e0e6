"""Reused files: a spool or an atomic write on a recycled file holds exactly the new bytes, nothing older."""

from __future__ import annotations

import hashlib
from pathlib import Path

from coordinator.artifacts import Artifacts
from fedmeki_core.files import atomic_write


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
