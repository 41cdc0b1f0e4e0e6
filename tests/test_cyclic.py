"""`privacy.secure_aggregation: cyclic` (PPPML-HMI's ring): the masked running sum passes silo to silo through a
real coordinator that only relays it; turns, restarts, the canary, and a whole job against plaintext FedAvg."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file
from sqlalchemy import select

from coordinator.cyclic import ring
from coordinator.server import Coordinator
from coordinator.store.models import Round, Update
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.privacy.he import (
    CkksContext,
    encrypt_file,
    generate_context,
    load_public_context,
    public_bytes,
    read_ciphertext_header,
    read_secret_context,
    write_key_files,
)
from fedmeki_core.privacy.he.aggregate import add_ciphertext_files
from fedmeki_core.privacy.he.ciphertexts import decrypt_mean
from fedmeki_core.privacy.he.cyclic import MASK_MAGNITUDE, add_to_running_sum, new_mask_seed, shift_by_mask
from fedmeki_core.proto.v1 import common_pb2, silo_pb2
from fedmeki_core.records import JobState, RoundState
from fedmeki_core.wire import TensorSpec
from silo_agent.transport import GrpcTransport
from tests.agents import TASK, describe_job, wait_until
from tests.conftest import address, coordinator_settings, enroll
from tests.in_process import in_process_agents
from tests.silo_wire import RawSilo, job_spec, submit_raw, weights_bytes
from tests.test_secure_aggregation import MANIFEST, _canary, _patterns, encrypted_canaries

RelayStep = silo_pb2.RelayStepResponse


@pytest.fixture(scope="module")
def secret() -> CkksContext:
    return generate_context()


def cyclic_spec(context: CkksContext, **fields: Any) -> common_pb2.JobSpec:
    privacy = common_pb2.PrivacySpec(secure_aggregation="cyclic", ckks_context_sha256=context.fingerprint)
    return job_spec(**{"min_silos": 3, "privacy": privacy, **fields})


def test_the_ring_starts_at_another_silo_every_round() -> None:
    silos = ["c", "a", "b"]
    assert [ring(silos, r) for r in (1, 2, 3, 4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_mask_add_unmask_gives_the_weighted_sum_of_tensors_larger_than_one_ciphertext(
    secret: CkksContext, tmp_path: Path
) -> None:
    """10,000 values a tensor (3 ciphertexts of 4096 slots); the masked running sums decrypt to noise."""
    public = load_public_context(public_bytes(secret))
    manifest = [TensorSpec("big", "F32", (100, 100)), TensorSpec("small", "F32", (3,))]
    rng = np.random.default_rng(1)
    deltas = [{s.name: rng.normal(0, 0.01, s.shape).astype(np.float32) for s in manifest} for _ in range(3)]
    weights = [100.0, 250.0, 50.0]
    own = []
    for i, delta in enumerate(deltas):
        own.append(tmp_path / f"own-{i}.ckks")
        encrypt_file(own[i], secret, manifest, (delta[s.name] for s in manifest), weights[i])
    seed = new_mask_seed()
    shift_by_mask(tmp_path / "hop-1", secret, own[0], manifest, seed, 1)
    add_to_running_sum(tmp_path / "hop-2", public, tmp_path / "hop-1", own[1], manifest)
    add_to_running_sum(tmp_path / "hop-3", public, tmp_path / "hop-2", own[2], manifest)
    shift_by_mask(tmp_path / "hop-4", secret, tmp_path / "hop-3", manifest, seed, -1)
    assert read_ciphertext_header(tmp_path / "hop-4").tensors[0].ciphertexts == 3

    def mean(hop: str) -> dict[str, np.ndarray]:
        add_ciphertext_files(tmp_path / f"{hop}.aggregate", public, [tmp_path / hop], manifest, sum(weights))
        return decrypt_mean(secret, tmp_path / f"{hop}.aggregate", manifest, 1e12)

    unmasked = mean("hop-4")
    for spec in manifest:
        expected = sum(w * d[spec.name].astype(np.float64) for w, d in zip(weights, deltas, strict=True))
        np.testing.assert_allclose(unmasked[spec.name], expected / sum(weights), rtol=0, atol=1e-7)
    # What a curious silo gets by decrypting the running sum it relays: the mask's scale (mean |M| is half of
    # MASK_MAGNITUDE), not the deltas' (about 1).
    masked = mean("hop-2")["big"] * sum(weights)
    assert MASK_MAGNITUDE / 3 < np.abs(masked).mean() < MASK_MAGNITUDE


def _step(silo: RawSilo, job_id: str) -> silo_pb2.RelayStepResponse:
    return silo.call("RelayStep", silo_pb2.RelayStepRequest(job_id=job_id, round=1))


def _download_hop(silo: RawSilo, job_id: str, hop: int, destination: Path) -> Path:
    messages = silo.call("DownloadModel", silo_pb2.DownloadModelRequest(job_id=job_id, round=1, relay_hop=hop))
    data = b"".join(m.chunk.data for m in messages[1:])
    assert hashlib.sha256(data).hexdigest() == messages[0].checkpoint.sha256
    destination.write_bytes(data)
    return destination


def _upload_hop(silo: RawSilo, job_id: str, path: Path, samples: int, hop: int) -> None:
    silo.upload(job_id, 1, path.read_bytes(), num_samples=samples, chunk=1 << 16, encoding="ckks", relay_hop=hop)


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_the_coordinator_relays_the_ring_in_turn_across_a_restart_and_never_holds_a_plaintext(
    database_url: str, secret: CkksContext, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = coordinator_settings(tmp_path / "coordinator", database_url)
    coordinator = Coordinator(settings)
    coordinator.start()
    try:
        credentials = [enroll(coordinator, f"hospital-{i}") for i in range(3)]
        silos = [RawSilo(address(coordinator), credential) for credential in credentials]
        for silo in silos:
            silo.poll()
        job = submit_raw(
            address(coordinator), cyclic_spec(secret), weights_bytes(), ckks_public_context=public_bytes(secret)
        )
        for silo in silos:
            assert silo.poll(wait=5) is not None
        steps = [_step(silo, job.id) for silo in silos]
        order = sorted(range(3), key=lambda i: steps[i].position)  # silos[order[p]] is at place p of the ring
        assert [steps[i].position for i in order] == [0, 1, 2] and {s.silos for s in steps} == {3}
        assert [steps[i].action for i in order] == [RelayStep.START, RelayStep.WAIT, RelayStep.WAIT]

        samples = [10, 20, 30]
        _, own = encrypted_canaries(secret, samples, tmp_path)
        first, second, third = (silos[i] for i in order)

        # Out of turn, or without naming the hop: refused, and the ring goes on.
        assert (
            _code(lambda: _upload_hop(second, job.id, own[order[1]], 20, 2))[0] == grpc.StatusCode.FAILED_PRECONDITION
        )
        assert _code(lambda: _upload_hop(first, job.id, own[order[0]], 10, 0))[0] == grpc.StatusCode.INVALID_ARGUMENT
        seed = new_mask_seed()
        shift_by_mask(tmp_path / "hop-1", secret, own[order[0]], MANIFEST, seed, 1)
        _upload_hop(first, job.id, tmp_path / "hop-1", samples[order[0]], 1)
        assert _step(second, job.id).action == RelayStep.ADD and _step(first, job.id).action == RelayStep.WAIT
        status, details = _code(lambda: _download_hop(third, job.id, 1, tmp_path / "stolen"))
        assert status == grpc.StatusCode.FAILED_PRECONDITION and "not silo" in details
        running = _download_hop(second, job.id, 1, tmp_path / "running-1")
    finally:
        coordinator.stop(grace=0)

    # A restart mid-ring: the hops so far are in the database; the ring carries on where it was.
    coordinator = Coordinator(settings)
    coordinator.start()
    try:
        first, second, third = (RawSilo(address(coordinator), credentials[i]) for i in order)
        add_to_running_sum(tmp_path / "hop-2", secret, running, own[order[1]], MANIFEST)
        _upload_hop(second, job.id, tmp_path / "hop-2", samples[order[1]], 2)
        # Sent again (its receipt lost): the same bytes are an idempotent success, other bytes ALREADY_EXISTS.
        _upload_hop(second, job.id, tmp_path / "hop-2", samples[order[1]], 2)
        status, _ = _code(lambda: _upload_hop(second, job.id, tmp_path / "hop-1", samples[order[1]], 2))
        assert status == grpc.StatusCode.ALREADY_EXISTS
        step = _step(third, job.id)
        assert (step.action, step.hop) == (RelayStep.ADD, 3)
        running = _download_hop(third, job.id, 2, tmp_path / "running-2")
        add_to_running_sum(tmp_path / "hop-3", secret, running, own[order[2]], MANIFEST)
        _upload_hop(third, job.id, tmp_path / "hop-3", samples[order[2]], 3)
        step = _step(first, job.id)
        assert (step.action, step.hop) == (RelayStep.UNMASK, 4)
        running = _download_hop(first, job.id, 3, tmp_path / "running-3")
        shift_by_mask(tmp_path / "hop-4", secret, running, MANIFEST, seed, -1)
        _upload_hop(first, job.id, tmp_path / "hop-4", samples[order[0]], 4)
        wait_until(
            lambda: coordinator.scheduler.status(job.id).current_round == 1,
            30,
            lambda: describe_job(coordinator.scheduler.status(job.id)),
        )
        assert {_step(silo, job.id).action for silo in (first, second, third)} == {RelayStep.DONE}
        _, aggregate = coordinator.scheduler.checkpoint_for(job.id, 1, None)
        files = [path for path in coordinator.artifacts.root.rglob("*") if path.is_file()]
    finally:
        coordinator.stop(grace=0)

    assert read_ciphertext_header(aggregate).total_weight == sum(samples)
    mean = decrypt_mean(secret, aggregate, MANIFEST, 1e6)
    expected = sum(n * _canary(i) for i, n in enumerate(samples)) / sum(samples)
    for spec in MANIFEST:
        assert np.abs(mean[spec.name] - expected).max() < 1e-6
    # The canary: no silo's delta, weighted delta, partial sum or the mean in any file or log line of the coordinator.
    weighted = [n * _canary(i) for i, n in enumerate(samples)]
    partials = [sum(weighted[i] for i in order[:p]) for p in (2, 3)]
    patterns = [
        p for value in [_canary(i) for i in range(3)] + weighted + partials + [expected] for p in _patterns(value)
    ]
    for path in files:
        data = path.read_bytes()
        assert not [p for p in patterns if p in data], path
    logged = "\n".join(record.getMessage() for record in caplog.records).encode()
    assert logged and not [p for p in patterns if p in logged]


def _robust(method: str) -> common_pb2.AlgorithmSpec:
    message = common_pb2.AlgorithmSpec(name="fedavg")
    message.options.update({"robust": {"method": method}})
    return message


def test_a_silo_that_drops_out_of_the_ring_fails_the_round_at_its_deadline_naming_it(
    sqlite_coordinator: Coordinator, secret: CkksContext, tmp_path: Path
) -> None:
    """The ring cannot close without every selected silo: at the deadline the round and the job fail."""
    coordinator = sqlite_coordinator
    silos = [RawSilo(address(coordinator), enroll(coordinator, f"hospital-{i}")) for i in range(3)]
    for silo in silos:
        silo.poll()
    spec = cyclic_spec(secret, round_deadline_seconds=3)
    job = submit_raw(address(coordinator), spec, weights_bytes(), ckks_public_context=public_bytes(secret))
    for silo in silos:
        assert silo.poll(wait=5) is not None
    first = next(silo for silo in silos if _step(silo, job.id).position == 0)
    own = tmp_path / "own.ckks"
    encrypt_file(own, secret, MANIFEST, (np.ones(spec.shape, np.float32) for spec in MANIFEST), 10)
    shift_by_mask(tmp_path / "hop-1", secret, own, MANIFEST, new_mask_seed(), 1)
    _upload_hop(first, job.id, tmp_path / "hop-1", 10, 1)  # and the silo at place 1 never adds to it
    wait_until(
        lambda: coordinator.scheduler.status(job.id).state.finished,
        30,
        lambda: describe_job(coordinator.scheduler.status(job.id)),
    )
    status = coordinator.scheduler.status(job.id)
    assert status.state == JobState.FAILED and status.rounds[0].state == RoundState.FAILED
    assert "ring stopped at hop 1 of 4" in status.reason and "never uploaded hop 2" in status.reason, status.reason
    code, details = _code(lambda: _step(first, job.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "failed" in details


@pytest.mark.parametrize(
    ("fields", "code", "names"),
    [
        ({"min_silos": 2}, grpc.StatusCode.INVALID_ARGUMENT, "min_silos"),
        (
            {"algorithm": common_pb2.AlgorithmSpec(name="fedadam")},
            grpc.StatusCode.FAILED_PRECONDITION,
            "algorithm.name",
        ),
        ({"algorithm": _robust("median")}, grpc.StatusCode.FAILED_PRECONDITION, "algorithm.options.robust"),
    ],
)
def test_a_cyclic_job_is_refused_when_the_server_step_is_not_a_sum(
    sqlite_coordinator: Coordinator, secret: CkksContext, fields: dict[str, Any], code: grpc.StatusCode, names: str
) -> None:
    for name in ("h1", "h2", "h3"):
        enroll(sqlite_coordinator, name)
    with pytest.raises(grpc.RpcError) as caught:
        submit_raw(
            address(sqlite_coordinator),
            cyclic_spec(secret, **fields),
            weights_bytes(),
            ckks_public_context=public_bytes(secret),
        )
    assert caught.value.code() == code and names in caught.value.details() and "cyclic" in caught.value.details()


class ReceiptsLost(GrpcTransport):
    """The network's edge: every upload's receipt is lost, so the agent sends it again and hears ALREADY_EXISTS."""

    def __init__(self, index: int, address: str, credential: str) -> None:
        super().__init__(address, credential)

    def upload(self, *args: Any, **kwargs: Any) -> None:
        super().upload(*args, **kwargs)
        super().upload(*args, **kwargs)


def test_cyclic_jobs_run_with_real_agents_and_rotate_their_initiator(tmp_path: Path) -> None:
    """3 real agents (in this process, each on its own thread: the ring needs them working at once) over loopback
    gRPC, in two cyclic jobs at once (a silo waiting for its turn in one ring serves the other meanwhile), every
    upload's receipt lost (the resent hop is ALREADY_EXISTS and the ring goes on). Every
    silo rebuilds the same model a hospital gets with the key (the equality with plaintext FedAvg is checked with
    agent processes in tests/test_secure_aggregation.py: threads share torch's global state)."""
    keys = tmp_path / "keys"
    write_key_files(keys)
    coordinator = Coordinator(coordinator_settings(tmp_path / "coordinator"))
    coordinator.start()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        settings = {"ckks_secret_context": keys / "secret.ckks"}
        agents = in_process_agents(
            coordinator, tmp_path / "silos", TASK, 120, settings=settings, transport=ReceiptsLost
        )
        threads = [threading.Thread(target=agent.run, args=(stop,), daemon=True) for agent in agents]
        for thread in threads:
            thread.start()
        spec = parse_job_spec(
            {
                "name": "cyclic",
                "task": TASK,
                "rounds": 2,
                "min_silos": 3,
                "round_deadline_seconds": 120,
                "algorithm": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.003},
                "privacy": {"secure_aggregation": "cyclic"},
            }
        )
        with FedmekiClient(address(coordinator)) as client:
            job, other = (client.submit_job(spec, ckks_public_context=keys / "public.ckks") for _ in range(2))
            wait_until(
                lambda: client.get_job(job.id).state.finished and client.get_job(other.id).state.finished,
                240,
                lambda: describe_job(client.get_job(job.id)) + "\n" + describe_job(client.get_job(other.id)),
            )
            final = client.get_job(job.id)
            assert client.get_job(other.id).state == JobState.COMPLETED, describe_job(client.get_job(other.id))
            secret = read_secret_context(keys / "secret.ckks")
            assert client.download_decrypted(job.id, secret, tmp_path / "cyclic.safetensors") == 2
        with coordinator.database.read() as session:  # the order each round's hops arrived in
            rounds = session.scalars(select(Round).where(Round.job_id == job.id, Round.kind == "train")).all()
            selected = {r.number: list(r.selected) for r in rounds}
            arrivals = {
                number: list(
                    session.scalars(
                        select(Update.silo_id)
                        .where(Update.job_id == job.id, Update.round_number == number)
                        .order_by(Update.id)
                    )
                )
                for number in selected
            }
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        coordinator.stop(grace=0)

    assert final.state == JobState.COMPLETED, describe_job(final)
    assert [r.state for r in final.rounds] == [RoundState.COMMITTED] * 3
    rebuilt = (tmp_path / "cyclic.safetensors").read_bytes()
    for index in range(3):  # the evaluation round started from the model of round 2, rebuilt at each silo
        assert (
            tmp_path / "silos" / f"silo-{index}" / "ckks" / job.id / "model-00002.safetensors"
        ).read_bytes() == rebuilt
        assert not list((tmp_path / "silos" / f"silo-{index}" / "ckks" / job.id).glob("mask-*"))  # seeds dropped
    initial = load_file(str(coordinator.artifacts.checkpoint_path(job.id, 0)))
    model = load_file(str(tmp_path / "cyclic.safetensors"))
    assert any(not np.allclose(model[name], initial[name]) for name in model)  # training happened
    assert all(np.isfinite(value).all() for value in model.values())
    # Each round's hops arrived in its ring's order, and the ring started at another silo in round 2.
    assert arrivals == {number: ring(selected[number], number) for number in (1, 2)}
    assert arrivals[1][0] != arrivals[2][0]
    kept = sorted(p.name for p in (coordinator.artifacts.root / "checkpoints" / job.id).iterdir())
    assert kept == ["public.ckks", "round-00000.safetensors", "round-00001.ckks", "round-00002.ckks"]
    assert not list((coordinator.artifacts.root / "updates").rglob("*.ckks"))  # hops dropped once committed
