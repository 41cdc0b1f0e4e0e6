"""The FedMEKI workload end to end: 3 silos train the encoders of 4 tasks, an injector injects them into a tiny
language model after every round and scores all 8 tasks; `fedmeki job report` prints the per-task table."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import address, enroll

from coordinator.server import Coordinator
from coordinator.store.views import get_job_row, manifest_of
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError
from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.models.base_folder import fingerprint
from fedmeki_core.models.injection import InjectionSettings, load_language_model, task_vocabulary
from fedmeki_core.records import JobState, JobStatus, RoundState
from fedmeki_core.report import format_report, task_report
from fedmeki_core.tasks import SUITES, get_task
from fedmeki_core.tasks.federation import write_synthetic_federation
from silo_agent.agent import SiloAgent
from silo_agent.bases import BaseRegistry
from silo_agent.cli import main as silo_main
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import GrpcTransport


def _spec(rounds: int, **injection: object) -> JobSpec:
    return parse_job_spec(
        {
            "name": "fedmeki-tiny",
            "task": "fedmeki",
            "rounds": rounds,
            "min_silos": 3,
            "model": {"architecture": "fedmeki-encoders-tiny"},
            "algorithm": {"local_epochs": 2, "batch_size": 32, "learning_rate": 2e-3},
            "injection": {"epochs": 4, "batch_size": 16, "learning_rate": 1e-3, **injection},
        }
    )


def _agent(
    coordinator: Coordinator,
    work_dir: Path,
    name: str,
    role: str,
    data: dict[str, Path],
    models: dict[str, Path] | None = None,
) -> SiloAgent:
    _, token = coordinator.registry.add(name, role)
    assert (
        silo_main(["enroll", "--coordinator", address(coordinator), "--token", token, "--work-dir", str(work_dir)]) == 0
    )
    settings = SiloSettings(
        coordinator=address(coordinator),
        work_dir=work_dir,
        device="cpu",
        data=data,
        poll_wait_seconds=0.2,
        holdout_fraction=0.5 if role == "injector" else 0.2,  # the injector: half fine-tuning, half test
        models=models or {},
    )
    state = AgentState(work_dir)
    enrollment = state.enrollment()
    assert enrollment is not None
    return SiloAgent(
        settings,
        GrpcTransport(settings.coordinator, enrollment.credential),
        state,
        LocalTrainer.from_settings(settings),
    )


def _run_until_finished(client: FedmekiClient, job_id: str, agents: list[SiloAgent], timeout: float) -> JobStatus:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        for agent in agents:
            agent.run_once()
        status = client.get_job(job_id)
        if status.state.finished:
            return status
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {client.get_job(job_id)}")


def test_a_fedmeki_job_trains_encoders_injects_them_and_scores_every_task(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    federation = write_synthetic_federation(
        "fedmeki", 3, 600, tmp_path / "data", image_size=32, public_fraction=0.2, seed=3
    )
    agents = [
        _agent(sqlite_coordinator, tmp_path / f"silo-{i}", f"silo-{i}", "trainer", files)
        for i, files in enumerate(federation.silos)
    ]
    agents.append(_agent(sqlite_coordinator, tmp_path / "injector", "injector", "injector", federation.injector))
    rounds = 3
    with FedmekiClient(address(sqlite_coordinator)) as client:
        job = client.submit_job(_spec(rounds))
        status = _run_until_finished(client, job.id, agents, timeout=600)

    assert status.state == JobState.COMPLETED, status.reason
    assert [r.number for r in status.injections] == list(range(rounds + 1))  # checkpoint 0 (baseline) to the last
    assert all(r.state == RoundState.COMMITTED and r.reported_silos == ("injector",) for r in status.injections)
    suite = SUITES["fedmeki"]
    for injection in status.injections:
        for name in suite.tasks:
            for metric in get_task(name).metrics:
                assert f"{name}.{metric}" in injection.metrics
    assert "injection_loss" not in status.injections[0].metrics  # the baseline is not fine-tuned
    rows = {row.task: row for row in task_report(status)}
    assert set(rows) == set(suite.tasks)
    for name in suite.train:  # each federated encoder beats chance and its round-0 self on its silos' data
        first, last = rows[name].federated
        assert first is not None and last is not None
        assert last > max(first, 0.55), (name, first, last)
    injected_first = [rows[name].injected[0] or 0.0 for name in suite.train]
    injected_last = [rows[name].injected[1] or 0.0 for name in suite.train]
    assert sum(injected_last) / 4 > max(sum(injected_first) / 4, 0.55), (injected_first, injected_last)

    assert fedmeki_main(["job", "report", job.id, "--coordinator", address(sqlite_coordinator)]) == 0
    report = capsys.readouterr().out
    for name in suite.tasks:
        assert name in report
    print(report)  # the table, for the record (pytest -s)


def test_injection_needs_an_enrolled_injector(coordinator: Coordinator) -> None:
    for index in range(3):
        enroll(coordinator, f"silo-{index}")
    with FedmekiClient(address(coordinator)) as client, pytest.raises(InvalidInputError) as raised:
        client.submit_job(_spec(1))
    assert raised.value.message.startswith("invalid job spec: injection: no enrolled injector silo")
    assert "--role injector" in raised.value.message


def test_an_injection_nobody_reports_fails_the_job_at_its_deadline(coordinator: Coordinator, tmp_path: Path) -> None:
    federation = write_synthetic_federation("fedmeki", 3, 60, tmp_path / "data", image_size=32, public_fraction=0.2)
    for index, files in enumerate(federation.silos):
        _agent(coordinator, tmp_path / f"silo-{index}", f"silo-{index}", "trainer", files)
    _agent(coordinator, tmp_path / "injector", "injector", "injector", federation.injector)  # never runs
    with FedmekiClient(address(coordinator)) as client:
        job = client.submit_job(_spec(1, deadline_seconds=0.5))
        give_up = time.monotonic() + 30
        while not (status := client.get_job(job.id)).state.finished and time.monotonic() < give_up:
            time.sleep(0.1)
    assert status.state == JobState.FAILED
    assert "injection of checkpoint 0" in status.reason
    assert status.injections[0].state == RoundState.FAILED


def test_a_small_fedmeki_job_completes_on_every_database(coordinator: Coordinator, tmp_path: Path) -> None:
    """The injection stage's bookkeeping (queue, order, reports, completion) on SQLite and PostgreSQL."""
    federation = write_synthetic_federation("fedmeki", 3, 60, tmp_path / "data", image_size=32, public_fraction=0.2)
    agents = [
        _agent(coordinator, tmp_path / f"silo-{i}", f"silo-{i}", "trainer", files)
        for i, files in enumerate(federation.silos)
    ]
    agents.append(_agent(coordinator, tmp_path / "injector", "injector", "injector", federation.injector))
    with FedmekiClient(address(coordinator)) as client:
        job = client.submit_job(_spec(2, epochs=1))
        status = _run_until_finished(client, job.id, agents, timeout=300)
    assert status.state == JobState.COMPLETED, status.reason
    assert [(r.number, r.state) for r in status.injections] == [(n, RoundState.COMMITTED) for n in range(3)]
    assert all(r.metrics.get("mortality.accuracy") is not None for r in status.injections)


