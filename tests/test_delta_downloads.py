"""Delta downloads, file level: the checkpoint the coordinator commits is exactly what a silo rebuilds from the
checkpoint it holds and the delta, its residual carries what the deltas left out, and retries and restarts read the
same residual."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.artifacts import Artifacts
from coordinator.download_deltas import (
    DeltaSources,
    committed_tensors,
    delta_path,
    drop_earlier_deltas,
    residual_path,
)
from fedmeki_core.encodings import DeltaEncoding
from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.files import sha256_file
from fedmeki_core.global_deltas import rebuild
from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.records import CheckpointInfo
from fedmeki_core.wire import TensorSpec

ORDER = [TensorSpec("w", "F32", (40, 33)), TensorSpec("b", "F64", (7,)), TensorSpec("h", "F16", (300,))]
JOB = "job-1"


def _spec(encoding: str) -> JobSpec:
    return parse_job_spec(
        {
            "name": "deltas",
            "task": "synthetic-vitals",
            "rounds": 3,
            "delta_encoding": encoding,
            "int8_block_size": 64,
            "topk_fraction": 0.05,
            "downloads": "delta",
        }
    )


def _initial(artifacts: Artifacts) -> CheckpointInfo:
    rng = np.random.default_rng(1)
    tensors = [
        rng.normal(size=spec.shape).astype({"F32": np.float32, "F64": np.float64, "F16": np.float16}[spec.dtype])
        for spec in ORDER
    ]
    _, size, sha256 = artifacts.write_checkpoint(JOB, 0, ORDER, tensors)
    return CheckpointInfo(JOB, 0, size, sha256)


def _commit(root: Path, spec: JobSpec, base: CheckpointInfo, changes: dict[str, np.ndarray]) -> CheckpointInfo:
    """Round base.round + 1 committed from the aggregate base + changes, by a coordinator started afresh on `root`."""
    artifacts = Artifacts(root)
    base_path = artifacts.checkpoint_path(JOB, base.round)
    old = load_file(str(base_path))
    aggregates = [(old[s.name].astype(np.float64) + changes[s.name]).astype(old[s.name].dtype) for s in ORDER]
    steps = [(old[s.name], new) for s, new in zip(ORDER, aggregates, strict=True)]
    number = base.round + 1
    tensors = committed_tensors(artifacts, JOB, spec, number, base, ORDER, steps)
    _, size, sha256 = artifacts.write_checkpoint(JOB, number, ORDER, tensors)
    return CheckpointInfo(JOB, number, size, sha256)


@pytest.mark.parametrize("encoding", ["int8", "topk"])
def test_a_silo_rebuilds_every_committed_checkpoint_bit_for_bit_and_the_residual_carries_the_rest(
    tmp_path: Path, encoding: str
) -> None:
    spec, root = _spec(encoding), tmp_path / "data"
    base = _initial(Artifacts(root))
    held = tmp_path / "silo" / "held.safetensors"
    held.parent.mkdir()
    shutil.copyfile(Artifacts(root).checkpoint_path(JOB, 0), held)
    rng = np.random.default_rng(2)
    intended = {s.name: np.zeros(s.shape) for s in ORDER}
    for _ in range(3):
        changes = {s.name: rng.normal(scale=0.01, size=s.shape) for s in ORDER}
        for name, change in changes.items():
            intended[name] += change
        base = _commit(root, spec, base, changes)
        artifacts = Artifacts(root)
        rebuilt = tmp_path / "silo" / f"global-{base.round}.safetensors"
        delta = artifacts.root / "copy-of-delta.safetensors"
        shutil.copyfile(delta_path(artifacts, JOB, base.round), delta)  # what went over the wire
        assert (
            rebuild(held, delta, rebuilt, DeltaEncoding.of(spec))
            == base.sha256
            == sha256_file(artifacts.checkpoint_path(JOB, base.round))
        )
        held = rebuilt
        drop_earlier_deltas(artifacts, JOB, base.round)
    folder = artifacts.checkpoint_path(JOB, 0).parent
    assert sorted(p.name for p in folder.glob("download-*")) == [
        "download-delta-00003.safetensors",
        "download-residual-00003.safetensors",
    ]
    # Round 2's delta and residual went to the pool, zeroed in place, sizes kept, for later writes to overwrite
    # (round 3's writes took round 1's two).
    pooled = sorted((root / "spool-pool").glob("*.spool"), key=lambda p: p.stat().st_size)
    assert len(pooled) == 2 and all(not p.read_bytes().strip(b"\0") for p in pooled)
    sizes = [p.stat().st_size for p in pooled]
    assert sizes == sorted(path.stat().st_size for path in folder.glob("download-*"))
    # Error feedback: what the checkpoints moved plus the residual left is what the aggregates moved in all.
    first, last = load_file(str(artifacts.checkpoint_path(JOB, 0))), load_file(str(artifacts.checkpoint_path(JOB, 3)))
    residual = load_file(str(residual_path(artifacts, JOB, 3)))
    for spec_ in ORDER:
        moved = last[spec_.name].astype(np.float64) - first[spec_.name].astype(np.float64)
        tolerance = 2e-3 if spec_.dtype == "F16" else 1e-5
        np.testing.assert_allclose(moved + residual[spec_.name], intended[spec_.name], atol=tolerance)
        assert not np.allclose(moved, intended[spec_.name], atol=tolerance / 10)  # the deltas were lossy


def test_an_aggregation_retried_after_a_crash_commits_the_same_checkpoint(tmp_path: Path) -> None:
    spec, root = _spec("int8"), tmp_path / "data"
    base = _initial(Artifacts(root))
    rng = np.random.default_rng(3)
    first = _commit(root, spec, base, {s.name: rng.normal(scale=0.01, size=s.shape) for s in ORDER})
    changes = {s.name: rng.normal(scale=0.01, size=s.shape) for s in ORDER}
    second = _commit(root, spec, first, changes)
    again = _commit(root, spec, first, changes)  # the commit did not happen: the round is aggregated again
    assert again == second


def test_a_delta_to_another_checkpoint_is_refused(tmp_path: Path) -> None:
    spec, root = _spec("int8"), tmp_path / "data"
    base = _initial(Artifacts(root))
    _commit(root, spec, base, {s.name: np.ones(s.shape) for s in ORDER})
    artifacts = Artifacts(root)
    other = tmp_path / "other.safetensors"
    artifacts.write_checkpoint("other", 0, [TensorSpec("w", "F32", (40, 33))], [np.zeros((40, 33), np.float32)])
    shutil.copyfile(artifacts.checkpoint_path("other", 0), other)
    with pytest.raises(InvalidUpdateError, match="not a delta in int8"):
        rebuild(other, delta_path(artifacts, JOB, 1), tmp_path / "out.safetensors", DeltaEncoding.of(spec))


def test_a_delta_whose_header_a_power_loss_damaged_is_not_offered(tmp_path: Path) -> None:
    """The delta is not fsynced: one that a power loss left empty or garbled means the whole checkpoint is sent."""
    spec, root = _spec("int8"), tmp_path / "data"
    base = _initial(Artifacts(root))
    first = _commit(root, spec, base, {s.name: np.ones(s.shape) for s in ORDER})
    artifacts = Artifacts(root)
    assert DeltaSources(artifacts).source(first, base.round, base.sha256) is not None
    for damaged in (b"", b"\0" * 4096):
        delta_path(artifacts, JOB, 1).write_bytes(damaged)
        assert DeltaSources(artifacts).source(first, base.round, base.sha256) is None
