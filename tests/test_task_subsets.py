"""Multi-task jobs across silos that hold different subsets of a suite's tasks, as hospitals do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import address
from safetensors.numpy import save, save_file
from safetensors.torch import load_file

from coordinator.aggregation import RoundAccumulator
from coordinator.server import Coordinator
from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.algorithms.base import ServerState
from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_job_model, initial_tensors
from fedmeki_core.records import CheckpointInfo, JobState, RoundKind, RoundTask
from fedmeki_core.stream_validation import SafetensorsStreamValidator
from fedmeki_core.tasks.federation import write_synthetic_federation
from fedmeki_core.wire import UNTRAINED_KEY, TensorSpec, read_header, untrained_tensors
from silo_agent.agent import SiloAgent
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState
from silo_agent.trainer import LocalTrainer, resolve_device
from silo_agent.transport import GrpcTransport

XRAY = ("lung-opacity", "covid-19")
MANIFEST = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))]


def _update(path: Path, a: float, b: float, untrained: str = "") -> Path:
    tensors = {"a": np.full(2, a, np.float32), "b": np.full(2, b, np.float32)}
    save_file(tensors, str(path), metadata={UNTRAINED_KEY: untrained} if untrained else None)
    return path


def _aggregate(tmp_path: Path, updates: list[tuple[Path, float]], state: dict[str, ServerState], name: str) -> dict:  # type: ignore[type-arg]
    current = tmp_path / "current.safetensors"
    save_file({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}, str(current))
    accumulator = RoundAccumulator(MANIFEST, [f"s{i}" for i in range(len(updates))])
    for i, (path, weight) in enumerate(updates):
        accumulator.offer(f"s{i}", path, weight)
    accumulator.close()
    entry = get_algorithm(name)
    order, steps = accumulator.next_global(current, entry.server(entry.resolve_options({})), state)
    return {spec.name: np.array(t, copy=True) for spec, (_, t) in zip(order, steps, strict=True)}


def test_an_untrained_tensor_counts_for_nothing_in_its_mean(tmp_path: Path) -> None:
    first = _update(tmp_path / "1.safetensors", 1.0, 100.0, untrained="b")
    second = _update(tmp_path / "2.safetensors", 3.0, 2.0)
    result = _aggregate(tmp_path, [(first, 1.0), (second, 3.0)], {}, "fedavg")
    assert result["a"].tolist() == [1 + (1 * 1 + 3 * 3) / 4] * 2  # both silos, weighted
    assert result["b"].tolist() == [1 + 2.0] * 2  # only the silo that trained it


def test_a_tensor_nobody_trained_stays_with_its_server_state(tmp_path: Path) -> None:
    first = _update(tmp_path / "1.safetensors", 1.0, 5.0, untrained="b")
    second = _update(tmp_path / "2.safetensors", 1.0, 5.0, untrained="b")
    state: dict[str, ServerState] = {"b": {"m": np.full(2, 0.5, np.float32)}}
    result = _aggregate(tmp_path, [(first, 1.0), (second, 1.0)], state, "fedadam")
    assert result["b"].tolist() == [1.0, 1.0]
    assert state["b"]["m"].tolist() == [0.5, 0.5]  # FedAdam's moments of b did not move either
    assert "a" in state and result["a"].tolist() != [1.0, 1.0]


def test_untrained_names_must_be_in_the_manifest() -> None:
    payload = save({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}, metadata={UNTRAINED_KEY: "a\nzzz"})
    validator = SafetensorsStreamValidator(MANIFEST, len(payload))
    with pytest.raises(InvalidUpdateError, match="'zzz' is not in the round's manifest"):
        validator.feed(payload)


def test_a_silo_with_some_of_a_suites_tasks_declares_the_rest_untrained(tmp_path: Path) -> None:
    federation = write_synthetic_federation("fedmeki", 1, 80, tmp_path / "data", image_size=32, seed=1)
    own = {name: path for name, path in federation.silos[0].items() if name in XRAY}
    trainer = LocalTrainer(resolve_device("cpu"), own, 0.2)
    spec = parse_job_spec(
        {"name": "x", "task": "fedmeki", "rounds": 1, "model": {"architecture": "fedmeki-encoders-tiny"}}
    )
    tensors = initial_tensors(spec, build_job_model(spec))
    checkpoint = tmp_path / "global.safetensors"
    from safetensors.torch import save_file as torch_save_file

    torch_save_file(tensors, str(checkpoint))
    manifest = [TensorSpec(n, "F32", tuple(t.shape)) for n, t in sorted(tensors.items())]
    info = CheckpointInfo("j", 0, checkpoint.stat().st_size, sha256_file(checkpoint))
    result = trainer.train(RoundTask("j", 1, RoundKind.TRAIN, spec, info, manifest, 60), checkpoint, tmp_path / "d")
    untrained = untrained_tensors(read_header(result.delta_path))
    groups = {".".join(name.split(".")[:2]) for name in untrained}
    assert groups == {"encoders.ecg", "encoders.ehr", "heads.ecg-abnormal", "heads.mortality"}
    delta = load_file(str(result.delta_path))
    assert all(not delta[name].any() for name in untrained)
    assert any(bool(delta[name].any()) for name in delta if name.startswith("encoders.xray"))
    assert set(result.metrics) >= {"lung-opacity.eval_accuracy", "covid-19.eval_accuracy", "eval_accuracy"}
    assert all(result.metrics[f"{task}.eval_accuracy.n"] for task in ("lung-opacity", "covid-19"))
    assert "eval_accuracy.n" not in result.metrics  # counts stay per task, where the scores are averaged
    assert not any(key.startswith(("mortality", "ecg-abnormal")) for key in result.metrics)


def _agents(coordinator: Coordinator, root: Path, holdings: list[tuple[str, ...]]) -> list[SiloAgent]:
    federation = write_synthetic_federation("fedmeki", len(holdings), 150, root / "data", image_size=32, seed=2)
    agents = []
    for index, (files, tasks) in enumerate(zip(federation.silos, holdings, strict=True)):
        _, token = coordinator.registry.add(f"silo-{index}")
        enrollment = coordinator.registry.enroll(token)
        work_dir = root / f"silo-{index}"
        settings = SiloSettings(
            coordinator=address(coordinator),
            work_dir=work_dir,
            device="cpu",
            data={name: path for name, path in files.items() if name in tasks},
            poll_wait_seconds=0.2,
        )
        transport = GrpcTransport(address(coordinator), enrollment.credential)
        agents.append(SiloAgent(settings, transport, AgentState(work_dir), LocalTrainer.from_settings(settings)))
    return agents


def _suite_job(rounds: int, deadline: float = 120) -> dict[str, object]:
    return {
        "name": "subsets",
        "task": "fedmeki",
        "rounds": rounds,
        "min_silos": 3,
        "round_deadline_seconds": deadline,
        "model": {"architecture": "fedmeki-encoders-tiny"},
        "algorithm": {"local_epochs": 1, "batch_size": 32, "learning_rate": 2e-3},
    }


def test_a_suite_job_trains_across_silos_holding_different_tasks(
    sqlite_coordinator: Coordinator, tmp_path: Path
) -> None:
    from in_process import run_job

    holdings = [XRAY, ("ecg-abnormal", "mortality"), (*XRAY, "ecg-abnormal", "mortality")]
    status = run_job(sqlite_coordinator, _agents(sqlite_coordinator, tmp_path, holdings), parse_job_spec(_suite_job(2)))
    assert status.state == JobState.COMPLETED, status.reason
    for summary in status.rounds:  # every task scored in every round, by the silos that hold it
        assert {f"{t}.eval_accuracy" for t in (*XRAY, "ecg-abnormal", "mortality")} <= summary.metrics.keys()
    first, last = (load_file(str(sqlite_coordinator.artifacts.checkpoint_path(status.id, r))) for r in (0, 2))
    assert all(not first[n].equal(last[n]) for n in first if n.startswith("heads."))  # every head trained


def test_a_round_waits_for_a_silo_holding_each_task(sqlite_coordinator: Coordinator, tmp_path: Path) -> None:
    from in_process import run_job

    agents = _agents(sqlite_coordinator, tmp_path, [XRAY, XRAY, XRAY])
    status = run_job(sqlite_coordinator, agents, parse_job_spec(_suite_job(1, deadline=2)), timeout=60)
    assert status.state == JobState.FAILED
    assert "no eligible silo holds data for ecg-abnormal, mortality" in status.reason
