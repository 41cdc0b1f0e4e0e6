"""Differential privacy: clipping bounds every update, the noise has the promised scale, epsilon is accounted."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load, save
from safetensors.torch import load_file, save_file

from coordinator.server import Coordinator
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_model, exchanged_tensors
from fedmeki_core.privacy.dp import clip_factor, gaussian_epsilon
from fedmeki_core.proto.v1 import common_pb2
from fedmeki_core.records import CheckpointInfo, RoundKind, RoundTask
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.synthetic_vitals import generate
from fedmeki_core.wire import TensorSpec
from silo_agent.trainer import LocalTrainer, resolve_device
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo, job_spec, submit_raw

SIDE = 1000  # one 1000 x 1000 tensor: 10^6 coordinates


def test_clip_factor_and_the_accountant_against_hand_values() -> None:
    assert clip_factor(0.5, 1.0) == 1.0 and clip_factor(0.0, 1.0) == 1.0
    assert clip_factor(4.0, 1.0) == 0.25
    # One release at noise multiplier 1, delta 1e-5: the continuous optimum alpha = 1 + sqrt(2 ln 1e5) gives
    # alpha / 2 + ln(1e5) / (alpha - 1) = 5.2985; a grid of orders can only be a little above it.
    assert 5.2985 <= gaussian_epsilon(1.0, 1, 1e-5) <= 5.31
    assert gaussian_epsilon(2.0, 1, 1e-5) < gaussian_epsilon(1.0, 1, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5)
    assert math.isinf(gaussian_epsilon(0.0, 1, 1e-5))


def _dp_job(coordinator: Coordinator, clip: float, z: float, silos: int = 2) -> tuple[str, list[RawSilo], bytes]:
    raw = [RawSilo(address(coordinator), enroll(coordinator, f"s{i}")) for i in range(silos)]
    for silo in raw:
        silo.poll()
    weights = save({"w": np.zeros((SIDE, SIDE), np.float32)})
    dp = common_pb2.DifferentialPrivacy(mode="central", clip_norm=clip, noise_multiplier=z, delta=1e-5)
    job = submit_raw(
        address(coordinator), job_spec(min_silos=silos, privacy=common_pb2.PrivacySpec(dp=dp)), weights, chunk=1 << 20
    )
    for silo in raw:
        assert silo.poll(wait=5) is not None
    return job.id, raw, weights


def _committed_delta(coordinator: Coordinator, job_id: str) -> np.ndarray:
    give_up = time.monotonic() + 20
    while coordinator.scheduler.status(job_id).current_round < 1:
        assert time.monotonic() < give_up, coordinator.scheduler.status(job_id)
        time.sleep(0.05)
    return load(coordinator.artifacts.checkpoint_path(job_id, 1).read_bytes())["w"]


def test_central_noise_has_std_z_clip_over_m(sqlite_coordinator: Coordinator) -> None:
    job_id, silos, _ = _dp_job(sqlite_coordinator, clip=1.0, z=0.5)
    zeros = save({"w": np.zeros((SIDE, SIDE), np.float32)})
    for silo in silos:
        silo.upload(job_id, 1, zeros, num_samples=10, chunk=1 << 20)
    noise = _committed_delta(sqlite_coordinator, job_id)
    expected = 0.5 * 1.0 / 2
    assert abs(float(noise.std()) / expected - 1) < 0.02
    assert abs(float(noise.mean())) < 0.01 * expected
    metrics = sqlite_coordinator.scheduler.status(job_id).rounds[0].metrics
    assert metrics["dp_epsilon"] == pytest.approx(gaussian_epsilon(0.5, 1, 1e-5))


def test_central_clipping_bounds_each_update_and_averages_uniformly(sqlite_coordinator: Coordinator) -> None:
    job_id, (big, small), _ = _dp_job(sqlite_coordinator, clip=1.0, z=0.0)
    big.upload(job_id, 1, save({"w": np.full((SIDE, SIDE), 3.0, np.float32)}), num_samples=1000, chunk=1 << 20)
    small.upload(job_id, 1, save({"w": np.full((SIDE, SIDE), -0.0005, np.float32)}), num_samples=1, chunk=1 << 20)
    result = _committed_delta(sqlite_coordinator, job_id)
    # big (norm 3000) is clipped to norm 1: 0.001 per coordinate; small (norm 0.5) passes; uniform mean.
    np.testing.assert_allclose(result, (0.001 - 0.0005) / 2, rtol=1e-4)
    assert "dp_epsilon" not in sqlite_coordinator.scheduler.status(job_id).rounds[0].metrics  # no noise, no claim


def _local_dp_delta(tmp_path: Path, clip: float, z: float) -> dict[str, torch.Tensor]:
    spec = parse_job_spec(
        {
            "name": "ldp",
            "task": "synthetic-vitals",
            "rounds": 1,
            "seed": 1,
            "privacy": {"dp": {"mode": "local", "clip_norm": clip, "noise_multiplier": z}},
        }
    )
    data = tmp_path / "data.safetensors"
    save_dataset(generate(40, 0, 1, seed=4), data)
    tensors = exchanged_tensors(build_model(spec.model, spec.task, seed=spec.seed))
    checkpoint = tmp_path / "global.safetensors"
    save_file(tensors, str(checkpoint))
    manifest = [TensorSpec(name, "F32", tuple(t.shape)) for name, t in sorted(tensors.items())]
    info = CheckpointInfo("job", 0, checkpoint.stat().st_size, sha256_file(checkpoint))
    task = RoundTask("job", 1, RoundKind.TRAIN, spec, info, manifest, deadline_seconds=60)
    trainer = LocalTrainer(resolve_device("cpu"), {spec.task: data}, 0.2)
    result = trainer.train(task, checkpoint, tmp_path / "delta.safetensors")
    assert ("dp_epsilon" in result.metrics) == (z > 0)
    return load_file(str(result.delta_path))


def test_local_dp_clips_the_silos_delta_before_upload(tmp_path: Path) -> None:
    delta = _local_dp_delta(tmp_path, clip=0.01, z=0.0)
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in delta.values()))
    assert norm <= 0.01 * (1 + 1e-5)


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0])  # 1 alone would not tell z * clip from clip
def test_local_dp_noise_has_std_z_clip(tmp_path: Path, z: float) -> None:
    clip = 1e-6  # the clipped delta is then negligible next to noise of std z * clip
    delta = _local_dp_delta(tmp_path, clip=clip, z=z)
    values = torch.cat([t.reshape(-1) for t in delta.values()]).double()
    assert values.numel() > 10_000
    assert abs(float(values.std()) / (z * clip) - 1) < 0.03
