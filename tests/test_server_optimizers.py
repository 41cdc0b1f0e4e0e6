"""Server optimisers: one step against a hand computation, the registry's contract, and state across a restart."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import address, coordinator_settings, enroll
from safetensors.numpy import load, load_file, save, save_file
from silo_wire import MANIFEST, RawSilo, job_spec, submit_raw, weights_bytes

from coordinator.aggregation import RoundAccumulator
from coordinator.server import Coordinator
from coordinator.sum_buffers import SumBuffers
from fedmeki_core.algorithms import ALGORITHMS, get_algorithm
from fedmeki_core.algorithms.base import ServerState
from fedmeki_core.encodings import DeltaEncoding, EncodedPart, encode_tensor, encoded_manifest
from fedmeki_core.wire import LOCAL_STEPS_KEY, TensorSpec, write_safetensors


def _server(name: str, **options: object):  # type: ignore[no-untyped-def]
    entry = get_algorithm(name)
    return entry.server(entry.resolve_options(options))


def _step(name: str, x: float, deltas: list[float], **options: object) -> float:
    server, state, value = _server(name, **options), {}, np.array([x], dtype=np.float32)
    for delta in deltas:
        value = server.apply("w", value, np.array([delta], dtype=np.float32), state)
    return float(value[0])


def test_one_fedadam_step_by_hand() -> None:
    # m = 0.1 * 0.1 = 0.01; v = 0.99 * tau^2 + 0.01 * 0.1^2; x = 1 + 0.01 * m / (sqrt(v) + tau)
    v = 0.99 * 1e-6 + 0.01 * 0.01
    assert _step("fedadam", 1.0, [0.1]) == pytest.approx(1 + 0.01 * 0.01 / (math.sqrt(v) + 1e-3), rel=1e-6)


def test_two_fedyogi_steps_by_hand() -> None:
    tau, d1, d2 = 1e-3, 0.2, -0.1
    m1 = 0.1 * d1
    v1 = tau**2 - 0.01 * d1**2 * math.copysign(1, tau**2 - d1**2)  # Yogi grows v while v < delta^2
    x1 = 1.0 + 0.01 * m1 / (math.sqrt(v1) + tau)
    m2 = 0.9 * m1 + 0.1 * d2
    v2 = v1 - 0.01 * d2**2 * math.copysign(1, v1 - d2**2)
    x2 = x1 + 0.01 * m2 / (math.sqrt(v2) + tau)
    assert _step("fedyogi", 1.0, [d1, d2]) == pytest.approx(x2, rel=1e-5)


def test_fedadagrad_accumulates_squares() -> None:
    tau, d1, d2 = 1e-3, 0.3, 0.1
    v2 = tau**2 + d1**2 + d2**2
    m2 = 0.9 * 0.1 * d1 + 0.1 * d2
    x1 = 0.0 + 0.01 * 0.1 * d1 / (math.sqrt(tau**2 + d1**2) + tau)
    assert _step("fedadagrad", 0.0, [d1, d2]) == pytest.approx(x1 + 0.01 * m2 / (math.sqrt(v2) + tau), rel=1e-5)


def test_fedavgm_moves_with_momentum() -> None:
    # m1 = 0.5; m2 = 0.9 * 0.5 - 0.2 = 0.25; x = 2 + 0.5 + 0.25
    assert _step("fedavgm", 2.0, [0.5, -0.2]) == pytest.approx(2.75, rel=1e-6)


ENCODINGS = [
    DeltaEncoding("float32"),
    DeltaEncoding("bfloat16"),
    DeltaEncoding("float16"),
    DeltaEncoding("int8", 64),
    DeltaEncoding("topk", topk_fraction=0.3),
]


def _encoded_update(path: Path, manifest: list[TensorSpec], encoding: DeltaEncoding, rng: np.random.Generator) -> None:
    """A random delta as a silo writes it in `encoding` (with the local steps FedNova reads)."""
    wire = encoded_manifest(manifest, encoding)
    parts = {part.name: part for part in wire}
    arrays: list[np.ndarray] = []
    for spec in manifest:
        values = rng.normal(size=spec.shape).astype(np.float32)
        part = parts[spec.name]
        if isinstance(part, EncodedPart):
            arrays += encode_tensor(values, part, encoding)[0]
        elif part.dtype == "BF16":
            arrays.append((values.view(np.uint32) >> 16).astype(np.uint16))
        else:
            arrays.append(values.astype(np.float16 if part.dtype == "F16" else np.float32))
    with path.open("wb") as f:
        write_safetensors(f, wire, arrays, steps=int(rng.integers(1, 9)))


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.name)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_aggregates_independently_of_arrival_order(
    name: str, encoding: DeltaEncoding, tmp_path: Path
) -> None:
    manifest = [TensorSpec(n, "F32", shape) for n, (shape, _) in MANIFEST.items()]
    current = tmp_path / "current.safetensors"
    current.write_bytes(weights_bytes(1))
    rng = np.random.default_rng(2)
    updates = {}
    for silo in ("s1", "s2", "s3"):
        updates[silo] = tmp_path / f"{silo}.safetensors"
        _encoded_update(updates[silo], manifest, encoding, rng)
    weights = {"s1": 10.0, "s2": 30.0, "s3": 60.0}

    def aggregate(
        arrival: list[str], state: dict[str, ServerState], buffers: SumBuffers | None = None
    ) -> dict[str, np.ndarray]:
        accumulator = RoundAccumulator(manifest, list(weights), encoding=encoding, buffers=buffers)
        for silo in arrival:
            accumulator.offer(silo, updates[silo], weights[silo])
        accumulator.close()
        order, steps = accumulator.next_global(current, _server(name), state)
        return {spec.name: np.array(t, copy=True) for spec, (_, t) in zip(order, steps, strict=True)}

    first_state: dict[str, ServerState] = {}
    second_state: dict[str, ServerState] = {}
    # The second folds into a buffer an earlier round left (`SumBuffers`): its old values change no bit.
    kept = SumBuffers(1 << 20)
    kept.give(np.full(sum(math.prod(spec.shape) for spec in manifest), np.nan))
    first = aggregate(["s1", "s2", "s3"], first_state)
    second = aggregate(["s3", "s1", "s2"], second_state, kept)
    assert kept.kept_bytes == 0  # taken
    for key in first:
        assert first[key].tobytes() == second[key].tobytes()  # bit for bit
    assert first_state.keys() == second_state.keys()
    for key, slots in first_state.items():
        assert {s: a.tobytes() for s, a in slots.items()} == {s: a.tobytes() for s, a in second_state[key].items()}


def _delta(value: float) -> bytes:
    return save({name: np.full(shape, value, dtype=dtype) for name, (shape, dtype) in MANIFEST.items()})


def test_fedadam_state_survives_a_coordinator_restart(tmp_path: Path) -> None:
    """Two rounds of FedAdam with a restart between them give exactly two FedAdam steps."""
    settings = coordinator_settings(tmp_path / "coordinator")  # SQLite in the data dir: the restart finds it
    first = Coordinator(settings)
    first.start()
    credential = enroll(first, "silo-a")
    job = submit_raw(address(first), job_spec(rounds=2, algorithm={"name": "fedadam"}), weights_bytes(4))
    silo = RawSilo(address(first), credential)
    assert silo.poll(wait=5) is not None
    silo.upload(job.id, 1, _delta(0.1))
    state_file = first.artifacts.server_state_path(job.id, 1)
    give_up = time.monotonic() + 30
    while not state_file.is_file() and time.monotonic() < give_up:
        time.sleep(0.05)
    first.stop(grace=0)

    second = Coordinator(settings)
    second.start()
    try:
        silo = RawSilo(address(second), credential)
        task = silo.poll(wait=5)
        assert task is not None and task.round == 2
        silo.upload(job.id, 2, _delta(-0.05))
        checkpoint = second.artifacts.checkpoint_path(job.id, 2)
        give_up = time.monotonic() + 30
        while not checkpoint.is_file() and time.monotonic() < give_up:
            time.sleep(0.05)
        result = load_file(str(checkpoint))
    finally:
        second.stop(grace=0)

    initial = load(weights_bytes(4))
    for name, x0 in initial.items():
        x, m, v = x0.astype(np.float64), 0.0, 1e-6
        for delta in (0.1, -0.05):
            m = 0.9 * m + 0.1 * delta
            v = 0.99 * v + 0.01 * delta**2
            x = x + 0.01 * m / (math.sqrt(v) + 1e-3)
        np.testing.assert_allclose(result[name], x, rtol=1e-5, atol=1e-6)


def _updates(tmp_path: Path, round_number: int) -> tuple[dict[str, Path], dict[str, int]]:
    """Three silos' updates for a round (random, declaring different local steps) and their sample counts."""
    rng = np.random.default_rng(round_number)
    paths, samples = {}, {"s1": 10, "s2": 30, "s3": 60}
    for index, silo in enumerate(samples):
        paths[silo] = tmp_path / f"r{round_number}-{silo}.safetensors"
        tensors = {n: rng.normal(size=shape).astype(np.float32) for n, (shape, _) in MANIFEST.items()}
        save_file(tensors, paths[silo], metadata={LOCAL_STEPS_KEY: str(2 + index)})
    return paths, samples


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_streaming_aggregation_equals_the_batch_formula_with_the_weights(name: str, tmp_path: Path) -> None:
    manifest = [TensorSpec(n, "F32", shape) for n, (shape, _) in MANIFEST.items()]
    current = tmp_path / "current.safetensors"
    current.write_bytes(weights_bytes(1))
    paths, samples = _updates(tmp_path, 1)
    server = _server(name)
    accumulator = RoundAccumulator(manifest, list(paths))
    for silo, path in paths.items():
        accumulator.offer(silo, path, server.update_weight(samples[silo]))
    accumulator.close()
    order, steps = accumulator.next_global(current, server, {})
    streamed = {spec.name: np.array(t, copy=True) for spec, (_, t) in zip(order, steps, strict=True)}

    reference = _server(name)  # the batch formula: the weighted mean of all updates at once, in float64
    weights = {silo: reference.update_weight(n) for silo, n in samples.items()}
    total = sum(weights.values())
    reference.begin_round(sum(weights[s] * (2 + i) for i, s in enumerate(paths)) / total)
    start, deltas = load_file(current), {silo: load_file(path) for silo, path in paths.items()}
    for tensor in start:
        mean = sum(weights[s] * deltas[s][tensor].astype(np.float64) for s in paths) / total
        expected = reference.apply(tensor, start[tensor], mean.astype(np.float32), {})
        np.testing.assert_allclose(streamed[tensor], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_server_state_through_the_checkpoint_files_equals_state_in_memory(name: str, tmp_path: Path) -> None:
    """Two rounds: once keeping the server state in memory, once writing and reading it as a restart would."""
    from coordinator.artifacts import Artifacts

    manifest = [TensorSpec(n, "F32", shape) for n, (shape, _) in MANIFEST.items()]
    artifacts = Artifacts(tmp_path / "artifacts")

    def run(persist: bool) -> dict[str, np.ndarray]:
        current = tmp_path / f"start-{persist}.safetensors"
        current.write_bytes(weights_bytes(1))
        state: dict[str, ServerState] = {}
        for round_number in (1, 2):
            if persist:
                state = artifacts.read_server_state("job", round_number - 1)
            paths, samples = _updates(tmp_path, round_number)
            server = _server(name)
            accumulator = RoundAccumulator(manifest, list(paths))
            for silo, path in paths.items():
                accumulator.offer(silo, path, server.update_weight(samples[silo]))
            accumulator.close()
            order, steps = accumulator.next_global(current, server, state)
            result = {spec.name: np.array(t, copy=True) for spec, (_, t) in zip(order, steps, strict=True)}
            current = tmp_path / f"r{round_number}-{persist}.safetensors"
            save_file(result, current)
            if persist:
                artifacts.write_server_state("job", round_number, state)
        return load_file(current)

    in_memory, restarted = run(False), run(True)
    assert all(in_memory[n].tobytes() == restarted[n].tobytes() for n in in_memory)
