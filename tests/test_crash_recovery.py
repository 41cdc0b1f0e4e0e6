"""Crash-exact recovery: a coordinator or a silo agent SIGKILLed at each named crash point resumes and the job ends
with the bits of an uninterrupted run, every update counted once and no file left that the database does not name.

Real processes throughout: a coordinator (`python -m coordinator serve`) and two silo agents, a two-round job of
the tiny model with seeded training; the crash points are those of fedmeki_core/faults.py, armed through the
environment of one process, which is restarted (unarmed) once it has killed itself. Two silos, because a sum of
two addends is the same bits in either order: the silo ids, and so the fold order, differ between runs.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Update
from fedmeki_core.app.demo import add_silo
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import UnavailableError
from fedmeki_core.faults import COORDINATOR_POINTS, CRASH_AT_ENV, SILO_POINTS
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, JobStatus
from silo_agent.state import AgentState, TaskStatus
from tests.agents import TASK, AgentProcess, describe_job, prepare_agent, serve_coordinator, stop_coordinator

ROUNDS = 2
CHUNK_BYTES = 4096  # small chunks, so "mid-download" and "mid-upload" land between chunks of the tiny model
COORDINATOR_ENV = {"FEDMEKI_COORDINATOR_CHUNK_BYTES": str(CHUNK_BYTES), "FEDMEKI_COORDINATOR_TICK_SECONDS": "0.1"}
# Where a mid-stream point fires: after a chunk neither first nor last (the files are 19 chunks), so a stream was
# under way and not yet over. The silo's upload breaks off late enough that the coordinator surely holds a part.
AT = {"coordinator.mid_download": 2, "coordinator.mid_upload": 2, "silo.mid_upload": 10, "silo.mid_training": 3}
IN_CI = {"coordinator.update_durable", "silo.mid_upload"}  # one per side; the rest run under `slow`


@dataclass
class Federation:
    """What a finished run left: its job, database rows and files."""

    job: JobStatus
    data_dir: Path
    silo_dirs: list[Path]
    checkpoints: dict[int, tuple[str, str]]  # round -> (path, sha256)
    updates: list[tuple[int, str]]  # (round, silo id) of every update row
    crashes: list[str] = field(default_factory=list)  # which process killed itself, in order

    def final_sha256(self) -> str:
        return self.checkpoints[ROUNDS][1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _job(client: FedmekiClient, job_id: str) -> JobStatus | None:
    try:
        return client.get_job(job_id)
    except UnavailableError:  # the coordinator is down (killed, or restarting)
        return None


def _armed(point: str | None, prefix: str) -> dict[str, str]:
    """The environment that arms `point` (`NAME` or `NAME@COUNT`) in a process of `prefix`'s side."""
    if point is None or not point.startswith(prefix):
        return {}
    return {CRASH_AT_ENV: point if "@" in point else f"{point}@{AT.get(point, 1)}"}


def _killed(process: subprocess.Popen[bytes] | subprocess.Popen[str] | None) -> bool:
    """True when the process has exited; it must have been by its own SIGKILL (a crash point), nothing else."""
    if process is None or process.poll() is None:
        return False
    assert process.returncode == -signal.SIGKILL, f"exited with {process.returncode}, not by a crash point"
    return True


