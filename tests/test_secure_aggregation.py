"""`privacy.secure_aggregation: ckks` through the real coordinator: submission rules, ciphertext uploads, the
encrypted sum, a canary that must appear nowhere on the coordinator, and a whole job against plaintext FedAvg."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file, save

from coordinator.server import Coordinator
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import InvalidJobSpecError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.privacy.he import (
    CkksContext,
    encrypt_file,
    generate_context,
    public_bytes,
    read_ciphertext_header,
    read_secret_context,
    write_key_files,
)
from fedmeki_core.privacy.he.ciphertexts import decrypt_mean
from fedmeki_core.privacy.he.encoding import EncryptedTensor, metadata
from fedmeki_core.privacy.he.keys import secret_bytes
from fedmeki_core.proto.v1 import common_pb2, silo_pb2
from fedmeki_core.records import JobState, RoundState
from fedmeki_core.wire import TensorSpec, safetensors_header
from tests.agents import AGENTS_SEEN_SECONDS, TASK, describe_job, running_agents, wait_until
from tests.conftest import address, coordinator_settings, enroll
from tests.in_process import in_process_agents
from tests.silo_wire import RawSilo, job_spec, submit_raw, weights_bytes

MANIFEST = [TensorSpec("a", "F32", (4, 3)), TensorSpec("b", "F32", (5,))]  # tests/silo_wire.py's model


@pytest.fixture(scope="module")
def secret() -> CkksContext:
    return generate_context()


def ckks_spec(context: CkksContext, **fields: Any) -> common_pb2.JobSpec:
    privacy = common_pb2.PrivacySpec(secure_aggregation="ckks", ckks_context_sha256=context.fingerprint)
    values: dict[str, Any] = {"min_silos": 3, "privacy": privacy}
    values.update(fields)
    return job_spec(**values)


def submit_code(coordinator: Coordinator, spec: common_pb2.JobSpec, context: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        submit_raw(address(coordinator), spec, weights_bytes(), chunk=1 << 16, ckks_public_context=context)
    return caught.value.code(), caught.value.details()


def _algorithm(name: str, **options: float) -> common_pb2.AlgorithmSpec:
    message = common_pb2.AlgorithmSpec(name=name)
    message.options.update(options)
    return message


CENTRAL_DP = common_pb2.DifferentialPrivacy(mode="central", clip_norm=1.0, noise_multiplier=1.0)


@pytest.mark.parametrize(
    ("fields", "dp", "context", "code", "names"),
    [
        ({"min_silos": 2}, None, "public", grpc.StatusCode.INVALID_ARGUMENT, "min_silos"),
        ({"algorithm": _algorithm("fedadam")}, None, "public", grpc.StatusCode.FAILED_PRECONDITION, "algorithm.name"),
        (
            {"algorithm": _algorithm("fedavg", server_learning_rate=0.5)},
            None,
            "public",
            grpc.StatusCode.FAILED_PRECONDITION,
            "algorithm.options.server_learning_rate",
        ),
        ({}, CENTRAL_DP, "public", grpc.StatusCode.FAILED_PRECONDITION, "privacy.dp.mode"),
        ({}, None, "none", grpc.StatusCode.INVALID_ARGUMENT, "privacy.secure_aggregation"),
        ({}, None, "secret", grpc.StatusCode.INVALID_ARGUMENT, "holds a secret key"),
        ({}, None, "stranger", grpc.StatusCode.INVALID_ARGUMENT, "privacy.ckks_context_sha256"),
    ],
)
def test_a_ckks_job_is_refused_when_the_coordinator_would_need_plaintext_or_the_key(
    sqlite_coordinator: Coordinator,
    secret: CkksContext,
    fields: dict[str, Any],
    dp: common_pb2.DifferentialPrivacy | None,
    context: str,
    code: grpc.StatusCode,
    names: str,
) -> None:
    for name in ("h1", "h2", "h3"):
        enroll(sqlite_coordinator, name)
    spec = ckks_spec(secret, **fields)
    if dp is not None:
        spec.privacy.dp.CopyFrom(dp)
    sent = {
        "public": public_bytes(secret),
        "none": b"",
        "secret": secret_bytes(secret),
        "stranger": public_bytes(generate_context()),
    }[context]
    status, details = submit_code(sqlite_coordinator, spec, sent)
    assert status == code and names in details, details
    assert not list((sqlite_coordinator.artifacts.root / "checkpoints").rglob("public.ckks"))


def test_a_plaintext_job_takes_no_public_context(sqlite_coordinator: Coordinator, secret: CkksContext) -> None:
    status, details = submit_code(sqlite_coordinator, job_spec(), public_bytes(secret))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "not ckks" in details


def _canary(index: int) -> float:
    return 1234.56789 + 11.125 * index  # distinctive bit patterns in float32 and float64


def _patterns(value: float) -> list[bytes]:
    """How a plaintext value would show up in a file or a log: float32 and float64 runs, or as text."""
    return [struct.pack("<f", value) * 4, struct.pack("<d", value) * 2, f"{value:.4f}".encode()]


def encrypted_canaries(
    context: CkksContext, samples: list[int], directory: Path
) -> tuple[list[dict[str, np.ndarray]], list[Path]]:
    """Silo i's delta, every value `_canary(i)`, and its encryption times `samples[i]` (directory/update-i.ckks)."""
    deltas = [
        {spec.name: np.full(spec.shape, _canary(i), np.float32) for spec in MANIFEST} for i in range(len(samples))
    ]
    updates = [directory / f"update-{i}.ckks" for i in range(len(samples))]
    for path, delta, weight in zip(updates, deltas, samples, strict=True):
        encrypt_file(path, context, MANIFEST, (delta[spec.name] for spec in MANIFEST), weight)
    return deltas, updates


