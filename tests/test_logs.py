"""Structured logs: with JSON logs on, every line the coordinator and the agents log in a real round (over mTLS,
each in its own process) is one JSON object with level, logger and message, and none holds patient data."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.cli import main as coordinator_main
from coordinator.settings import default_sqlite_url
from fedmeki_core.app.provision import provision
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.logs import JsonFormatter
from fedmeki_core.records import JobState
from fedmeki_core.tasks import get_task
from fedmeki_core.tasks.dataset import load_dataset
from fedmeki_core.tasks.synthetic_vitals import generate
from tests.agents import TASK, describe_job, prepare_agent, wait_until
from tests.topology import coordinator_process, wait_for_silos

SILOS = ("silo-0", "silo-1")
_NUMBER = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?")
_BINARY_RUN = re.compile(r"\b[01](?:[,\s]+[01]\b){7,}")  # eight labels in a row, as numpy or torch print them


def patient_data_in(message: str, features: np.ndarray) -> bool:
    """Does the message show an array, a run of labels, or three feature values in a row (at 2+ decimals)?"""
    if "tensor(" in message or "array(" in message or _BINARY_RUN.search(message):
        return True
    numbers = [float(text) for text in _NUMBER.findall(message)]
    flat = features.ravel().astype(np.float64)
    for first, second, third in zip(numbers, numbers[1:], numbers[2:], strict=False):
        for start in np.flatnonzero(np.abs(flat[:-2] - first) < 5e-3):
            if abs(flat[start + 1] - second) < 5e-3 and abs(flat[start + 2] - third) < 5e-3:
                return True
    return False


def test_the_detector_sees_data_as_numpy_and_torch_print_it() -> None:
    data = generate(20, silo_index=0, num_silos=1, seed=1)
    assert patient_data_in(f"batch {data.features[3, 2]}", data.features)
    assert patient_data_in(f"x={torch.from_numpy(data.features[5, 1])}", data.features)
    assert patient_data_in(f"labels {data.labels}", data.features)
    assert patient_data_in(f"labels {torch.from_numpy(data.labels)}", data.features)
    assert not patient_data_in("job j round 1: trained on 48 samples (accuracy 0.521, loss 0.6931)", data.features)


def test_an_exception_is_one_json_line_with_its_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("coordinator.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "coordinator.x", "failed here")
    assert "ValueError: boom" in entry["exception"]


def test_json_logs_of_a_real_round_hold_no_patient_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMEKI_LOG_FORMAT", "json")  # the agents' processes read it; the coordinator gets the flag
    kits = tmp_path / "kits"
    provision(kits, "127.0.0.1", silos=SILOS, researchers=["alice"])
    data_dir = ["--data-dir", str(tmp_path / "coordinator")]
    for name in SILOS:
        assert coordinator_main(["silo", "add", name, *data_dir]) == 0
    serve = [*data_dir, "--kit", str(kits / "coordinator")]
    with coordinator_process(tmp_path / "coordinator", serve, ("--log-format", "json", "--log-level", "DEBUG")) as co:
        agents = [
            prepare_agent(co.address, "", tmp_path / name, index, len(SILOS), 64, kits / name)
            for index, name in enumerate(SILOS)
        ]
        for agent in agents:
            agent.start()
        try:
            wait_for_silos(default_sqlite_url(tmp_path / "coordinator"), agents)
            spec = parse_job_spec({"name": "logged", "task": TASK, "rounds": 1, "min_silos": 2})
            with FedmekiClient(co.address, kit=kits / "alice") as client:
                job = client.submit_job(spec)
                wait_until(
                    lambda: client.get_job(job.id).state.finished,
                    180,
                    lambda: describe_job(client.get_job(job.id)) + "\n".join(a.output()[-3000:] for a in agents),
                )
                assert client.get_job(job.id).state == JobState.COMPLETED
        finally:
            for agent in agents:
                agent.stop()
        coordinator_log = co.stderr.read_text()

    features = np.concatenate(
        [
            load_dataset(tmp_path / name / "data" / f"{TASK}.safetensors", get_task(TASK)).features.ravel()
            for name in SILOS
        ]
    )
    logs = {"coordinator": coordinator_log} | {agent.name: agent.output() for agent in agents}
    for process, text in logs.items():
        lines = [line for line in text.splitlines() if line.strip()]
        entries = []
        for line in lines:
            if line.startswith("silo ") and " running on " in line:  # the agent's start-up line on stdout
                continue
            entry = json.loads(line)
            assert {"time", "level", "logger", "message"} <= entry.keys(), line
            entries.append(entry)
        assert len(entries) > 5, f"{process} logged too little to judge: {text}"
        leaks = [e["message"] for e in entries if patient_data_in(e["message"], features)]
        assert not leaks, f"{process} logged patient data: {leaks[:3]}"
    assert any("round 1" in json.loads(line)["message"] for line in logs["coordinator"].splitlines())