def test_the_other_mode_federates_the_injection_model_itself(sqlite_coordinator: Coordinator, tmp_path: Path) -> None:
    """No injector: silos train encoders, projections and adapters end to end on their own data."""
    federation = write_synthetic_federation("fedmeki", 3, 400, tmp_path / "data", image_size=32, public_fraction=0.0)
    agents = [
        _agent(sqlite_coordinator, tmp_path / f"silo-{i}", f"silo-{i}", "trainer", files)
        for i, files in enumerate(federation.silos)
    ]
    spec = _spec(4, federated=True, adapter="lora")
    with FedmekiClient(address(sqlite_coordinator)) as client:
        job = client.submit_job(spec)  # no injector enrolled: none is needed
        status = _run_until_finished(client, job.id, agents, timeout=600)
    assert status.state == JobState.COMPLETED, status.reason
    assert status.injections == ()
    with sqlite_coordinator.database.read() as session:
        names = [t.name for t in manifest_of(get_job_row(session, job.id))]
    assert any(".lora_" in name for name in names) and any(name.startswith("projections.") for name in names)
    assert any(name.startswith("encoders.") for name in names)
    assert not any(name.startswith("language_model.") and "lora_" not in name for name in names)  # base stays
    rows = {row.task: row for row in task_report(status)}
    first = [rows[name].federated[0] or 0.0 for name in SUITES["fedmeki"].train]
    last = [rows[name].federated[1] or 0.0 for name in SUITES["fedmeki"].train]
    assert sum(last) / 4 > max(sum(first) / 4, 0.55), (first, last)  # generated yes/no answers, scored by the silos
    print(format_report(status))  # for the record (pytest -s)


