"""An upload over a 100 ms link that cuts every connection after 1.5 MiB still arrives: each attempt resumes at
the offset the coordinator holds, so the 4 MiB delta crosses the link about once (restarting from byte 0 could
never get past the cut)."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save
from sqlalchemy import select

from benchmarks.delay_line import PROFILES, running
from coordinator.server import Coordinator
from coordinator.store.models import Update
from silo_agent.transport import GrpcTransport
from tests.conftest import address, enroll
from tests.silo_wire import TASK, job_spec, submit_raw

CUT_AFTER = 3 << 19  # bytes towards the coordinator on each connection


def test_an_upload_cut_again_and_again_on_a_long_link_resumes_at_the_held_offset(
    sqlite_coordinator: Coordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="silo_agent.transport")
    coordinator = sqlite_coordinator
    credential = enroll(coordinator, "far-away")
    target = address(coordinator)
    with running(PROFILES["100ms-50M"], target, drop_after=CUT_AFTER) as line:
        transport = GrpcTransport(f"127.0.0.1:{line.ports[0]}", credential, chunk_bytes=1 << 16, retry_max_seconds=60)
        try:
            transport.next_task([TASK], "cpu", 0)
            job = submit_raw(target, job_spec(), save({"w": np.zeros((1024, 1024), np.float32)}), chunk=1 << 20)
            task = transport.next_task([TASK], "cpu", 10)
            assert task is not None and task.job_id == job.id
            delta = tmp_path / "delta.safetensors"
            delta.write_bytes(save({"w": np.full((1024, 1024), 0.25, np.float32)}))  # 4 MiB
            sha256 = hashlib.sha256(delta.read_bytes()).hexdigest()
            transport.upload(task, delta, sha256, 10, {})
        finally:
            transport.close()
        carried = line.counters[0]
    size = delta.stat().st_size
    offsets = [
        int(match.group(1))
        for record in caplog.records
        if (match := re.search(r"resuming the upload at byte (\d+) of", record.getMessage()))
    ]
    assert carried.dropped >= 2 and len(offsets) >= 2
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets) and offsets[0] > 0
    assert carried.up < 1.5 * size  # each byte crossed about once: resumed, never restarted
    with coordinator.database.read() as session:
        (update,) = session.scalars(select(Update).where(Update.job_id == job.id)).all()
    assert update.sha256 == sha256