def _upload(silo: RawSilo, job_id: str, path: Path, samples: int, **header: object) -> None:
    silo.upload(job_id, 1, path.read_bytes(), num_samples=samples, chunk=1 << 16, **{"encoding": "ckks", **header})


def _file_with_empty_ciphertext(path: Path, context: CkksContext) -> Path:
    tensors = [EncryptedTensor.of(spec) for spec in MANIFEST]
    blobs = [TensorSpec("a/0", "U8", (0,)), TensorSpec("b/0", "U8", (0,))]
    path.write_bytes(safetensors_header(blobs, metadata(tensors, context.fingerprint)))
    return path


def test_the_coordinator_adds_ciphertexts_and_never_holds_a_plaintext(
    sqlite_coordinator: Coordinator, secret: CkksContext, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    coordinator = sqlite_coordinator
    silos = [RawSilo(address(coordinator), enroll(coordinator, f"hospital-{i}")) for i in range(3)]
    for silo in silos:
        silo.poll()  # alive: the round selects the three
    job = submit_raw(address(coordinator), ckks_spec(secret), weights_bytes(), ckks_public_context=public_bytes(secret))
    for silo in silos:
        assert silo.poll(wait=5) is not None
    public = coordinator.scheduler.ckks_context(job.id)
    assert public is not None and not public.is_secret and public.fingerprint == secret.fingerprint

    samples = [10, 20, 30]
    deltas, updates = encrypted_canaries(secret, samples, tmp_path)

    refusals = [  # each a precise INVALID_ARGUMENT, and the round goes on
        ({"encoding": "safetensors"}, updates[0], "takes updates encoded as 'ckks'"),
        ({}, _foreign_update(tmp_path), "made under CKKS context"),
        ({}, _file_with_empty_ciphertext(tmp_path / "empty.ckks", secret), "is empty (0 bytes)"),
    ]
    for header, path, message in refusals:
        with pytest.raises(grpc.RpcError) as caught:
            _upload(silos[0], job.id, path, samples[0], **header)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
    for silo, path, n in zip(silos, updates, samples, strict=True):
        _upload(silo, job.id, path, n)

    wait_until(
        lambda: coordinator.scheduler.status(job.id).current_round == 1,
        30,
        lambda: describe_job(coordinator.scheduler.status(job.id)),
    )
    _, aggregate = coordinator.scheduler.checkpoint_for(job.id, 1, None)
    assert aggregate.suffix == ".ckks" and read_ciphertext_header(aggregate).total_weight == sum(samples)
    mean = decrypt_mean(secret, aggregate, MANIFEST, 1e6)
    expected = sum(n * _canary(i) for i, n in enumerate(samples)) / sum(samples)
    for spec in MANIFEST:
        assert np.abs(mean[spec.name] - expected).max() < 1e-6

    # The canary: no silo's plaintext delta, weighted delta or the plaintext mean in any file or log line.
    plaintexts = [_canary(i) for i in range(3)] + [n * _canary(i) for i, n in enumerate(samples)] + [expected]
    patterns = [pattern for value in plaintexts for pattern in _patterns(value)]
    assert _patterns(_canary(0))[0] in save(deltas[0])  # the scan would find a plaintext delta file
    files = [path for path in coordinator.artifacts.root.rglob("*") if path.is_file()]
    names = {path.name for path in files}
    assert {"coordinator.db", "public.ckks", "round-00000.safetensors", "round-00001.ckks"} <= names, names
    for path in files:
        data = path.read_bytes()
        assert not [p for p in patterns if p in data], path
    logged = "\n".join(record.getMessage() for record in caplog.records).encode()
    assert logged and not [p for p in patterns if p in logged]


def _foreign_update(tmp_path: Path) -> Path:
    stranger = generate_context()
    path = tmp_path / "foreign.ckks"
    encrypt_file(path, stranger, MANIFEST, (np.zeros(spec.shape, np.float32) for spec in MANIFEST), 1.0)
    return path


@pytest.mark.parametrize("mode", ["ckks", pytest.param("cyclic", marks=pytest.mark.slow)])
def test_a_ckks_job_ends_with_the_model_plaintext_fedavg_makes(tmp_path: Path, mode: str) -> None:
    """3 real agents on loopback: the same job in the clear and under CKKS (star or ring), with the same seeds."""
    keys = tmp_path / "keys"
    write_key_files(keys)
    coordinator = Coordinator(coordinator_settings(tmp_path / "coordinator"))
    coordinator.start()
    try:
        spec = {
            "task": TASK,
            "rounds": 2,
            "min_silos": 3,
            "round_deadline_seconds": 120,
            "seed": 5,
            "algorithm": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.003},
        }
        plain_spec = parse_job_spec({"name": "plain", **spec})
        ckks = parse_job_spec({"name": mode, **spec, "privacy": {"secure_aggregation": mode}})
        settings = {"ckks_secret_context": str(keys / "secret.ckks")}
        with (
            running_agents(coordinator, tmp_path / "silos", (160, 96, 128), settings=settings) as agents,
            FedmekiClient(address(coordinator)) as client,
        ):
            wait_until(
                lambda: len([s for s in coordinator.registry.list() if s.last_seen_at]) == 3,
                AGENTS_SEEN_SECONDS,
                lambda: [a.output()[-2000:] for a in agents],
            )
            finals = []
            for job_spec_, context in ((plain_spec, None), (ckks, keys / "public.ckks")):
                job = client.submit_job(job_spec_, ckks_public_context=context)
                wait_until(
                    lambda job=job: client.get_job(job.id).state.finished,
                    240,
                    lambda job=job: (
                        describe_job(client.get_job(job.id)) + "\n".join(a.output()[-3000:] for a in agents)
                    ),
                )
                finals.append(client.get_job(job.id))
            plain, encrypted = finals
            client.download_checkpoint(plain.id, tmp_path / "plain.safetensors")
            assert (
                client.download_decrypted(
                    encrypted.id, read_secret_context(keys / "secret.ckks"), tmp_path / "ckks.safetensors"
                )
                == 2
            )
    finally:
        coordinator.stop(grace=0)

    for final in (plain, encrypted):
        assert final.state == JobState.COMPLETED, describe_job(final)
        assert [r.state for r in final.rounds] == [RoundState.COMMITTED] * 3
    expected = load_file(str(tmp_path / "plain.safetensors"))
    actual = load_file(str(tmp_path / "ckks.safetensors"))
    assert actual.keys() == expected.keys()
    moved = load_file(str(coordinator.artifacts.checkpoint_path(encrypted.id, 0)))
    assert any(not np.allclose(actual[name], moved[name]) for name in actual)  # training happened
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-5, err_msg=name)
    # What the coordinator kept for the CKKS job: plaintext only in checkpoint 0 (the submitted weights).
    kept = sorted(p.name for p in (coordinator.artifacts.root / "checkpoints" / encrypted.id).iterdir())
    assert kept == ["public.ckks", "round-00000.safetensors", "round-00001.ckks", "round-00002.ckks"]
    for number in (1, 2):
        header = read_ciphertext_header(coordinator.artifacts.root / "checkpoints" / encrypted.id / kept[number + 1])
        # the star adds 3 uploads; the ring's sum arrives as one ciphertext file
        assert header.updates == (3 if mode == "ckks" else 1) and header.total_weight == sum(
            n - round(n * 0.2) for n in (160, 96, 128)
        )


