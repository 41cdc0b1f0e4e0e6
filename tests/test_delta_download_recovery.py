"""Delta downloads across a coordinator crash: killed after writing round 2's checkpoint, delta and residual but
before the commit, the restarted coordinator aggregates the round again from the residual round 1 left on disk,
and the job ends with the bits of an uninterrupted run; every silo holds that model, rebuilt from its delta."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedmeki_core.records import JobState
from tests.agents import describe_job
from tests.test_crash_recovery import ROUNDS, federate

DELTA_DOWNLOADS = {"delta_encoding": "int8", "downloads": "delta"}


@pytest.mark.timeout(900)  # two federations of real processes: minutes on a loaded 2-core machine
def test_a_coordinator_killed_before_a_delta_rounds_commit_recovers_to_the_uninterrupted_bits(tmp_path: Path) -> None:
    for folder in ("reference", "crashed"):
        (tmp_path / folder).mkdir()
    reference = federate(tmp_path / "reference", spec=DELTA_DOWNLOADS)
    run = federate(tmp_path / "crashed", f"coordinator.checkpoint_written@{ROUNDS}", DELTA_DOWNLOADS)
    assert run.crashes == ["coordinator"]
    for federation in (reference, run):
        assert federation.job.state == JobState.COMPLETED, describe_job(federation.job)
    assert run.checkpoints[0][1] == reference.checkpoints[0][1]
    assert run.final_sha256() == reference.final_sha256()
    for silo_dir in run.silo_dirs:  # the closing evaluation's download: the final model, from its delta
        (held,) = silo_dir.rglob("held-global-*.safetensors")
        assert held.name == f"held-global-{ROUNDS:05d}-{run.final_sha256()}.safetensors"
        assert hashlib.sha256(held.read_bytes()).hexdigest() == run.final_sha256()
        assert f"checkpoint {ROUNDS} came as a delta" in (silo_dir / "agent.log").read_text()
    data = run.data_dir / "checkpoints" / run.job.id
    assert sorted(p.name for p in data.glob("download-*")) == [
        f"download-delta-{ROUNDS:05d}.safetensors",
        f"download-residual-{ROUNDS:05d}.safetensors",
    ]
