"""Rounds' running sums kept for the next round (`SumBuffers`): what is kept, what is given back, and when not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from coordinator.aggregation import RoundAccumulator
from coordinator.running_sums import RunningSums
from coordinator.sum_buffers import SumBuffers
from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.wire import TensorSpec

MANIFEST = [TensorSpec("a", "F32", (3, 2)), TensorSpec("b", "F32", (4,))]
SPEC = parse_job_spec({"name": "sums", "task": "synthetic-vitals", "rounds": 2})


def _files(tmp_path: Path, value: float) -> tuple[Path, Path]:
    current, update = tmp_path / "current.safetensors", tmp_path / f"update-{value}.safetensors"
    save_file({"a": np.ones((3, 2), np.float32), "b": np.ones(4, np.float32)}, str(current))
    save_file({"a": np.full((3, 2), value, np.float32), "b": np.full(4, value, np.float32)}, str(update))
    return current, update


def _commit(accumulator: RoundAccumulator, current: Path) -> list[np.ndarray]:
    fedavg = get_algorithm("fedavg")
    _, steps = accumulator.next_global(current, fedavg.server(fedavg.resolve_options({})), {})
    return [np.array(new, copy=True) for _, new in steps]


def test_a_buffer_is_handed_out_whole_once_and_kept_within_the_limit() -> None:
    buffers = SumBuffers(limit_bytes=8 * 100)
    ten, twenty = np.empty(10), np.empty(20)
    buffers.give(ten)
    buffers.give(twenty)
    assert buffers.take(10) is ten
    assert buffers.take(10) is not ten  # handed out already: a new one
    assert buffers.take(20) is twenty
    buffers.give(np.empty(101))  # beyond the limit alone: not kept
    assert buffers.kept_bytes == 0
    buffers.give(np.empty(60))
    buffers.give(np.empty(50))  # the oldest (60) goes
    assert buffers.kept_bytes == 8 * 50


def test_a_committed_round_gives_its_sums_to_the_next_round_of_the_job(tmp_path: Path) -> None:
    current, update = _files(tmp_path, 0.5)
    sums = RunningSums(SumBuffers(1 << 20))
    first = sums.accumulator("job", 1, MANIFEST, SPEC, ["s"], None)
    first.offer("s", update, 1.0)
    first.close()
    expected = _commit(first, current)
    sums.drop("job", 1)
    second = sums.accumulator("job", 2, MANIFEST, SPEC, ["s"], None)
    second.offer("s", update, 1.0)
    second.close()
    assert [a.tobytes() for a in _commit(second, current)] == [a.tobytes() for a in expected]
    first.offer("late", update, 1.0)  # a fold queued before the drop: nothing, and no error
    sums.drop("job", 2)
    sums.forget("job")


def test_sums_still_read_by_a_commit_are_not_given_back(tmp_path: Path) -> None:
    current, update = _files(tmp_path, 0.25)
    buffers = SumBuffers(1 << 20)
    accumulator = RoundAccumulator(MANIFEST, ["s"], buffers=buffers)
    accumulator.offer("s", update, 1.0)
    accumulator.close()
    fedavg = get_algorithm("fedavg")
    _, steps = accumulator.next_global(current, fedavg.server(fedavg.resolve_options({})), {})
    next(steps)  # a commit cut short: its generator holds the sums (and their lock) until it is collected
    accumulator.release()  # returns at once
    assert buffers.kept_bytes == 0
    steps.close()
    accumulator.release()
    assert buffers.kept_bytes == 8 * 10