def test_ckks_jobs_send_float32_deltas() -> None:
    with pytest.raises(InvalidJobSpecError, match="delta_encoding"):
        parse_job_spec(
            {
                "name": "x",
                "task": TASK,
                "rounds": 1,
                "min_silos": 3,
                "delta_encoding": "bfloat16",
                "privacy": {"secure_aggregation": "ckks"},
            }
        )


def test_keygen_writes_the_key_set_and_never_overwrites_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fedmeki_main(["he", "keygen", "--output", str(tmp_path / "keys")]) == 0
    secret = read_secret_context(tmp_path / "keys" / "secret.ckks")
    assert secret.fingerprint in capsys.readouterr().out
    assert (tmp_path / "keys" / "public.ckks").read_bytes() == public_bytes(secret)
    assert fedmeki_main(["he", "keygen", "--output", str(tmp_path / "keys")]) != 0
    assert read_secret_context(tmp_path / "keys" / "secret.ckks").fingerprint == secret.fingerprint


def test_a_silo_that_finds_the_aggregate_unusable_tells_the_coordinator_and_the_job_fails_with_its_reason(
    tmp_path: Path, sqlite_coordinator: Coordinator
) -> None:
    """Real agents (in this process, stepped in turn): round 1's mean delta is over the job's norm bound, so the
    first silo to rebuild the model for round 2 aborts it over AbortRound instead of only logging."""
    keys = tmp_path / "keys"
    write_key_files(keys)
    settings = {"ckks_secret_context": keys / "secret.ckks"}
    agents = in_process_agents(sqlite_coordinator, tmp_path / "silos", TASK, 60, settings=settings)
    spec = parse_job_spec(
        {
            "name": "bounded",
            "task": TASK,
            "rounds": 2,
            "min_silos": 3,
            "privacy": {"secure_aggregation": "ckks", "ckks_max_norm": 1e-9},
        }
    )
    with FedmekiClient(address(sqlite_coordinator)) as client:
        job = client.submit_job(spec, ckks_public_context=keys / "public.ckks")
        for _ in range(20):
            if client.get_job(job.id).state.finished:
                break
            for agent in agents:
                agent.run_once()
        final = client.get_job(job.id)
    assert final.state == JobState.FAILED, describe_job(final)
    assert [(r.number, r.state) for r in final.rounds] == [(1, RoundState.COMMITTED), (2, RoundState.FAILED)]
    assert "aborted round 2: the decrypted aggregate has L2 norm" in final.reason, final.reason
    assert "above the bound 1e-09" in final.reason


