"""Resource budgets set by the hospital: silo.yaml bounds the parameters, checkpoint bytes and device memory a job
may ask of a silo; the agent builds the job's model on the meta device, compares it with the checkpoint's manifest
and the budget, and declines the round with one reason line before it downloads or allocates anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from coordinator.server import Coordinator
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_job_model, initial_tensors, meta_model
from fedmeki_core.records import JobState, JobStatus
from silo_agent.resources import Footprint
from silo_agent.settings import SiloSettings
from tests.conftest import address, wait_until
from tests.in_process import in_process_agents

TASK = "synthetic-vitals"
# The largest tiny-transformer the job spec's bounds allow under its 2e9-parameter cap: 1.34e9 parameters (5.4 GB).
HUGE = {"hidden_size": 8192, "num_layers": 1, "num_heads": 64, "intermediate_size": 65536}


def _kib(field: str) -> int:
    """One of /proc/self/status's memory figures, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _declined(
    coordinator: Coordinator, tmp_path: Path, config: dict[str, Any], weights: dict[str, np.ndarray], **budget: int
) -> tuple[JobStatus, int]:
    """Submit a job with `weights` (unchecked by the client, as a raw gRPC submission is) to one silo agent with
    `budget` in its settings; step the agent once. The job's end, and how far the agent's peak RSS rose (bytes)."""
    (agent,) = in_process_agents(coordinator, tmp_path, TASK, 40, silos=1, settings=dict(budget))
    spec = parse_job_spec({"name": "big", "task": TASK, "rounds": 1, "model": {"config": config}})
    path = tmp_path / "weights.safetensors"
    save_file(weights, str(path))
    with FedmekiClient(address(coordinator)) as client:
        job = client.submit_job(spec, weights=path, check_model=False)
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from here
        before = _kib("VmRSS")
        assert agent.run_once() is not None
        grown = (_kib("VmHWM") - before) * 1024
        wait_until(lambda: client.get_job(job.id).state.finished)
        return client.get_job(job.id), grown


def test_the_largest_model_the_bounds_allow_with_tiny_weights_is_declined_before_anything_is_allocated(
    sqlite_coordinator: Coordinator, tmp_path: Path
) -> None:
    spec = parse_job_spec({"name": "big", "task": TASK, "rounds": 1, "model": {"config": HUGE}})
    footprint = Footprint.of(meta_model(spec))
    assert footprint.parameters > 1_300_000_000  # 5.4 GB of float32 weights, more to train
    status, grown = _declined(sqlite_coordinator, tmp_path, HUGE, {"w": np.zeros(17, np.float32)})
    assert status.state == JobState.FAILED
    assert status.reason == (
        f"silo 'silo-0' aborted round 1: the job's tiny-transformer has {footprint.parameters:,} parameters, "
        "over this silo's max_parameters (500,000,000)"
    )
    assert grown < footprint.parameters * 4 // 20, grown  # not the model: under a twentieth of its weights


def test_a_checkpoint_unlike_the_jobs_model_is_declined_naming_the_tensor(
    sqlite_coordinator: Coordinator, tmp_path: Path
) -> None:
    spec = parse_job_spec({"name": "w", "task": TASK, "rounds": 1})
    good = {name: tensor.numpy() for name, tensor in initial_tensors(spec, build_job_model(spec)).items()}
    reshaped = {**good, "head.bias": np.zeros(7, np.float32)}
    status, _ = _declined(sqlite_coordinator, tmp_path, {}, reshaped)
    assert status.state == JobState.FAILED
    assert status.reason == (
        "silo 'silo-0' aborted round 1: the job's checkpoint does not match its model: tensor 'head.bias' has "
        "shape [7], the spec's model has [2]"
    )


@pytest.mark.parametrize(
    ("budget", "text"),
    [
        ({"max_parameters": 1000}, "has 18,082 parameters, over this silo's max_parameters (1,000)"),
        (
            {"max_checkpoint_bytes": 1024},
            "checkpoint of 72,072 bytes is over this silo's max_checkpoint_bytes (1,024 bytes)",
        ),
        ({"max_device_memory_bytes": 65536}, "to train (weights, gradients, optimiser state), over this silo's"),
    ],
)
def test_each_budget_of_silo_yaml_declines_a_job_over_it(
    sqlite_coordinator: Coordinator, tmp_path: Path, budget: dict[str, int], text: str
) -> None:
    spec = parse_job_spec({"name": "w", "task": TASK, "rounds": 1})
    good = {name: tensor.numpy() for name, tensor in initial_tensors(spec, build_job_model(spec)).items()}
    status, _ = _declined(sqlite_coordinator, tmp_path, {}, good, **budget)
    assert status.state == JobState.FAILED and text in status.reason, status.reason


def test_the_footprint_of_a_meta_model_is_that_of_the_built_one() -> None:
    spec = parse_job_spec(
        {"name": "w", "task": "fedmeki", "rounds": 1, "model": {"architecture": "fedmeki-encoders-tiny"}}
    )
    built, meta = build_job_model(spec), meta_model(spec)
    assert all(tensor.is_meta for tensor in meta.state_dict().values())
    footprint = Footprint.of(meta)
    assert footprint.parameters == sum(parameter.numel() for parameter in built.parameters())
    trained = sum(p.numel() for p in built.parameters() if p.requires_grad)
    weights = sum(t.numel() * t.element_size() for t in [*built.parameters(), *built.buffers()])
    assert footprint.device_bytes == weights + trained * 3 * torch.tensor(0.0).element_size()


def test_a_budget_that_is_not_a_positive_integer_is_refused_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "silo.yaml"
    for value in ("0", "1.5e9", "-1", "inf"):
        config.write_text(f"max_device_memory_bytes: {value}\n")
        with pytest.raises(InvalidInputError, match="max_device_memory_bytes"):
            SiloSettings.from_yaml(config)
    config.write_text("max_device_memory_bytes: 8589934592\n")
    assert SiloSettings.from_yaml(config).max_device_memory_bytes == 8 << 30
