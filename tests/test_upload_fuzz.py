"""A seeded, structured fuzzer of UploadUpdate against a real coordinator (`tests/upload_cases.py` makes the cases).

Every case must be refused with its status, leave no update row and nothing under incoming/, and keep the
server's memory flat; after all of them, two honest uploads must still give exactly their FedAvg.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load, save
from sqlalchemy import func, select

from coordinator.server import Coordinator
from coordinator.store.models import Update
from fedmeki_core.proto.v1 import silo_pb2_grpc
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes
from tests.upload_cases import INT8_FIELDS, KINDS, TOPK_FIELDS, encoded_damage, make_case

SEED = 20240611
MEMORY_GROWTH_BOUND = 32 << 20  # resident memory after the warm-up may grow by less than this over the run


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _updates(coordinator: Coordinator) -> int:
    with coordinator.database.read() as session:
        return int(session.scalar(select(func.count()).select_from(Update)) or 0)


def _leftovers(coordinator: Coordinator) -> list[Path]:
    root = coordinator.artifacts.root
    return [p for p in (root / "incoming").rglob("*") if p.is_file()] + list((root / "updates").rglob("*.*"))


@pytest.mark.parametrize("count", [500, pytest.param(10_000, marks=[pytest.mark.slow, pytest.mark.timeout(1200)])])
def test_hostile_uploads_are_refused_and_change_nothing(coordinator: Coordinator, count: int) -> None:
    target = address(coordinator)
    silos = {name: RawSilo(target, enroll(coordinator, name)) for name in ("a", "b")}
    for silo in silos.values():
        assert silo.poll() is None
    initial = weights_bytes(seed=7)
    job = submit_raw(target, job_spec(min_silos=2, rounds=1, round_deadline_seconds=3600), initial)
    assert silos["a"].poll(wait=5) is not None
    rng = random.Random(SEED)
    seen: Counter[str] = Counter()
    warm_rss = 0
    with grpc.insecure_channel(target) as channel:
        stub = silo_pb2_grpc.SiloServiceStub(channel)
        for index in range(count):
            case = make_case(rng, job.id, 1)
            with pytest.raises(grpc.RpcError) as info:
                stub.UploadUpdate(iter(case.messages), metadata=silos["a"].metadata, timeout=30)
            error = info.value
            where = f"case {index} ({case.kind})"
            assert error.code() == case.code, f"{where}: {error.code()} {error.details()!r}"
            assert case.text in error.details(), f"{where}: {error.details()!r} lacks {case.text!r}"
            assert _updates(coordinator) == 0, f"{where} left an update row"
            assert not _leftovers(coordinator), f"{where} left files: {_leftovers(coordinator)}"
            seen[case.kind] += 1
            if index == count // 10:
                warm_rss = _rss()
    assert set(seen) == set(KINDS), f"kinds never drawn: {set(KINDS) - set(seen)}"
    assert _rss() - warm_rss < MEMORY_GROWTH_BOUND, f"resident memory grew by {(_rss() - warm_rss) >> 20} MiB"

    # The coordinator still serves, and the round's aggregate is exactly the honest updates' FedAvg.
    assert silos["b"].poll(wait=5) is not None
    silos["a"].upload(job.id, 1, save(tensors(0.25)), num_samples=10)
    silos["b"].upload(job.id, 1, save(tensors(1.0)), num_samples=30)
    give_up = time.monotonic() + 30
    while coordinator.scheduler.status(job.id).current_round != 1:
        assert time.monotonic() < give_up, "the round did not commit"
        time.sleep(0.02)
    checkpoint = load(coordinator.artifacts.checkpoint_path(job.id, 1).read_bytes())
    mean = np.float32((0.25 * 10 + 1.0 * 30) / 40)  # 0.8125: exact in float32 in either folding order
    for name, value in load(initial).items():
        np.testing.assert_array_equal(checkpoint[name], value + mean)


def test_hostile_encoded_uploads_are_refused_and_change_nothing(coordinator: Coordinator) -> None:
    """Random damage to int8 scales and values, topk indices and values, and their lengths, cut at random."""
    target = address(coordinator)
    silo = RawSilo(target, enroll(coordinator, "a"))
    assert silo.poll() is None
    jobs = {}
    for fields in (INT8_FIELDS, TOPK_FIELDS):
        jobs[fields["delta_encoding"]] = submit_raw(target, job_spec(rounds=1, **fields), weights_bytes(seed=1))
    assert silo.poll(wait=5) is not None
    rng = random.Random(SEED)
    for index in range(200):
        fields, arrays, text = encoded_damage(rng)
        job = jobs[fields["delta_encoding"]]
        chunk = rng.choice([1, 3, 8, 64, 1 << 20])
        with pytest.raises(grpc.RpcError) as info:
            silo.upload(job.id, 1, save(arrays), chunk=chunk)
        where = f"case {index} ({fields['delta_encoding']}, {text})"
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {info.value.details()!r}"
        assert text in info.value.details(), f"{where}: {info.value.details()!r}"
        assert _updates(coordinator) == 0, f"{where} left an update row"
        assert not _leftovers(coordinator), f"{where} left files"