def test_only_a_silo_of_a_job_s_open_round_may_abort_it(sqlite_coordinator: Coordinator) -> None:
    """Any job's round (a silo declines over its privacy budget as over a CKKS aggregate), but only the open one."""
    silos = [RawSilo(address(sqlite_coordinator), enroll(sqlite_coordinator, f"h{i}")) for i in range(3)]
    for silo in silos:
        silo.poll()
    job = submit_raw(address(sqlite_coordinator), job_spec(min_silos=3), weights_bytes())
    assert silos[0].poll(wait=5) is not None
    for job_id, round_number in ((job.id, 2), ("no-such-job", 1)):
        with pytest.raises(grpc.RpcError) as caught:
            silos[0].call("AbortRound", silo_pb2.AbortRoundRequest(job_id=job_id, round=round_number, reason="no"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert sqlite_coordinator.scheduler.status(job.id).state == JobState.RUNNING
    silos[0].call("AbortRound", silo_pb2.AbortRoundRequest(job_id=job.id, round=1, reason="over budget"))
    status = sqlite_coordinator.scheduler.status(job.id)
    assert status.state == JobState.FAILED and status.reason == "silo 'h0' aborted round 1: over budget"
    with pytest.raises(grpc.RpcError) as again:  # the job has ended: nothing is open to abort
        silos[1].call("AbortRound", silo_pb2.AbortRoundRequest(job_id=job.id, round=1, reason="no"))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no open round" in again.value.details()
