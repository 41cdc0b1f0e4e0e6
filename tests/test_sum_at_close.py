"""A round whose float64 sums would pass `running_sum_bytes` sums its updates at close, from their files: the same
bits as the running sum, whatever the arrival order, without taking a model-sized sum buffer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from coordinator.aggregation import RoundAccumulator
from coordinator.robust_round import NUMPY_DTYPES
from coordinator.sum_buffers import SumBuffers
from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.algorithms.robust import RobustAggregation
from fedmeki_core.encodings import DeltaEncoding, encoded_manifest
from fedmeki_core.wire import LOCAL_STEPS_KEY, UNTRAINED_KEY, TensorSpec

# "big" spans two of the fold's 2**20-value blocks; "wide" is float64
MANIFEST = [
    TensorSpec("big", "F32", (1100, 1000)),
    TensorSpec("small", "F32", (7,)),
    TensorSpec("wide", "F64", (40, 50)),
    TensorSpec("head", "F32", (4, 4)),
]
DTYPES = {"F32": np.float32, "F64": np.float64}
SILOS = ["s1", "s2", "s3", "s4"]
WEIGHTS = {"s1": 3.0, "s2": 1.0, "s3": 7.5, "s4": 2.0}


def _write(path: Path, rng: np.random.Generator, untrained: tuple[str, ...] = ()) -> Path:
    tensors = {
        spec.name: (rng.standard_normal(spec.shape) * 10.0 ** rng.integers(-3, 3)).astype(DTYPES[spec.dtype])
        for spec in MANIFEST
        if spec.name not in untrained
    }
    save_file(tensors, str(path), metadata={UNTRAINED_KEY: "\n".join(untrained), LOCAL_STEPS_KEY: "5"})
    return path


@pytest.fixture
def round_files(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    rng = np.random.default_rng(7)
    current = tmp_path / "current.safetensors"
    save_file({s.name: rng.standard_normal(s.shape).astype(DTYPES[s.dtype]) for s in MANIFEST}, str(current))
    updates = {silo: _write(tmp_path / f"{silo}.safetensors", rng) for silo in SILOS}
    updates["s3"] = _write(tmp_path / "s3-partial.safetensors", rng, untrained=("head",))  # its silo kept "head"
    return current, updates


def _next_checkpoint(
    accumulator: RoundAccumulator, arrivals: list[str], updates: dict[str, Path], current: Path
) -> dict[str, bytes]:
    for silo in arrivals:
        accumulator.offer(silo, updates[silo], WEIGHTS[silo])
    accumulator.close()
    fedavg = get_algorithm("fedavg")
    server = fedavg.server(fedavg.resolve_options({"server_learning_rate": 0.7}))
    order, steps = accumulator.next_global(current, server, {})
    return {spec.name: new.tobytes() for spec, (_, new) in zip(order, steps, strict=True)}


@pytest.mark.parametrize("robust", [RobustAggregation(), RobustAggregation("clip", clip_norm=50.0)])
def test_a_round_summed_at_close_commits_the_running_sums_bits_in_any_arrival_order(
    round_files: tuple[Path, dict[str, Path]], robust: RobustAggregation
) -> None:
    current, updates = round_files
    running = _next_checkpoint(RoundAccumulator(MANIFEST, SILOS, robust=robust), SILOS, updates, current)
    for arrivals in (SILOS, ["s4", "s2", "s3", "s1"], ["s3", "s1", "s4", "s2"]):
        at_close = RoundAccumulator(MANIFEST, SILOS, robust=robust, running_sum_bytes=0)
        assert _next_checkpoint(at_close, arrivals, updates, current) == running
    # a tensor no update trained stays as it was
    alone = RoundAccumulator(MANIFEST, ["s3"], robust=robust, running_sum_bytes=0)
    assert _next_checkpoint(alone, ["s3"], updates, current)["head"] == load_file(str(current))["head"].tobytes()


def test_sums_past_the_limit_take_no_sum_buffer_and_those_within_it_do(
    round_files: tuple[Path, dict[str, Path]],
) -> None:
    current, updates = round_files
    size = sum(int(np.prod(spec.shape)) for spec in MANIFEST)
    buffers = SumBuffers(1 << 30)
    buffers.give(np.empty(size))  # a buffer of this model's sums, kept from an earlier round
    at_close = RoundAccumulator(MANIFEST, SILOS, buffers=buffers, running_sum_bytes=8 * size - 1)
    _next_checkpoint(at_close, SILOS, updates, current)
    assert buffers.kept_bytes == 8 * size  # not taken: the sums were made tensor by tensor at close
    running = RoundAccumulator(MANIFEST, SILOS, buffers=buffers, running_sum_bytes=8 * size)
    _next_checkpoint(running, SILOS, updates, current)
    assert buffers.kept_bytes == 0  # within the limit: the running sums live in it until the round is released
    running.release()
    assert buffers.kept_bytes == 8 * size


def test_encoded_rounds_keep_their_running_sums(round_files: tuple[Path, dict[str, Path]]) -> None:
    """Only plain float updates are summed at close: a float16 round folds as it always has, into a sum buffer."""
    current, _ = round_files
    rng = np.random.default_rng(3)
    float16 = DeltaEncoding("float16")
    wire = {spec.name: spec.dtype for spec in encoded_manifest(MANIFEST, float16)}
    updates = {}
    for silo in SILOS:
        tensors = {s.name: rng.standard_normal(s.shape).astype(NUMPY_DTYPES[wire[s.name]]) for s in MANIFEST}
        updates[silo] = current.with_name(f"{silo}-f16.safetensors")
        save_file(tensors, str(updates[silo]))
    size = sum(int(np.prod(spec.shape)) for spec in MANIFEST)
    buffers = SumBuffers(1 << 30)
    buffers.give(np.empty(size))
    encoded = RoundAccumulator(MANIFEST, SILOS, encoding=float16, buffers=buffers, running_sum_bytes=0)
    bits = _next_checkpoint(encoded, SILOS, updates, current)
    assert buffers.kept_bytes == 0  # taken: running sums
    assert bits == _next_checkpoint(RoundAccumulator(MANIFEST, SILOS, encoding=float16), SILOS, updates, current)
