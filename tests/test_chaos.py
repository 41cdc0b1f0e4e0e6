"""Issue 14's chaos test: honest and hostile researchers and silos share one coordinator process.

Honest researchers submit jobs (through `FedmekiClient`, as `fedmeki job submit` does) that select every honest
silo and the hostile one, with `max_abs_value` set; a bad researcher submits a stream of bad jobs over raw gRPC
(tests/chaos_actors.py: the issue's cases and variations, and stalled submissions); the hostile silo answers
every round it is handed with a broken upload (3e38 values, 400-digit local_steps, 30,000 metric names, a renamed
tensor, a declared TiB, stalled streams). Silo agents are real `fedmeki-silo` processes, the coordinator a real
`python -m coordinator serve` process; the bad actors are threads of the test. It asserts that every honest job
completes with the FedAvg of the honest updates alone, every bad job is refused or fails naming its cause, no
hostile upload gets a receipt, no checkpoint holds a non-finite value, the coordinator's peak RSS (VmHWM) stays
under `PEAK_RSS_BOUND`, and no log holds a traceback.

Figures (loaded 2-core shared CPU; printed by each run, `pytest -s`):
- fast twin (CI): 2 researchers (1 bad), 3 silos (2 agent processes + 1 hostile), 0.9-1.2 min, 159-174 bad
  inputs sent, 2 honest jobs of 1 round completed, coordinator peak RSS 138-139 MiB;
- full (`-m slow`): 3 researchers (1 bad), 7 silos (6 agent processes + 1 hostile), 5.7 min, 1,474 bad inputs
  sent, 4 honest jobs of 2 rounds completed, coordinator peak RSS 145 MiB (docs/benchmarks.md, "Chaos").
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sqlalchemy import select

from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Silo, Update
from fedmeki_core.app.demo import add_silo
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.proto.v1 import silo_pb2
from fedmeki_core.records import JobState, JobStatus
from tests.agents import (
    TASK,
    AgentProcess,
    describe_job,
    prepare_agent,
    recompute_round,
    serve_coordinator,
    stop_coordinator,
    wait_until,
)
from tests.chaos_actors import TRICK_CAUSES, BadResearcher, HostileSilo
from tests.silo_wire import RawSilo

PEAK_RSS_BOUND = 1 << 30  # the coordinator's VmHWM, bytes
COORDINATOR_ENV = {
    "FEDMEKI_COORDINATOR_KEEP_UPDATES": "true",  # so the test can recompute every honest round
    "FEDMEKI_COORDINATOR_TICK_SECONDS": "0.2",
    "FEDMEKI_COORDINATOR_UPLOAD_IDLE_SECONDS": "4",  # stalled streams are cut before their client gives up
}
HONEST_LIMITS = {"max_abs_value": 1000.0, "max_update_norm": 1e4}


@dataclass(frozen=True)
class Scale:
    researchers: int  # honest ones; the bad researcher comes on top
    jobs_each: int
    rounds: int
    agents: int  # honest agent processes; the hostile silo comes on top
    deadline: float  # each honest round waits for the hostile silo until then


@dataclass
class Figures:
    minutes: float
    honest_jobs: int
    bad_inputs: int
    peak_rss: int

    def line(self, scale: Scale) -> str:
        return (
            f"{scale.researchers + 1} researchers, {scale.agents + 1} silos ({scale.agents} agent processes and "
            f"a hostile one), {self.minutes:.1f} min, {self.bad_inputs} bad inputs sent, {self.honest_jobs} honest "
            f"jobs of {scale.rounds} round(s) completed, coordinator peak RSS {self.peak_rss / 2**20:.0f} MiB"
        )


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) * 1024


def _honest_jobs(address: str, scale: Scale, silos: list[str], index: int, out: dict[str, JobStatus]) -> None:
    with FedmekiClient(address) as client:
        ids = []
        for job in range(scale.jobs_each):
            spec = {
                "name": f"honest {index}.{job}",
                "task": TASK,
                "rounds": scale.rounds,
                "min_silos": scale.agents,
                "round_deadline_seconds": scale.deadline,
                "silos": silos,
                "seed": job,
                "algorithm": {"options": HONEST_LIMITS},
            }
            ids.append(client.submit_job(parse_job_spec(spec)).id)
        for job_id in ids:
            while not (status := client.get_job(job_id)).state.finished:
                time.sleep(0.5)
            out[job_id] = status


def chaos(root: Path, scale: Scale) -> Figures:
    start = time.monotonic()
    data_dir, db, log = root / "coordinator", f"sqlite:///{root / 'coordinator.db'}", root / "coordinator.log"
    coordinator, address = serve_coordinator(data_dir, db, "127.0.0.1:0", log, COORDINATOR_ENV)
    names = [f"silo-{i}" for i in range(scale.agents)]
    agents: list[AgentProcess] = []
    stop = threading.Event()
    try:
        for index, name in enumerate(names):
            token = add_silo(name, "--db", db, "--data-dir", str(data_dir))
            extra = {"max_task_failures": 2}
            agents.append(prepare_agent(address, token, root / name, index, scale.agents, 120, extra=extra))
        hostile_token = add_silo("hostile", "--db", db, "--data-dir", str(data_dir))
        credential = RawSilo(address).call("Enroll", silo_pb2.EnrollRequest(token=hostile_token)).credential
        hostile = HostileSilo(RawSilo(address, credential), stop)
        bad = BadResearcher(address, names, stop)
        for agent in agents:
            agent.start()
        _wait_polling(db, scale.agents, agents)
        actors = [threading.Thread(target=actor.run, daemon=True) for actor in (hostile, bad)]
        honest: dict[str, JobStatus] = {}
        researchers = [
            threading.Thread(target=_honest_jobs, args=(address, scale, [*names, "hostile"], i, honest), daemon=True)
            for i in range(scale.researchers)
        ]
        for thread in actors + researchers:
            thread.start()
        for thread in researchers:
            thread.join(timeout=scale.rounds * scale.deadline * scale.jobs_each * scale.researchers + 600)
        stop.set()
        for thread in actors:
            thread.join(timeout=60)
        bad_jobs = _finished([o.job_id for o in bad.outcomes if o.job_id], address)
        peak = _peak_rss(coordinator.pid)
    finally:
        stop.set()
        for agent in agents:
            agent.stop()
        stop_coordinator(coordinator)
    logs = "\n".join(a.output()[-4000:] for a in agents) + log.read_text()[-4000:]
    assert len(honest) == scale.researchers * scale.jobs_each, logs
    for status in honest.values():
        assert status.state == JobState.COMPLETED, describe_job(status) + "\n" + logs
    for outcome in bad.outcomes:
        text = outcome.refusal or f"{bad_jobs[outcome.job_id].state.value}: {bad_jobs[outcome.job_id].reason}"
        assert outcome.refusal or bad_jobs[outcome.job_id].state == JobState.FAILED, (outcome.case, text)
        assert outcome.cause in text, (outcome.case, text)
    assert all("stalled" in refusal for refusal in bad.stalled), bad.stalled
    assert hostile.receipts == 0, hostile.sent
    # A refusal names its cause, or says the round has moved on (closed, or its evaluation round opened).
    unnamed = {
        (trick, text)
        for trick, text in hostile.sent
        if TRICK_CAUSES[trick] not in text and not text.startswith("FAILED_PRECONDITION")
    }
    assert not unnamed, unnamed
    assert hostile.sent, "the hostile silo was never handed a round"
    _check_files(data_dir, db, list(honest))
    for path in [log, *(a.log for a in agents)]:
        assert "Traceback" not in path.read_text(), path.read_text()[-6000:]
    assert peak < PEAK_RSS_BOUND, peak
    sent = len(bad.outcomes) + len(bad.stalled) + len(hostile.sent)
    return Figures((time.monotonic() - start) / 60, len(honest), sent, peak)


def _wait_polling(db: str, count: int, agents: list[AgentProcess]) -> None:
    """Until every agent has polled: a job selects the silos eligible when its round opens."""
    database = Database(db)
    query = select(Silo.name).where(Silo.last_seen_at.is_not(None), Silo.name != "hostile")
    logs = lambda: "\n".join(a.output()[-2000:] for a in agents)  # noqa: E731

    def polled() -> int:
        with database.read() as session:
            return len(session.scalars(query).all())

    try:
        wait_until(lambda: polled() == count, 120, logs)
    finally:
        database.dispose()


def _finished(job_ids: list[str], address: str) -> dict[str, JobStatus]:
    """Wait for the accepted bad jobs to end (their silos decline them)."""
    with FedmekiClient(address) as client:
        give_up = time.monotonic() + 300
        while True:
            done = {job_id: client.get_job(job_id) for job_id in job_ids}
            if all(status.state.finished for status in done.values()):
                return done
            assert time.monotonic() < give_up, [describe_job(status) for status in done.values()]
            time.sleep(0.5)


def _check_files(data_dir: Path, db: str, honest: list[str]) -> None:
    """Every checkpoint is finite; each honest round is the FedAvg of its honest silos' updates."""
    files = list((data_dir / "checkpoints").rglob("*.safetensors"))
    assert files
    for path in files:
        for name, value in load_file(str(path)).items():
            assert np.isfinite(value).all(), (path, name)
    database = Database(db)
    with database.read() as session:
        for job_id in honest:
            checkpoints = {
                c.round_number: data_dir / c.path
                for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id))
            }
            rows = session.execute(select(Update, Silo.name).join(Silo).where(Update.job_id == job_id)).all()
            assert rows and all(name != "hostile" for _, name in rows), rows
            for number in sorted(checkpoints)[1:]:
                updates = [(data_dir / u.path, u.num_samples) for u, _ in rows if u.round_number == number]
                expected = recompute_round(checkpoints[number - 1], updates)
                actual = load_file(str(checkpoints[number]))
                for name, value in expected.items():
                    np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    database.dispose()


def test_chaos_fast_twin(tmp_path: Path) -> None:
    scale = Scale(researchers=1, jobs_each=2, rounds=1, agents=2, deadline=12)
    print("chaos (fast twin):", chaos(tmp_path, scale).line(scale))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_chaos(tmp_path: Path) -> None:
    scale = Scale(researchers=2, jobs_each=2, rounds=2, agents=6, deadline=90)
    print("chaos:", chaos(tmp_path, scale).line(scale))