def federate(root: Path, crash_at: str | None = None, spec: dict[str, object] | None = None) -> Federation:
    """Run the job (its spec plus `spec`) to its end, restarting (unarmed) the process that `crash_at` kills; silo-0
    is the armed silo."""
    data_dir, log, db = root / "coordinator", root / "coordinator.log", f"sqlite:///{root / 'coordinator.db'}"
    coordinator, address = serve_coordinator(
        data_dir, db, "127.0.0.1:0", log, {**COORDINATOR_ENV, **_armed(crash_at, "coordinator.")}
    )
    agents: list[AgentProcess] = []
    crashes: list[str] = []
    try:
        for index in range(2):
            token = add_silo(f"silo-{index}", "--db", db, "--data-dir", str(data_dir))
            extra = {"chunk_bytes": CHUNK_BYTES}
            agents.append(prepare_agent(address, token, root / f"silo-{index}", index, 2, 120, extra=extra))
        for index, agent in enumerate(agents):
            agent.start(_armed(crash_at, "silo.") if index == 0 else None)
        job_spec = parse_job_spec(
            {
                "name": "crash-exact",
                "task": TASK,
                "rounds": ROUNDS,
                "min_silos": 2,
                "round_deadline_seconds": 300,
                "algorithm": {"learning_rate": 0.003},
                **(spec or {}),
            }
        )
        with FedmekiClient(address) as client:
            job_id = client.submit_job(job_spec).id
            give_up = time.monotonic() + 240
            while (job := _job(client, job_id)) is None or not job.state.finished:
                if _killed(coordinator):
                    stop_coordinator(coordinator)
                    crashes.append("coordinator")
                    coordinator, _ = serve_coordinator(data_dir, db, address, log, COORDINATOR_ENV)
                for agent in agents:
                    if _killed(agent.process):
                        crashes.append(agent.name)
                        agent.start()
                assert time.monotonic() < give_up, (
                    "the job did not finish: "
                    + (describe_job(job) if job else "coordinator down")
                    + "\n"
                    + log.read_text()[-3000:]
                    + "\n".join(a.output()[-3000:] for a in agents)
                )
                time.sleep(0.2)
    finally:
        for agent in agents:
            agent.stop()
        stop_coordinator(coordinator)
    database = Database(db)
    with database.read() as session:
        checkpoints = {
            row.round_number: (row.path, row.sha256)
            for row in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id))
        }
        updates = [
            (row.round_number, row.silo_id) for row in session.scalars(select(Update).where(Update.job_id == job_id))
        ]
    database.dispose()
    return Federation(job, data_dir, [a.config.parent for a in agents], checkpoints, updates, crashes)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """The uninterrupted run, once per module."""
    return federate(tmp_path_factory.mktemp("reference"))


def _points() -> Iterator[object]:
    for point in COORDINATOR_POINTS + SILO_POINTS:
        yield point if point in IN_CI else pytest.param(point, marks=pytest.mark.slow)


@pytest.mark.parametrize("point", list(_points()))
def test_a_process_killed_at_a_crash_point_recovers_to_the_uninterrupted_bits(
    point: str, reference: Federation, tmp_path: Path
) -> None:
    assert reference.job.state == JobState.COMPLETED, describe_job(reference.job)
    # Mid-stream points fire after a chunk that is neither the first nor the last.
    assert (reference.data_dir / reference.checkpoints[0][0]).stat().st_size > (max(AT.values()) + 1) * CHUNK_BYTES
    run = federate(tmp_path, point)
    assert run.crashes == ["coordinator" if point.startswith("coordinator.") else "silo-0"], run.crashes
    assert run.job.state == JobState.COMPLETED, describe_job(run.job)
    assert run.checkpoints[0][1] == reference.checkpoints[0][1]  # the same start, so the same end is a proof
    assert run.final_sha256() == reference.final_sha256()
    assert _sha256(run.data_dir / run.checkpoints[ROUNDS][0]) == run.final_sha256()
    silos = {silo for _, silo in run.updates}
    # Exactly once: every (round, silo) pair, training rounds and the final evaluation, one row each.
    assert sorted(run.updates) == sorted((r, s) for r in range(1, ROUNDS + 2) for s in silos)
    assert len(silos) == 2
    _no_orphans(run)
    for silo_dir in run.silo_dirs:
        with AgentState(silo_dir) as state:
            ends = {record.round: record.status for record in state.recent_tasks()}
        assert ends == {r: TaskStatus.UPLOADED for r in range(1, ROUNDS + 1)} | {ROUNDS + 1: TaskStatus.REPORTED}
        assert not list(silo_dir.rglob("*.part")), "a partial download was left behind"
    if point == "silo.mid_upload":  # the restarted agent sent only what the coordinator did not hold
        log = (run.silo_dirs[0] / "agent.log").read_text()
        resumed = re.findall(r"resuming the upload at byte (\d+) of (\d+)", log)
        assert len(resumed) == 1, resumed
        offset = int(resumed[0][0])
        # The kill came after chunk AT; chunks still in flight when the stream broke (one, or rarely two) are resent.
        assert (AT[point] - 2) * CHUNK_BYTES <= offset <= AT[point] * CHUNK_BYTES and offset % CHUNK_BYTES == 0


def _no_orphans(run: Federation) -> None:
    """Every file under the data directory is a recorded checkpoint, a recycled file of the spool pool, or the
    single-instance lock (coordinator/instance.py)."""
    recorded = {path for path, _ in run.checkpoints.values()}
    files = {str(p.relative_to(run.data_dir)) for p in run.data_dir.rglob("*") if p.is_file()} - {"coordinator.lock"}
    pooled = {f for f in files if f.startswith("spool-pool/") and f.endswith(".spool")}
    assert files - pooled == recorded, sorted(files - pooled - recorded)
