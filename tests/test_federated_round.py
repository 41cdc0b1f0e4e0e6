"""End to end: a real coordinator, real silo agents in their own processes, real training, a real database."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.torch import load_file as torch_load_file
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import Update
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, RoundKind, RoundState
from fedmeki_core.wire import read_manifest
from tests.agents import TASK, describe_job, recompute_round, running_agents, wait_until
from tests.conftest import address, coordinator_settings


@pytest.fixture
def keeping_coordinator(tmp_path: Path, database_url: str):  # type: ignore[no-untyped-def]
    """A coordinator that keeps spooled updates, so the test can recompute each round by hand."""
    instance = Coordinator(coordinator_settings(tmp_path / "coordinator", database_url, keep_updates=True))
    instance.start()
    yield instance
    instance.stop(grace=0)


def test_two_round_job_completes_and_matches_a_hand_computed_fedavg(
    keeping_coordinator: Coordinator, tmp_path: Path
) -> None:
    _run_and_check(keeping_coordinator, tmp_path, "float32")


def test_rounds_summed_at_close_match_the_hand_computed_fedavg(tmp_path: Path) -> None:
    """`running_sum_bytes` 0: every round's updates summed from their files at close (coordinator/aggregation.py)."""
    settings = coordinator_settings(tmp_path / "coordinator", keep_updates=True, running_sum_bytes=0)
    instance = Coordinator(settings)
    instance.start()
    try:
        _run_and_check(instance, tmp_path, "float32")
    finally:
        instance.stop(grace=0)


@pytest.mark.parametrize("encoding", ["bfloat16", "float16"])
def test_narrow_delta_encodings_travel_narrow_and_aggregate_exactly(tmp_path: Path, encoding: str) -> None:
    instance = Coordinator(coordinator_settings(tmp_path / "coordinator", keep_updates=True))
    instance.start()
    try:
        _run_and_check(instance, tmp_path, encoding)
    finally:
        instance.stop(grace=0)
    dtypes = {"bfloat16": "BF16", "float16": "F16"}
    updates = list((instance.artifacts.root / "updates").rglob("*.safetensors"))
    assert len(updates) == 4
    for update in updates:
        assert {spec.dtype for spec in read_manifest(update)} == {dtypes[encoding]}


@pytest.mark.parametrize("encoding", ["int8", "topk"])
def test_lossy_delta_encodings_travel_encoded_keep_a_residual_and_aggregate_exactly(
    tmp_path: Path, encoding: str
) -> None:
    instance = Coordinator(coordinator_settings(tmp_path / "coordinator", keep_updates=True))
    instance.start()
    try:
        _run_and_check(instance, tmp_path, encoding, {"int8_block_size": 64, "topk_fraction": 0.05})
    finally:
        instance.stop(grace=0)
    updates = list((instance.artifacts.root / "updates").rglob("*.safetensors"))
    assert len(updates) == 4
    suffix = ".__scale" if encoding == "int8" else ".__indices"
    for update in updates:
        specs = {spec.name: spec for spec in read_manifest(update)}
        values = [spec for name, spec in specs.items() if not name.endswith(suffix)]
        assert {spec.dtype for spec in values} == {"I8" if encoding == "int8" else "F32"}
        assert all(spec.name + suffix in specs for spec in values)
    residuals = sorted(p.name for p in (tmp_path / "silos").rglob("residual-*.safetensors"))
    assert residuals == ["residual-00002.safetensors"] * 2  # each silo keeps its newest, for its next round


def _run_and_check(coordinator: Coordinator, tmp_path: Path, encoding: str, options: dict | None = None) -> None:
    spec = parse_job_spec(
        {
            **(options or {}),
            "name": "e2e",
            "task": TASK,
            "rounds": 2,
            "min_silos": 2,
            "round_deadline_seconds": 120,
            "seed": 3,
            "algorithm": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.003},
            "delta_encoding": encoding,
        }
    )
    with (
        running_agents(coordinator, tmp_path / "silos", samples=(160, 96)) as agents,
        FedmekiClient(address(coordinator)) as client,
    ):
        wait_until(
            lambda: len([s for s in coordinator.registry.list() if s.last_seen_at]) == 2,
            60,
            lambda: [a.output()[-2000:] for a in agents],
        )
        job = client.submit_job(spec)
        wait_until(
            lambda: client.get_job(job.id).state.finished,
            180,
            lambda: describe_job(client.get_job(job.id)) + "\n" + "\n".join(a.output()[-3000:] for a in agents),
        )
        final = client.get_job(job.id)
        downloaded = client.download_checkpoint(job.id, tmp_path / "final.safetensors")

    assert final.state == JobState.COMPLETED, describe_job(final)
    assert [(r.number, r.kind, r.state) for r in final.rounds] == [
        (1, RoundKind.TRAIN, RoundState.COMMITTED),
        (2, RoundKind.TRAIN, RoundState.COMMITTED),
        (3, RoundKind.EVALUATE, RoundState.COMMITTED),
    ]
    for summary in final.rounds:
        assert summary.reported_silos == ("silo-0", "silo-1")
        assert 0.0 <= summary.metrics["eval_accuracy"] <= 1.0
    assert "train_loss" in final.rounds[0].metrics
    assert downloaded.round == 2

    artifacts = coordinator.artifacts
    with coordinator.database.read() as session:
        updates = session.scalars(select(Update).where(Update.job_id == job.id)).all()
    for round_number in (1, 2):
        round_updates = [(artifacts.absolute(u.path), u.num_samples) for u in updates if u.round_number == round_number]
        train_sizes = [n - max(1, round(n * 0.2)) for n in (160, 96)]  # the agents hold 20% out for evaluation
        assert sorted(n for _, n in round_updates) == sorted(train_sizes)
        expected = recompute_round(artifacts.checkpoint_path(job.id, round_number - 1), round_updates, 64)
        actual = load_file(str(artifacts.checkpoint_path(job.id, round_number)))
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        assert any(
            not np.allclose(torch_load_file(str(path))[name].float().numpy(), 0)
            for path, _ in round_updates
            for name in actual
        )
    final_model = load_file(str(tmp_path / "final.safetensors"))
    for name, value in load_file(str(artifacts.checkpoint_path(job.id, 2))).items():
        np.testing.assert_array_equal(final_model[name], value)
