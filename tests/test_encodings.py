"""int8 and topk delta encodings: error bounds, error feedback across rounds, streaming decode, the job spec's rules."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedmeki_core.encodings import (
    DeltaEncoding,
    EncodedPart,
    EncodedValuesCheck,
    encode_tensor,
    encoded_manifest,
    iter_deltas,
    topk_count,
)
from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.stream_validation import SafetensorsStreamValidator
from fedmeki_core.wire import TensorSpec, write_safetensors
from silo_agent.error_feedback import ErrorFeedback, residual_store
from silo_agent.job_state import JobStateStore

MANIFEST = [TensorSpec("big", "F32", (37, 29)), TensorSpec("empty", "F32", (0,)), TensorSpec("w", "F32", (300,))]
ENCODINGS = [DeltaEncoding("int8", 64), DeltaEncoding("int8", 256), DeltaEncoding("topk", topk_fraction=0.05)]


def _values(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)  # magnitudes over many decades, so blocks get very different scales
    return (rng.normal(size=shape) * 10.0 ** rng.integers(-8, 4, size=shape)).astype(np.float32)


@pytest.mark.parametrize("block_size", [64, 100, 128, 256])
def test_int8_is_within_half_a_scale_of_every_value_in_its_block(block_size: int) -> None:
    values = _values(1, (5000,))
    values[:block_size] = 0.0  # an all-zero block: scale 1, decodes to exact zeros
    part = encoded_manifest([TensorSpec("x", "F32", values.shape)], DeltaEncoding("int8", block_size))[0]
    assert isinstance(part, EncodedPart)
    (quantised, scales), sent = encode_tensor(values, part, DeltaEncoding("int8", block_size))
    assert scales.shape == (-(-values.size // block_size),) and bool((scales > 0).all())
    assert quantised.dtype == np.int8 and int(np.abs(quantised.astype(np.int16)).max()) <= 127
    error = np.abs(values.astype(np.float64) - sent)
    bound = np.repeat(scales.astype(np.float64) / 2, block_size)[: values.size] * (1 + 1e-6)
    assert bool((error <= bound).all())
    assert not sent[:block_size].any()


def test_topk_sends_exactly_the_largest_entries() -> None:
    values = _values(2, (1000,))
    encoding = DeltaEncoding("topk", topk_fraction=0.01)
    part = encoded_manifest([TensorSpec("x", "F32", values.shape)], encoding)[0]
    assert isinstance(part, EncodedPart)
    (kept, indices), sent = encode_tensor(values, part, encoding)
    assert len(indices) == len(kept) == topk_count(1000, 0.01) == 10 and indices.dtype == np.int32
    assert bool((np.diff(indices) > 0).all())
    assert set(indices.tolist()) == set(np.argsort(-np.abs(values))[:10].tolist())
    np.testing.assert_array_equal(sent[indices], values[indices])
    assert np.count_nonzero(sent) == 10


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: f"{e.name}-{e.block_size}")
def test_error_feedback_carries_exactly_the_residual_across_rounds_and_restarts(
    encoding: DeltaEncoding, tmp_path: Path
) -> None:
    spec = TensorSpec("w", "F32", (777,))
    part = encoded_manifest([spec], encoding)[0]
    assert isinstance(part, EncodedPart)
    store = residual_store(JobStateStore(tmp_path / "job"))
    true_sum, sent_sum = np.zeros(777, np.float64), np.zeros(777, np.float64)
    held = np.zeros(777, np.float32)
    max_abs = max(float(np.abs(_values(r, (777,))).max()) * 1e-3 for r in range(1, 9))
    for round_number in range(1, 9):
        delta = _values(round_number, (777,)) * np.float32(1e-3)
        feedback = ErrorFeedback(encoding, store, round_number)  # a fresh object each round: as after a restart
        arrays = feedback.encode("w", torch.from_numpy(delta.copy()), part, trained=True)
        feedback.save()
        decoded = np.zeros(777, np.float32)
        if encoding.name == "int8":
            quantised, scales = arrays
            decoded = quantised.astype(np.float32) * np.repeat(scales, encoding.block_size)[:777]
        else:
            kept, indices = arrays
            decoded[indices] = kept
        true_sum += delta
        sent_sum += decoded
        residual = store.load(round_number + 1)["w"].numpy()
        assert residual.tobytes() == ((delta + held) - decoded).tobytes()  # exactly what was not sent, in float32
        held = residual
        # cumulatively: nothing lost, nothing counted twice (up to float32 rounding of each round's sums)
        np.testing.assert_allclose(true_sum - sent_sum, residual, rtol=0, atol=round_number * 1e-7 * max_abs)
        if encoding.name == "int8":  # ... and no more than one round's quantisation error
            assert bool((np.abs(residual) <= np.repeat(scales, encoding.block_size)[:777] / 2 * (1 + 1e-6)).all())
    untrained = ErrorFeedback(encoding, store, 9)
    untrained.encode("w", torch.zeros(777), part, trained=False)  # an untrained tensor keeps its residual
    untrained.save()
    np.testing.assert_array_equal(store.load(10)["w"].numpy(), store.load(9)["w"].numpy())


def _encoded_file(path: Path, encoding: DeltaEncoding, seed: int) -> tuple[bytes, dict[str, np.ndarray]]:
    """An encoded update of MANIFEST written as the silo writes it, and what each tensor decodes to."""
    wire = encoded_manifest(MANIFEST, encoding)
    parts = {p.name: p for p in wire}
    arrays, sent = [], {}
    for spec in MANIFEST:
        part = parts[spec.name]
        assert isinstance(part, EncodedPart)
        encoded, sent[spec.name] = encode_tensor(_values(seed, spec.shape), part, encoding)
        arrays += encoded
    with path.open("wb") as f:
        write_safetensors(f, wire, arrays)
    return path.read_bytes(), sent


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: f"{e.name}-{e.block_size}")
def test_the_streaming_decode_equals_the_batch_decode_bit_for_bit(encoding: DeltaEncoding, tmp_path: Path) -> None:
    payload, sent = _encoded_file(tmp_path / "u.safetensors", encoding, seed=3)
    rng = random.Random(4)
    for _ in range(5):  # the validator accepts it wherever the chunks cut it
        validator = SafetensorsStreamValidator(
            encoded_manifest(MANIFEST, encoding), len(payload), 1 << 20, value_check=EncodedValuesCheck()
        )
        stream = io.BytesIO(payload)
        while data := stream.read(rng.randrange(1, 5000)):
            validator.feed(data)
        validator.finish()
    decoded = {
        spec.name: np.array(t, copy=True) for spec, t in iter_deltas(tmp_path / "u.safetensors", MANIFEST, encoding)
    }
    assert decoded.keys() == sent.keys()
    for name, value in sent.items():
        assert decoded[name].dtype == np.float32 and decoded[name].tobytes() == value.tobytes()
    widened = set()
    for spec, t in iter_deltas(tmp_path / "u.safetensors", MANIFEST, encoding, {s.name: "F64" for s in MANIFEST}):
        # one reused float64 buffer: each tensor is checked before the next overwrites it
        assert spec.dtype == "F64" and t.dtype == np.float64 and np.array_equal(t, decoded[spec.name])
        widened.add(spec.name)
    assert widened == sent.keys()


def test_indices_must_increase_across_chunk_boundaries() -> None:
    manifest = encoded_manifest([TensorSpec("x", "F32", (100,))], DeltaEncoding("topk", topk_fraction=0.04))
    check = EncodedValuesCheck()
    indices = manifest[1]
    check(indices, memoryview(np.array([3, 9], np.int32).tobytes()))
    with pytest.raises(InvalidUpdateError, match="sorted and unique"):
        check(indices, memoryview(np.array([9, 20], np.int32).tobytes()))
    scale = encoded_manifest([TensorSpec("x", "F32", (100,))], DeltaEncoding("int8", 64))[1]
    with pytest.raises(InvalidUpdateError, match="must be positive"):
        check(scale, memoryview(np.array([1.0, 0.0], np.float32).tobytes()))


def _spec(**fields: object) -> JobSpec:
    return JobSpec.model_validate({"name": "j", "task": "synthetic-vitals", "rounds": 1, **fields})


def test_the_job_spec_bounds_the_encodings_and_keeps_ckks_and_cyclic_in_float32() -> None:
    assert DeltaEncoding.of(_spec(delta_encoding="int8", int8_block_size=64)) == DeltaEncoding("int8", 64, 0.01)
    for fields in [
        {"delta_encoding": "int8", "int8_block_size": 32},
        {"delta_encoding": "int8", "int8_block_size": 512},
        {"delta_encoding": "topk", "topk_fraction": 0.00001},
        {"delta_encoding": "topk", "topk_fraction": 0.6},
        {"delta_encoding": "int4"},
        {"delta_encoding": "int8", "algorithm": {"name": "fedavg", "options": {"robust": {"method": "median"}}}},
    ]:
        with pytest.raises(ValidationError):
            _spec(**fields)
    for mode in ("ckks", "cyclic"):
        for encoding in ("int8", "topk"):
            with pytest.raises(ValidationError, match="encrypts float32 deltas"):
                _spec(delta_encoding=encoding, min_silos=3, privacy={"secure_aggregation": mode})


def test_an_abandoned_rounds_residual_is_discarded_and_the_earlier_one_sent_next(tmp_path: Path) -> None:
    encoding = DeltaEncoding("int8", 64)
    part = encoded_manifest([TensorSpec("w", "F32", (100,))], encoding)[0]
    assert isinstance(part, EncodedPart)
    store = residual_store(JobStateStore(tmp_path / "job"))
    for round_number in (1, 2):
        feedback = ErrorFeedback(encoding, store, round_number)
        feedback.encode("w", torch.from_numpy(_values(round_number, (100,)) * np.float32(1e-3)), part, trained=True)
        feedback.save()
    first = store.load(2)["w"]  # what round 1 left
    store.discard(2)  # round 2's update was refused: its residual never became true
    assert torch.equal(store.load(3)["w"], first)


@pytest.mark.parametrize("scales_first", [False, True])
def test_the_update_limits_bound_what_an_int8_update_decodes_to(scales_first: bool) -> None:
    spec = TensorSpec("w", "F32", (200,))
    encoding = DeltaEncoding("int8", 64)
    values, scales = encoded_manifest([spec], encoding)
    assert isinstance(values, EncodedPart) and isinstance(scales, EncodedPart)
    quantised = np.zeros(200, np.int8)
    quantised[130] = -100  # block 2: decodes to -100 x 0.5 = -50
    quantised[5] = 3  # block 0: 3 x 2 = 6
    block_scales = np.array([2.0, 1.0, 0.5, 4.0], np.float32)
    true_norm = float(np.hypot(50.0, 6.0))

    def feed(check: EncodedValuesCheck) -> None:
        parts = [(values, quantised.tobytes()), (scales, block_scales.tobytes())]
        for part, raw in parts[::-1] if scales_first else parts:
            for start in range(0, len(raw), 12):  # whole elements, as the validator hands them
                check(part, memoryview(raw[start : start + 12]))

    feed(EncodedValuesCheck(max_abs_value=50.0, max_norm=true_norm + 1e-9))
    with pytest.raises(InvalidUpdateError, match="magnitude 50"):
        feed(EncodedValuesCheck(max_abs_value=49.9))
    with pytest.raises(InvalidUpdateError, match="max_update_norm"):
        feed(EncodedValuesCheck(max_norm=true_norm - 1e-6))
