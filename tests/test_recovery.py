"""Tidying at start (coordinator/recovery.py): what a coordinator killed between a commit and its clean-up left
behind goes, what the database names stays. The crash itself is exercised in tests/test_crash_recovery.py."""

from __future__ import annotations

import time
from pathlib import Path

from safetensors.numpy import save

from coordinator.server import Coordinator
from fedmeki_core.records import RoundState
from tests.conftest import address, coordinator_settings, enroll
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes


def test_a_restart_recycles_the_files_no_row_needs_and_keeps_the_recorded_ones(
    tmp_path: Path, database_url: str
) -> None:
    settings = coordinator_settings(tmp_path / "coordinator", database_url)
    first = Coordinator(settings)
    first.start()
    try:
        silo = RawSilo(address(first), enroll(first, "a"))
        silo.poll()
        job = submit_raw(address(first), job_spec(min_silos=1, rounds=2), weights_bytes()).id
        give_up = time.monotonic() + 10
        while not (rounds := first.scheduler.status(job).rounds) or rounds[0].state != RoundState.TRAINING:
            assert time.monotonic() < give_up
            time.sleep(0.02)
        silo.upload(job, 1, save(tensors(0.5)))
        while first.scheduler.status(job).current_round < 1:
            assert time.monotonic() < give_up
            time.sleep(0.02)
    finally:
        first.stop(grace=0)
    artifacts = first.artifacts
    recorded = {artifacts.checkpoint_path(job, r) for r in (0, 1)}
    assert all(path.is_file() for path in recorded)
    pooled = set(artifacts.root.glob("spool-pool/*.spool"))
    # As a crash right after round 1's commit would leave them, plus an atomic write it cut short.
    left = [
        artifacts.update_path(job, 1, "some-silo"),
        artifacts.checkpoint_path(job, 7),
        artifacts.checkpoint_path(job, 1).with_name(".round-00002.safetensors.x1y2.tmp"),
        artifacts.server_state_path(job, 0),
    ]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stale")
    kept_state = artifacts.server_state_path(job, 1)  # the current checkpoint's: the next aggregation reads it
    kept_state.write_bytes(b"state")

    second = Coordinator(settings)
    second.start()
    second.stop(grace=0)
    assert not [path for path in left if path.exists()]
    assert all(path.is_file() for path in recorded) and kept_state.is_file()
    assert not (artifacts.root / "updates" / job / "round-00001").exists()
    assert len(set(artifacts.root.glob("spool-pool/*.spool")) - pooled) == 3  # recycled: all but the server state
