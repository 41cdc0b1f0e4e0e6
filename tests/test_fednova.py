"""FedNova: silos send their delta per local step and declare the steps; the server scales by their weighted mean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from in_process import in_process_agents, run_job
from safetensors.numpy import save, save_file

from coordinator.aggregation import RoundAccumulator
from coordinator.server import Coordinator
from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState
from fedmeki_core.stream_validation import SafetensorsStreamValidator
from fedmeki_core.wire import LOCAL_STEPS_KEY, TensorSpec

MANIFEST = [TensorSpec("w", "F32", (2,))]


def _round(tmp_path: Path, name: str, updates: list[tuple[float, int, float]]) -> np.ndarray:
    """One round from `(per-step delta, local steps, weight)` updates, starting at w = 1."""
    current = tmp_path / "current.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(current))
    accumulator = RoundAccumulator(MANIFEST, [f"s{i}" for i in range(len(updates))])
    for i, (delta, steps, weight) in enumerate(updates):
        path = tmp_path / f"u{i}.safetensors"
        save_file({"w": np.full(2, delta, np.float32)}, str(path), metadata={LOCAL_STEPS_KEY: str(steps)})
        accumulator.offer(f"s{i}", path, weight)
    accumulator.close()
    entry = get_algorithm(name)
    _, steps = accumulator.next_global(current, entry.server(entry.resolve_options({})), {})
    return np.array(next(steps)[1], copy=True)


def test_one_fednova_round_by_hand(tmp_path: Path) -> None:
    # tau_eff = (1 x 2 + 3 x 4) / 4 = 3.5; the mean per-step delta = (1 x 0.5 + 3 x 0.1) / 4 = 0.2
    result = _round(tmp_path, "fednova", [(0.5, 2, 1.0), (0.1, 4, 3.0)])
    np.testing.assert_allclose(result, 1 + 3.5 * 0.2, rtol=1e-6)


def test_with_equal_steps_fednova_is_fedavg(tmp_path: Path) -> None:
    steps = 5
    raw = [(0.5, 1.0), (-0.2, 2.0)]  # each silo's whole delta and weight
    nova = _round(tmp_path, "fednova", [(d / steps, steps, w) for d, w in raw])
    avg = _round(tmp_path, "fedavg", [(d, steps, w) for d, w in raw])
    np.testing.assert_allclose(nova, avg, rtol=1e-6)


@pytest.mark.parametrize("value", ["0", "-3", "two", "", "²", "9" * 400, "1" * 5000])
def test_malformed_local_steps_are_refused_on_upload(value: str) -> None:
    payload = save({"w": np.ones(2, np.float32)}, metadata={LOCAL_STEPS_KEY: value})
    with pytest.raises(InvalidUpdateError, match="must be an integer from 1 to"):
        SafetensorsStreamValidator(MANIFEST, len(payload)).feed(payload)


def test_a_fednova_round_needs_declared_steps(tmp_path: Path) -> None:
    entry = get_algorithm("fednova")
    with pytest.raises(InvalidUpdateError, match="declare no local steps"):
        entry.server(entry.resolve_options({})).begin_round(None)


def test_a_fednova_job_runs_end_to_end(sqlite_coordinator: Coordinator, tmp_path: Path) -> None:
    agents = in_process_agents(sqlite_coordinator, tmp_path, "synthetic-vitals", 120)
    spec = {
        "name": "nova",
        "task": "synthetic-vitals",
        "rounds": 2,
        "min_silos": 3,
        "algorithm": {"name": "fednova", "local_epochs": 2, "batch_size": 16, "learning_rate": 0.05},
    }
    status = run_job(sqlite_coordinator, agents, parse_job_spec(spec))
    assert status.state == JobState.COMPLETED, status.reason
    assert status.rounds[-1].metrics["eval_accuracy"] > status.rounds[0].metrics["eval_accuracy"]
