"""The researcher's `fedmeki job …` commands against a real coordinator."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from coordinator.server import Coordinator
from fedmeki_core.cli import main as fedmeki_main
from fedmeki_core.files import sha256_file
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo


def test_submit_list_show_download_cancel_watch(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    RawSilo(address(sqlite_coordinator), enroll(sqlite_coordinator, "a")).poll()
    target = ["--coordinator", address(sqlite_coordinator)]
    spec = tmp_path / "job.yaml"
    spec.write_text("name: cli-job\ntask: synthetic-vitals\nrounds: 2\nmodel: {config: {hidden_size: 16}}\n")
    assert fedmeki_main(["job", "submit", str(spec), *target]) == 0
    match = re.search(r"submitted job (\w+) \(cli-job\)", capsys.readouterr().out)
    assert match
    job_id = match.group(1)

    assert fedmeki_main(["job", "list", *target]) == 0
    assert re.search(rf"{job_id}\s+cli-job\s+(pending|running)", capsys.readouterr().out)
    assert fedmeki_main(["job", "show", job_id, *target]) == 0
    shown = capsys.readouterr().out
    assert "task: synthetic-vitals" in shown and "latest checkpoint: round 0" in shown

    output = tmp_path / "initial.safetensors"
    assert fedmeki_main(["job", "download", job_id, "-o", str(output), *target]) == 0
    assert "checkpoint of round 0" in capsys.readouterr().out
    stored = sqlite_coordinator.artifacts.checkpoint_path(job_id, 0)
    assert sha256_file(output) == sha256_file(stored)
    assert load_file(str(output))["encoder.encoder.layer.0.attention.self.query.weight"].shape == (16, 16)

    assert fedmeki_main(["job", "cancel", job_id, "--reason", "typo in spec", *target]) == 0
    assert f"job {job_id}: cancelled" in capsys.readouterr().out
    assert fedmeki_main(["job", "watch", job_id, *target]) == 1  # ended, but not completed
    assert "cancelled: typo in spec" in capsys.readouterr().out
    assert fedmeki_main(["job", "list", "--state", "completed", *target]) == 0
    assert job_id not in capsys.readouterr().out


def test_errors_are_one_clear_line(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--coordinator", address(sqlite_coordinator)]
    assert fedmeki_main(["job", "show", "no-such-job", *target]) == 2
    assert capsys.readouterr().err.strip() == "fedmeki: no job 'no-such-job'"
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\ntask: synthetic-vitals\nrounds: 1\nmin_silos: 4\n")
    assert fedmeki_main(["job", "submit", str(spec), *target]) == 2
    assert "invalid job spec: min_silos: 4 is more than the 0 enrolled silos" in capsys.readouterr().err
    assert fedmeki_main(["job", "list", "--coordinator", "127.0.0.1:1"]) == 2
    assert "fedmeki: nothing answers at 127.0.0.1:1: check the address" in capsys.readouterr().err


def test_a_job_waiting_for_silos_says_what_it_waits_for(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enroll(sqlite_coordinator, "a")  # enrolled, but it never polls: no live silo
    target = ["--coordinator", address(sqlite_coordinator)]
    spec = tmp_path / "job.yaml"
    spec.write_text("name: w\ntask: synthetic-vitals\nrounds: 1\nsilos: [a]\nround_deadline_seconds: 90\n")
    assert fedmeki_main(["job", "submit", str(spec), *target]) == 0
    job_id = capsys.readouterr().out.split()[2]
    assert fedmeki_main(["job", "show", job_id, *target]) == 0
    shown = capsys.readouterr().out
    assert "round 1 is waiting for silos: at least 1 of a must poll (none selected yet); it fails at " in shown