def test_a_single_task_job_injects_its_encoder_and_scores_its_modalitys_tasks(
    sqlite_coordinator: Coordinator, tmp_path: Path
) -> None:
    """FedMEKI's single-task setting: one training task's encoder injected, scored on it and its modality's zero-shot
    tasks (the other modalities' tasks cannot be read by an X-ray encoder)."""
    federation = write_synthetic_federation("fedmeki", 3, 60, tmp_path / "data", image_size=32, public_fraction=0.2)
    agents = [
        _agent(sqlite_coordinator, tmp_path / f"silo-{i}", f"silo-{i}", "trainer", files)
        for i, files in enumerate(federation.silos)
    ]
    agents.append(_agent(sqlite_coordinator, tmp_path / "injector", "injector", "injector", federation.injector))
    spec = _spec(1, epochs=1).model_dump(mode="json")
    with FedmekiClient(address(sqlite_coordinator)) as client:
        job = client.submit_job(parse_job_spec({**spec, "task": "lung-opacity"}))
        status = _run_until_finished(client, job.id, agents, timeout=300)
    assert status.state == JobState.COMPLETED, status.reason
    scored = {key.split(".")[0] for r in status.injections for key in r.metrics if "." in key}
    assert scored == {"lung-opacity", "enlarged-cardiomediastinum", "medvqa"}
    with pytest.raises(InvalidInputError, match="a training task of one"):
        parse_job_spec({**spec, "task": "sepsis"})  # a zero-shot task: nothing to inject from


def _save_language_model(folder: Path, seed: int) -> Path:
    """A causal LM as the injector's operator holds it: save_pretrained (safetensors) with its tokenizer."""
    settings = InjectionSettings("tiny-llama", "lora", 4, 8, 2, 1, 4, 4)
    language_model, tokenizer = load_language_model(settings, task_vocabulary([]), seed=seed)
    language_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.timeout(900)  # two models and an injector in one process: minutes on a loaded 2-core machine
def test_the_injector_s_language_model_is_a_named_base_checked_by_its_fingerprint(
    sqlite_coordinator: Coordinator, tmp_path: Path
) -> None:
    researcher = _save_language_model(tmp_path / "researcher" / "lm", seed=3)
    other = _save_language_model(tmp_path / "researcher" / "other-lm", seed=4)
    held = shutil.copytree(researcher, tmp_path / "injector-models" / "lm")  # the injector's own copy
    federation = write_synthetic_federation("fedmeki", 1, 40, tmp_path / "data", image_size=32, public_fraction=0.3)
    agents = [
        _agent(sqlite_coordinator, tmp_path / "silo-0", "silo-0", "trainer", federation.silos[0]),
        _agent(sqlite_coordinator, tmp_path / "injector", "injector", "injector", federation.injector, {"lm": held}),
    ]
    spec = _spec(1, pretrained="lm", adapter="lora", epochs=1).model_copy(update={"min_silos": 1})
    with FedmekiClient(address(sqlite_coordinator)) as client:
        with pytest.raises(InvalidJobSpecError, match=r"needs your copy of it \(--injection-base FOLDER\)"):
            client.submit_job(spec)
        with pytest.raises(InvalidJobSpecError, match=r"injection\.fingerprint: does not match"):
            injection = spec.injection.model_copy(update={"fingerprint": fingerprint(other)})  # type: ignore[union-attr]
            client.submit_job(spec.model_copy(update={"injection": injection}), injection_base=researcher)
        job = client.submit_job(spec, injection_base=researcher)
        status = _run_until_finished(client, job.id, agents, timeout=600)
    assert status.state == JobState.COMPLETED, status.reason
    assert status.spec.injection is not None and status.spec.injection.fingerprint == fingerprint(researcher)
    assert [r.number for r in status.injections] == [0, 1]
    assert "injection_loss" in status.injections[1].metrics

    # Another copy under the job's name, or a name the injector does not map: declined, naming the base.
    registry = BaseRegistry({"lm": other}, torch.device("cpu"))
    with pytest.raises(InvalidInputError, match=r"base model 'lm': this silo's copy has fingerprint [0-9a-f]{16}…"):
        registry.injection_base(status.spec)
    with pytest.raises(InvalidInputError, match=r"base model 'lm' is not mapped in this injector's models"):
        BaseRegistry({}, torch.device("cpu")).injection_base(status.spec)
