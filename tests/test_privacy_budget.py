"""A privacy budget each hospital controls: silo.yaml sets (epsilon, delta) per dataset, the agent's ledger charges
every trained round of a DP job, a job over what is left is declined with the figures (the job fails with them),
jobs without DP are declined where `require_dp` is set, and the ledger survives a restart of the agent."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.server import Coordinator
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.privacy.dp import composed_epsilon, gaussian_epsilon
from fedmeki_core.records import JobState, JobStatus, RoundKind
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.synthetic import generate
from silo_agent.agent import SiloAgent
from silo_agent.cli import main as silo_main
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState, Charge, StoredFile
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import GrpcTransport
from tests.conftest import address, wait_until

TASK = "synthetic-vitals"
DELTA = 1e-5


class Silo:
    """One hospital: its silo.yaml and work directory, enrolled once; `running()` is one life of its agent."""

    def __init__(self, coordinator: Coordinator, root: Path, budget: dict[str, Any]) -> None:
        self.coordinator = coordinator
        self.work_dir = root / "silo"
        data = self.work_dir / f"{TASK}.safetensors"
        save_dataset(generate(TASK, 40, 0, 1, seed=5), data)
        self.config = root / "silo.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "coordinator": address(coordinator),
                    "work_dir": str(self.work_dir),
                    "device": "cpu",
                    "data": {TASK: str(data)},
                    "poll_wait_seconds": 0.2,
                    "privacy_budget": {TASK: budget},
                }
            )
        )
        _, token = coordinator.registry.add("hospital")
        enroll = ["enroll", "--coordinator", address(coordinator), "--token", token, "--work-dir", str(self.work_dir)]
        assert silo_main(enroll) == 0

    @contextmanager
    def running(self) -> Iterator[SiloAgent]:
        settings = SiloSettings.from_yaml(self.config)
        with AgentState(settings.work_dir) as state:
            enrollment = state.enrollment()
            assert enrollment is not None
            transport = GrpcTransport(settings.coordinator, enrollment.credential)
            try:
                yield SiloAgent(settings, transport, state, LocalTrainer.from_settings(settings))
            finally:
                transport.close()

    def run_job(self, agent: SiloAgent, rounds: int, dp: dict[str, Any] | None, until_round: int = 0) -> JobStatus:
        """Submit a job and step the agent until it ends (or, with `until_round`, until that round is committed:
        then it is cancelled, as a researcher stopping it early)."""
        spec = {"name": "budgeted", "task": TASK, "rounds": rounds, "seed": 1}
        if dp is not None:
            spec["privacy"] = {"dp": dp}
        with FedmekiClient(address(self.coordinator)) as client:
            job = client.submit_job(parse_job_spec(spec))
            give_up = time.monotonic() + 120
            while not (status := client.get_job(job.id)).state.finished:
                assert time.monotonic() < give_up, status
                agent.run_once()
                with AgentState(self.work_dir) as state:
                    stop = until_round and (record := state.task(job.id, until_round)) and record.status == "uploaded"
                if stop:  # before the agent can poll the next round
                    wait_until(lambda: client.get_job(job.id).current_round >= until_round)
                    return client.cancel_job(job.id, "stopped early")
        return status

    def ledger(self) -> list[tuple[str, str, float, int]]:
        with AgentState(self.work_dir) as state:
            return [(e.job_id, e.mode, e.noise_multiplier, e.rounds) for e in state.ledger(TASK)]


def _dp(mode: str, noise_multiplier: float) -> dict[str, Any]:
    return {"mode": mode, "clip_norm": 1.0, "noise_multiplier": noise_multiplier, "delta": DELTA}


def test_two_dp_jobs_over_the_budget_the_second_declined_with_the_figures_and_the_ledger_survives_a_restart(
    coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    silo = Silo(coordinator, tmp_path, {"epsilon": 5.0, "delta": DELTA})
    two_rounds, three_rounds, four_rounds = (gaussian_epsilon(2.0, n, DELTA) for n in (2, 3, 4))
    assert two_rounds < 5.0 < four_rounds  # either job alone fits; both do not
    with silo.running() as agent:
        first = silo.run_job(agent, rounds=2, dp=_dp("local", 2.0))
        assert first.state == JobState.COMPLETED, first.reason
        second = silo.run_job(agent, rounds=2, dp=_dp("central", 2.0))
    assert second.state == JobState.FAILED
    assert second.reason == (
        f"silo 'hospital' aborted round 1: privacy budget of dataset '{TASK}' exceeded: job {second.id} declares 2 "
        f"more round(s) of central DP at noise multiplier 2, epsilon {two_rounds:.3f} alone; with the "
        f"{two_rounds:.3f} already spent the total would be epsilon {four_rounds:.3f}, over the budget of 5 at delta "
        f"1e-05 ({5.0 - two_rounds:.3f} left)"
    )
    assert fedmeki_main(["job", "show", second.id, "--coordinator", address(coordinator)]) == 0
    assert f"over the budget of 5 at delta 1e-05 ({5.0 - two_rounds:.3f} left)" in capsys.readouterr().out
    assert silo.ledger() == [(first.id, "local", 2.0, 2)]  # the declined job was never trained, never charged

    with silo.running() as agent:  # a restart: the ledger is read back, and still binds
        again = silo.run_job(agent, rounds=2, dp=_dp("central", 2.0))
        assert again.state == JobState.FAILED and f"total would be epsilon {four_rounds:.3f}" in again.reason
        third = silo.run_job(agent, rounds=1, dp=_dp("local", 2.0))  # what is left still pays for one round
        assert third.state == JobState.COMPLETED, third.reason
    assert silo.ledger() == [(first.id, "local", 2.0, 2), (third.id, "local", 2.0, 1)]

    assert silo_main(["budget", "--config", str(silo.config)]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0] == f"dataset {TASK}: budget epsilon 5 at delta 1e-05; spent {three_rounds:.3f}, left " + (
        f"{5.0 - three_rounds:.3f}"
    )
    assert report[1].startswith(f"  job {first.id}: local DP, noise multiplier 2, 2 round(s) charged (last round 2, ")
    assert report[1].endswith(f"epsilon {two_rounds:.3f}")
    assert report[2].startswith(f"  job {third.id}: local DP, noise multiplier 2, 1 round(s) charged (last round 1, ")
    assert silo_main(["budget", "--work-dir", str(silo.work_dir)]) == 0  # without silo.yaml: the ledger alone
    assert capsys.readouterr().out.startswith(f"dataset {TASK}: no budget set; spent epsilon {three_rounds:.3f}")


def test_a_job_stopped_early_is_charged_the_rounds_it_trained(sqlite_coordinator: Coordinator, tmp_path: Path) -> None:
    silo = Silo(sqlite_coordinator, tmp_path, {"epsilon": 6.0, "delta": DELTA})
    assert gaussian_epsilon(2.0, 4, DELTA) <= 6.0 < gaussian_epsilon(2.0, 7, DELTA)
    with silo.running() as agent:
        stopped = silo.run_job(agent, rounds=4, dp=_dp("local", 2.0), until_round=1)
        assert stopped.state == JobState.CANCELLED
        assert silo.ledger() == [(stopped.id, "local", 2.0, 1)]
        # Charged the whole 4 rounds, the stopped job would leave no room for 3 more; charged 1, it does.
        after = silo.run_job(agent, rounds=3, dp=_dp("local", 2.0), until_round=1)
        assert after.state == JobState.CANCELLED, after.reason
    assert silo.ledger() == [(stopped.id, "local", 2.0, 1), (after.id, "local", 2.0, 1)]


@pytest.mark.parametrize(("dp", "has"), [(None, "no differential privacy"), (_dp("local", 0.0), "noise multiplier 0")])
def test_require_dp_declines_a_job_without_a_dp_guarantee(
    sqlite_coordinator: Coordinator, tmp_path: Path, dp: dict[str, Any] | None, has: str
) -> None:
    silo = Silo(sqlite_coordinator, tmp_path, {"epsilon": 5.0, "require_dp": True})
    with silo.running() as agent:
        job = silo.run_job(agent, rounds=1, dp=dp)
    assert job.state == JobState.FAILED
    assert job.reason.endswith(
        f"dataset '{TASK}' requires differential privacy (require_dp in the silo's privacy_budget) and job {job.id} "
        f"has {has}"
    )
    assert silo.ledger() == []


def test_a_round_trained_again_is_charged_once_and_an_old_state_file_gains_the_ledger(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "state.sqlite") as old:  # what an agent before the ledger left behind
        old.execute(
            "CREATE TABLE tasks (job_id TEXT NOT NULL, round INTEGER NOT NULL, kind TEXT NOT NULL, status TEXT NOT "
            "NULL, checkpoint_path TEXT, checkpoint_sha256 TEXT, delta_path TEXT, delta_sha256 TEXT, num_samples "
            "INTEGER, metrics TEXT, updated_at TEXT NOT NULL DEFAULT (datetime('now')), PRIMARY KEY (job_id, round))"
        )
        old.execute("INSERT INTO tasks (job_id, round, kind, status) VALUES ('old', 1, 'train', 'uploaded')")
        old.execute("PRAGMA user_version = 1")
    old.close()
    with AgentState(tmp_path) as state:
        assert state.task("old", 1) is not None and state.ledger() == []
        file = StoredFile(tmp_path / "f", "0" * 64)
        charge = Charge(TASK, "j", 1, "local", 1.5)
        state.record_download("j", 1, RoundKind.TRAIN, file)
        state.record_training("j", 1, file, 10, {}, [charge])
        state.record_download("j", 1, RoundKind.TRAIN, file)  # the delta file was lost: the round trains again
        state.record_training("j", 1, file, 10, {}, [charge])
    with AgentState(tmp_path) as state:
        assert [(e.job_id, e.rounds, e.noise_multiplier) for e in state.ledger()] == [("j", 1, 1.5)]


def test_rounds_of_several_jobs_compose_as_one_job_s_rounds() -> None:
    assert composed_epsilon([(2.0, 2), (2.0, 1)], DELTA) == gaussian_epsilon(2.0, 3, DELTA)
    mixed = composed_epsilon([(2.0, 2), (1.0, 1)], DELTA)
    assert max(gaussian_epsilon(2.0, 2, DELTA), gaussian_epsilon(1.0, 1, DELTA)) < mixed
    assert mixed < gaussian_epsilon(2.0, 2, DELTA) + gaussian_epsilon(1.0, 1, DELTA)  # tighter than adding epsilons
    assert composed_epsilon([], DELTA) == 0.0 and math.isinf(composed_epsilon([(0.0, 1)], DELTA))


def test_a_budget_for_a_dataset_the_silo_does_not_hold_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "silo.yaml"
    config.write_text(yaml.safe_dump({"data": {TASK: "d.safetensors"}, "privacy_budget": {"ecg": {"epsilon": 1}}}))
    with pytest.raises(InvalidInputError, match="setting privacy_budget: 'ecg' is not a dataset under data"):
        SiloSettings.from_yaml(config)
