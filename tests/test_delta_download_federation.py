"""Delta downloads end to end: a real coordinator, real silo agents in their own processes, real training. Every
silo's rebuilt global model is the coordinator's checkpoint, bit for bit, and the bytes sent shrink to the
encoding's share; a silo that lost what it held, or names a checkpoint the coordinator has no delta from, gets the
whole checkpoint."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.artifacts import Artifacts
from coordinator.download_deltas import delta_path
from coordinator.server import Coordinator
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import InvalidJobSpecError
from fedmeki_core.files import recycle, sha256_file
from fedmeki_core.global_deltas import delta_base
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import CheckpointInfo, JobState, JobStatus, RoundKind, RoundTask
from fedmeki_core.wire import read_header, read_layout, safetensors_header
from silo_agent.delta_downloads import DeltaDownloads
from silo_agent.state import AgentState
from silo_agent.transport import GrpcTransport
from tests.agents import TASK, AgentProcess, describe_job, running_agents, wait_until
from tests.conftest import address, coordinator_settings

_DELTA_LINE = re.compile(r"checkpoint (\d+) came as a delta of (\d+) bytes from checkpoint (\d+)")


def _spec(encoding: str) -> dict[str, object]:
    return {
        "name": "deltas",
        "task": TASK,
        "rounds": 3,
        "min_silos": 2,
        "round_deadline_seconds": 120,
        "seed": 3,
        "model": {"config": {"hidden_size": 128, "intermediate_size": 256}},  # headers: a small part
        "algorithm": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.003},
        "delta_encoding": encoding,
        "downloads": "delta",
    }


def _finished(coordinator: Coordinator, client: FedmekiClient, agents: list[AgentProcess], job_id: str) -> JobStatus:
    wait_until(
        lambda: client.get_job(job_id).state.finished,
        300,
        lambda: describe_job(client.get_job(job_id)) + "\n" + "\n".join(a.output()[-3000:] for a in agents),
    )
    final = client.get_job(job_id)
    assert final.state == JobState.COMPLETED, describe_job(final) + "\n".join(a.output()[-3000:] for a in agents)
    return final


def _downloaded_bytes(coordinator: Coordinator) -> float:
    value = coordinator.metrics.registry.get_sample_value(
        "fedmeki_transfer_bytes_total", {"method": "DownloadModel", "direction": "download"}
    )
    return value or 0.0


def _held_sha256(agent_dir: Path, job_id: str, round_number: int) -> str:
    (held,) = (agent_dir / "jobs" / job_id).glob(f"held-global-{round_number:05d}-*.safetensors")
    assert held.name == f"held-global-{round_number:05d}-{sha256_file(held)}.safetensors"
    return sha256_file(held)


def test_every_silo_rebuilds_each_global_from_int8_deltas_and_downloads_shrink(
    tmp_path: Path, database_url: str
) -> None:
    coordinator = Coordinator(coordinator_settings(tmp_path / "coordinator", database_url))
    coordinator.start()
    try:
        with (
            running_agents(coordinator, tmp_path / "silos", samples=(160, 96)) as agents,
            FedmekiClient(address(coordinator)) as client,
        ):
            job = client.submit_job(parse_job_spec(_spec("int8")))
            final = _finished(coordinator, client, agents, job.id)
            logs = [agent.output() for agent in agents]
        artifacts = coordinator.artifacts
        checkpoints = {r: artifacts.checkpoint_path(job.id, r) for r in range(4)}
        assert final.current_round == 3
        for index in range(2):  # each silo holds the last checkpoint, rebuilt from its delta
            assert _held_sha256(tmp_path / "silos" / f"silo-{index}", job.id, 3) == sha256_file(checkpoints[3])
        deltas = [tuple(int(g) for g in m.groups()) for log in logs for m in _DELTA_LINE.finditer(log)]
        # Rounds 2 and 3 and the closing evaluation start from checkpoints 1, 2, 3: each came as a delta.
        assert sorted((target, base) for target, _, base in deltas) == [(1, 0), (1, 0), (2, 1), (2, 1), (3, 2), (3, 2)]
        full = checkpoints[0].stat().st_size
        assert _downloaded_bytes(coordinator) == 2 * full + sum(size for _, size, _ in deltas)
        for target, size, _ in deltas:
            assert size <= 0.27 * checkpoints[target].stat().st_size  # int8: a byte and a 128th of a scale per value

        # A silo naming a checkpoint the coordinator has no delta from gets the whole checkpoint.
        enrollment = AgentState(tmp_path / "silos" / "silo-0").enrollment()
        assert enrollment is not None
        newest = CheckpointInfo(job.id, 3, checkpoints[3].stat().st_size, sha256_file(checkpoints[3]))
        base = delta_base(delta_path(artifacts, job.id, 3))
        assert base is not None and base[0] == 2
        transport = GrpcTransport(address(coordinator), enrollment.credential)
        try:
            for index, (base_round, base_sha256) in enumerate([(2, "0" * 64), (7, base[1]), (1, base[1])]):
                whole = tmp_path / f"whole-{index}.safetensors"
                named = CheckpointInfo(job.id, base_round, 0, base_sha256)
                assert not transport.download_delta(newest, named, tmp_path / f"delta-{index}", whole)
                assert sha256_file(whole) == newest.sha256
            delta = tmp_path / "delta.safetensors"
            assert transport.download_delta(
                newest, CheckpointInfo(job.id, base[0], 0, base[1]), delta, tmp_path / "unused"
            )
            assert sha256_file(delta) == sha256_file(delta_path(artifacts, job.id, 3))
            _the_held_model_is_the_downloaded_file_under_a_second_name(transport, artifacts, job.id, newest, tmp_path)
            _a_rebuilt_model_that_does_not_match_is_downloaded_whole(transport, artifacts, job.id, newest, tmp_path)
        finally:
            transport.close()
    finally:
        coordinator.stop(grace=0)


def _the_held_model_is_the_downloaded_file_under_a_second_name(
    transport: GrpcTransport, artifacts: Artifacts, job_id: str, newest: CheckpointInfo, tmp_path: Path
) -> None:
    """No copy: the rebuilt checkpoint overwrites the spare, the held model is a hard link to it, and the model
    held before becomes the next spare; the agent's recycling of the task's file leaves both alone."""
    folder = tmp_path / "silo-linking"
    folder.mkdir()
    second = artifacts.checkpoint_path(job_id, 2)
    shutil.copyfile(second, folder / f"held-global-00002-{sha256_file(second)}.safetensors")
    spare = folder / "spare"
    spare.write_bytes(b"a finished task's checkpoint")
    task = RoundTask(job_id, 4, RoundKind.EVALUATE, parse_job_spec(_spec("int8")), newest, [], 60.0)
    downloads = DeltaDownloads(transport, folder)
    path = folder / "global-00003.safetensors"
    downloads.download(task, path, spare)
    held = downloads.held()
    assert held is not None and held.round == 3 and held.path.samefile(path) and sha256_file(path) == newest.sha256
    assert sha256_file(spare) == sha256_file(second) and not list(folder.glob("held-global-00002-*"))
    recycle(path, spare)  # the task ends: its name goes, the held model and the spare stay
    assert not path.exists() and sha256_file(held.path) == newest.sha256 and sha256_file(spare) == sha256_file(second)
    again = folder / "global-again.safetensors"
    downloads.download(task, again, spare)  # the checkpoint held: linked, checked, nothing downloaded
    assert again.samefile(held.path) and sha256_file(spare) == sha256_file(second)


def _a_rebuilt_model_that_does_not_match_is_downloaded_whole(
    transport: GrpcTransport, artifacts: Artifacts, job_id: str, newest: CheckpointInfo, tmp_path: Path
) -> None:
    """A silo holding checkpoint 2 rebuilds checkpoint 3 from its delta; a delta whose scales were altered (well
    formed, so only the sha256 can tell) rebuilds another model: discarded, and the checkpoint comes whole."""
    folder = tmp_path / "silo-with-checkpoint-2"
    folder.mkdir()
    task = RoundTask(job_id, 4, RoundKind.EVALUATE, parse_job_spec(_spec("int8")), newest, [], 60.0)
    for altered in (False, True):
        second = artifacts.checkpoint_path(job_id, 2)
        shutil.copyfile(second, folder / f"held-global-00002-{sha256_file(second)}.safetensors")
        if altered:
            stored = delta_path(artifacts, job_id, 3)
            _, order = read_layout(stored)
            entries = load_file(str(stored))
            entries[order[1].name] *= np.float32(1.5)  # the first tensor's scales
            metadata = read_header(stored)["__metadata__"]
            data = b"".join(np.ascontiguousarray(entries[spec.name]).tobytes() for spec in order)
            stored.write_bytes(safetensors_header(order, metadata) + data)  # laid out as the coordinator does
        downloads = DeltaDownloads(transport, folder)
        path = folder / "global-00003.safetensors"
        with _agent_log() as records:
            downloads.download(task, path, folder / "spare")
        assert sha256_file(path) == newest.sha256
        assert any("does not match its sha256" in r for r in records) == altered
        assert any("came as a delta" in r for r in records) != altered
        held = downloads.held()
        assert held is not None and held.round == 3 and sha256_file(held.path) == newest.sha256
        path.unlink()
        held.path.unlink()


@contextmanager
def _agent_log() -> Iterator[list[str]]:
    """The messages silo_agent/delta_downloads.py logs meanwhile."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("silo_agent.delta_downloads")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_a_silo_restarted_without_its_global_model_downloads_it_whole_and_continues(tmp_path: Path) -> None:
    coordinator = Coordinator(coordinator_settings(tmp_path / "coordinator"))
    coordinator.start()
    try:
        with (
            running_agents(coordinator, tmp_path / "silos", samples=(160, 96)) as agents,
            FedmekiClient(address(coordinator)) as client,
        ):
            job = client.submit_job(parse_job_spec(_spec("topk")))
            wait_until(lambda: client.get_job(job.id).current_round >= 1, 300, lambda: agents[1].output()[-3000:])
            agents[1].stop()
            lost = list((tmp_path / "silos" / "silo-1" / "jobs" / job.id).glob("held-global-*"))
            for path in lost:
                path.unlink()
            restarted_at = len(agents[1].output())
            agents[1].start()
            _finished(coordinator, client, agents, job.id)
            after = agents[1].output()[restarted_at:]
        assert lost  # it held a global model, which it lost
        assert "whole" in after and "no global model held here" in after
        newest = sha256_file(coordinator.artifacts.checkpoint_path(job.id, 3))
        for index in range(2):
            assert _held_sha256(tmp_path / "silos" / f"silo-{index}", job.id, 3) == newest
    finally:
        coordinator.stop(grace=0)


@pytest.mark.parametrize("encoding", ["float32", "bfloat16"])
def test_delta_downloads_need_a_lossy_encoding(encoding: str) -> None:
    with pytest.raises(InvalidJobSpecError, match="delta downloads need delta_encoding int8 or topk"):
        parse_job_spec(_spec(encoding))
