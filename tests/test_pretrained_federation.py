"""End to end: a saved Llama-style base at three hospitals, LoRA adapters federated through the real coordinator.

Each silo agent runs in its own process with its own copy of the base in silo.yaml `models`; only the adapters
travel. Silos that hold another copy, or a folder with pickle weights, decline and the job fails with their reason.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import Update
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.base_folder import fingerprint
from fedmeki_core.records import JobState, RoundKind, RoundState
from fedmeki_core.wire import read_manifest
from tests.agents import AGENTS_SEEN_SECONDS, AgentProcess, describe_job, prepare_agent, recompute_round, wait_until
from tests.bases import save_llama, write_instructions
from tests.conftest import address, coordinator_settings

SILOS = 3


@pytest.fixture
def keeping_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator that keeps spooled updates, so the test can recompute each round by hand."""
    instance = Coordinator(coordinator_settings(tmp_path / "coordinator", keep_updates=True))
    instance.start()
    yield instance
    instance.stop(grace=0)


@contextmanager
def hospitals(coordinator: Coordinator, root: Path, researcher_base: Path) -> Iterator[list[AgentProcess]]:
    """Three silos, each with its own data and its own copies of the bases: `llama` (the researcher's base),
    `llama-other` (silo-1 holds a different base under that name) and `llama-pickled` (silo-2's folder also has
    pytorch_model.bin)."""
    agents = []
    for index in range(SILOS):
        folder = root / f"silo-{index}"
        llama = shutil.copytree(researcher_base, folder / "models" / "llama")
        other = save_llama(folder / "models" / "other", seed=7) if index == 1 else llama
        pickled = shutil.copytree(llama, folder / "models" / "pickled")
        if index == 2:
            (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
        settings = {
            "data": {"instructions": str(write_instructions(folder / "data" / "cards.jsonl", 40, seed=index))},
            "models": {"llama": str(llama), "llama-other": str(other), "llama-pickled": str(pickled)},
        }
        _, token = coordinator.registry.add(folder.name)
        agents.append(prepare_agent(address(coordinator), token, folder, index, SILOS, 8, extra=settings))
    for agent in agents:
        agent.start()
    try:
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def _spec(name: str, base: str, rounds: int, local_epochs: int) -> dict[str, object]:
    return {
        "name": name,
        "task": "instructions",
        "rounds": rounds,
        "min_silos": SILOS,
        "round_deadline_seconds": 240,
        "seed": 5,
        "algorithm": {"local_epochs": local_epochs, "batch_size": 8, "learning_rate": 0.01},
        "model": {
            "architecture": "causal-lm",
            "pretrained": base,
            "config": {"max_length": 48},
            "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        },
    }


def test_adapters_federate_across_three_hospitals_and_other_bases_are_declined(
    keeping_coordinator: Coordinator, tmp_path: Path
) -> None:
    coordinator = keeping_coordinator
    base = save_llama(tmp_path / "researcher" / "llama", hidden=128)
    with (
        hospitals(coordinator, tmp_path / "silos", base) as agents,
        FedmekiClient(address(coordinator)) as client,
    ):
        logs = lambda: "\n".join(a.output()[-3000:] for a in agents)  # noqa: E731
        wait_until(
            lambda: len([s for s in coordinator.registry.list() if s.last_seen_at]) == SILOS, AGENTS_SEEN_SECONDS, logs
        )

        def run(name: str, pretrained: str, rounds: int = 1, local_epochs: int = 1) -> tuple[str, str]:
            job = client.submit_job(parse_job_spec(_spec(name, pretrained, rounds, local_epochs)), base=base)
            wait_until(lambda: client.get_job(job.id).state.finished, 300, lambda: describe_job(client.get_job(job.id)))
            return job.id, describe_job(client.get_job(job.id))

        other_id, _ = run("another-copy", "llama-other")
        pickled_id, _ = run("pickled", "llama-pickled")
        job_id, described = run("adapters", "llama", rounds=2, local_epochs=2)
        other, pickled, final = (client.get_job(i) for i in (other_id, pickled_id, job_id))

    assert other.state == JobState.FAILED and pickled.state == JobState.FAILED
    assert "silo 'silo-1' aborted round 1: base model 'llama-other': this silo's copy has fingerprint" in other.reason
    assert "silo 'silo-2' aborted round 1: base model 'llama-pickled':" in pickled.reason
    assert "holds pickle weights (pytorch_model.bin): only safetensors are loaded" in pickled.reason

    assert final.state == JobState.COMPLETED, described
    assert [(r.number, r.kind, r.state) for r in final.rounds] == [
        (1, RoundKind.TRAIN, RoundState.COMMITTED),
        (2, RoundKind.TRAIN, RoundState.COMMITTED),
        (3, RoundKind.EVALUATE, RoundState.COMMITTED),
    ]
    assert final.rounds[2].metrics["eval_loss"] < final.rounds[0].metrics["eval_loss"]  # checkpoint 2 vs 0

    # What travels: the adapters only, never the base; each upload is the adapters' bytes and a small header.
    artifacts = coordinator.artifacts
    manifest = read_manifest(artifacts.checkpoint_path(job_id, 0))
    assert manifest and all(".lora_A." in spec.name or ".lora_B." in spec.name for spec in manifest)
    adapter_bytes = sum(spec.nbytes for spec in manifest)
    assert adapter_bytes < (base / "model.safetensors").stat().st_size / 10
    assert final.spec.model.fingerprint == fingerprint(base)  # filled in by the client from its copy
    with coordinator.database.read() as session:
        updates = session.scalars(select(Update).where(Update.job_id == job_id)).all()
    uploads = [u for u in updates if u.path]
    assert len(uploads) == 2 * SILOS
    for update in uploads:
        assert update.size_bytes <= 1.1 * adapter_bytes, (update.size_bytes, adapter_bytes)

    # FedAvg on the exchanged tensors, by hand.
    for round_number in (1, 2):
        round_updates = [(artifacts.absolute(u.path), u.num_samples) for u in uploads if u.round_number == round_number]
        expected = recompute_round(artifacts.checkpoint_path(job_id, round_number - 1), round_updates)
        actual = load_file(str(artifacts.checkpoint_path(job_id, round_number)))
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow  # 2 agents and 2 rank processes a round (each imports torch): minutes; `pytest -m slow` runs it
@pytest.mark.timeout(1800)
def test_a_silo_sharding_the_base_over_two_gloo_ranks_with_fsdp_federates_adapters_with_one_on_one_process(
    keeping_coordinator: Coordinator, tmp_path: Path
) -> None:
    """silo-0 trains each round over two CPU ranks (`devices: [cpu, cpu]`, gloo) with the base sharded by FSDP
    (`sharding: fsdp`), silo-1 in one process: two rounds commit, each the FedAvg of the two uploads, and each
    upload is the adapters alone (FSDP gathers them whole on rank 0; the base is never gathered nor sent)."""
    coordinator = keeping_coordinator
    base = save_llama(tmp_path / "researcher" / "llama")
    agents = []
    for index, extra in enumerate([{"devices": ["cpu", "cpu"], "sharding": "fsdp"}, {}]):
        folder = tmp_path / f"silo-{index}"
        settings = {
            "data": {"instructions": str(write_instructions(folder / "data" / "cards.jsonl", 30, seed=index))},
            "models": {"llama": str(shutil.copytree(base, folder / "models" / "llama"))},
            "distributed_timeout_seconds": 300,
            **extra,
        }
        _, token = coordinator.registry.add(folder.name)
        agents.append(prepare_agent(address(coordinator), token, folder, index, 2, 8, extra=settings))
    for agent in agents:
        agent.start()
    try:
        with FedmekiClient(address(coordinator)) as client:
            spec = {**_spec("fsdp", "llama", rounds=2, local_epochs=1), "min_silos": 2, "round_deadline_seconds": 600}
            job = client.submit_job(parse_job_spec(spec), base=base)
            describe = lambda: describe_job(client.get_job(job.id)) + "\n" + agents[0].output()[-4000:]  # noqa: E731
            wait_until(lambda: client.get_job(job.id).state.finished, 900, describe)
            final = client.get_job(job.id)
    finally:
        for agent in agents:
            agent.stop()
    assert final.state == JobState.COMPLETED, describe_job(final)
    assert [(r.number, r.state) for r in final.rounds] == [(n, RoundState.COMMITTED) for n in (1, 2, 3)]
    assert agents[0].output().count("the train round on 2 ranks (cpu, cpu), the base sharded with FSDP") == 2
    assert "round on 2 ranks" not in agents[1].output()

    artifacts = coordinator.artifacts
    manifest = read_manifest(artifacts.checkpoint_path(job.id, 0))
    assert manifest and all(".lora_A." in spec.name or ".lora_B." in spec.name for spec in manifest)
    adapter_bytes = sum(spec.nbytes for spec in manifest)
    with coordinator.database.read() as session:
        uploads = [u for u in session.scalars(select(Update).where(Update.job_id == job.id)).all() if u.path]
    assert sorted((u.round_number, u.num_samples) for u in uploads) == [(1, 24), (1, 24), (2, 24), (2, 24)]
    for round_number in (1, 2):
        updates = [(artifacts.absolute(u.path), u.num_samples) for u in uploads if u.round_number == round_number]
        for path, _ in updates:
            assert sorted(load_file(str(path))) == sorted(spec.name for spec in manifest)  # adapters only
            assert path.stat().st_size <= 1.1 * adapter_bytes
        expected = recompute_round(artifacts.checkpoint_path(job.id, round_number - 1), updates)
        actual = load_file(str(artifacts.checkpoint_path(job.id, round_number)))
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
