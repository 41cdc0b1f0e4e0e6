"""Delta encodings smaller than float32: blockwise int8 and top-k sparse, their wire layout, checks and decoding.

Each encoded tensor NAME (float32 of shape S, n elements, flattened in C order) travels as two safetensors entries:

- `int8`: `NAME` I8 of shape S (the values), `NAME.__scale` F32 [ceil(n / block_size)] (one positive scale per
  block of `block_size` consecutive flat values, the last block possibly short). Value i decodes to
  `float32(q[i]) * scale[i // block_size]`; q lies in -127..127.
- `topk`: `NAME` F32 [k] (the values), `NAME.__indices` I32 [k] (I64 when n >= 2**31): strictly increasing flat
  indices below n, k = min(n, max(1, ceil(topk_fraction * n))) (0 when n = 0). Every other entry decodes to 0.

The receiver knows the layout from the job spec (`encoded_manifest`): the stream validator checks names, dtypes,
shapes (so block counts and k), and `EncodedValuesCheck` the values as they pass: scales finite and > 0, int8 in
-127..127, indices in range, sorted and unique. Silo and coordinator decode with the same functions, so both agree
bit for bit on what was transmitted (the silo keeps the rest as its error-feedback residual).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.stream_validation import refuse_over_max_abs
from fedmeki_core.wire import TensorSpec, iter_tensors, read_layout, wire_manifest

SCALE_SUFFIX = ".__scale"
INDICES_SUFFIX = ".__indices"
INT8_LIMIT = 127
FEEDBACK_ENCODINGS = ("int8", "topk")  # lossy: the silo keeps what was not transmitted
ENCODINGS = ("float32", "bfloat16", "float16", *FEEDBACK_ENCODINGS)
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class DeltaEncoding:
    """A job's delta encoding: its name and the parameters of the lossy ones."""

    name: str = "float32"
    block_size: int = 128
    topk_fraction: float = 0.01

    @property
    def feedback(self) -> bool:
        return self.name in FEEDBACK_ENCODINGS

    @classmethod
    def of(cls, spec: Any) -> DeltaEncoding:
        """The encoding a JobSpec declares."""
        return cls(spec.delta_encoding, spec.int8_block_size, spec.topk_fraction)


@dataclass(frozen=True)
class EncodedPart(TensorSpec):
    """One wire entry of an encoded tensor: its role ("int8", "scale", "values", "indices") and the flat size and
    block size of the tensor it encodes."""

    role: str = ""
    numel: int = 0
    block_size: int = 0


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def topk_count(numel: int, fraction: float) -> int:
    """How many entries a top-k encoded tensor of `numel` elements carries."""
    return 0 if numel == 0 else min(numel, max(1, math.ceil(fraction * numel)))


def encoded_manifest(manifest: Sequence[TensorSpec], encoding: DeltaEncoding) -> list[TensorSpec]:
    """What an update must contain under `encoding`: for float encodings the manifest in that dtype; for int8 and
    topk two entries per tensor (see the module docstring), values first."""
    if not encoding.feedback:
        return wire_manifest(manifest, encoding.name)
    parts: list[TensorSpec] = []
    for spec in manifest:
        n = _numel(spec.shape)
        if encoding.name == "int8":
            blocks = -(-n // encoding.block_size)
            parts.append(EncodedPart(spec.name, "I8", spec.shape, "int8", n, encoding.block_size))
            parts.append(EncodedPart(spec.name + SCALE_SUFFIX, "F32", (blocks,), "scale", n, encoding.block_size))
        else:
            k = topk_count(n, encoding.topk_fraction)
            index_dtype = "I32" if n < 2**31 else "I64"
            parts.append(EncodedPart(spec.name, "F32", (k,), "values", n))
            parts.append(EncodedPart(spec.name + INDICES_SUFFIX, index_dtype, (k,), "indices", n))
    return parts


def encode_int8(values: Array, block_size: int) -> tuple[Array, Array]:
    """Flat float32 `values` as int8 (same length) and one float32 scale per block: absmax / 127 (1 where a block's
    scale would be 0), so each value is off by at most half its block's scale."""
    n = values.size
    blocks = -(-n // block_size)
    if n == blocks * block_size:  # whole blocks: no padded copy
        grid = np.ascontiguousarray(values, dtype=np.float32).reshape(blocks, block_size)
    else:
        padded = np.zeros(blocks * block_size, dtype=np.float32)
        padded[:n] = values.reshape(-1)
        grid = padded.reshape(blocks, block_size)
    if blocks:  # max |x| per block without a temporary |grid|
        scales = np.maximum(grid.max(axis=1), -grid.min(axis=1)) / np.float32(INT8_LIMIT)
    else:
        scales = np.zeros(0, np.float32)
    scales[scales == 0] = 1.0
    scaled = grid / scales[:, None]
    np.rint(scaled, out=scaled)
    np.clip(scaled, -INT8_LIMIT, INT8_LIMIT, out=scaled)
    return scaled.astype(np.int8).reshape(-1)[:n], scales.astype(np.float32)


def decode_int8(quantised: Array, scales: Array, block_size: int, out: Array) -> None:
    """Fill flat float32 `out` with the values int8 `quantised` and block `scales` stand for."""
    full = quantised.size // block_size
    head = full * block_size
    grid = out[:head].reshape(full, block_size)
    np.multiply(quantised[:head].reshape(full, block_size), scales[:full, None], out=grid, dtype=np.float32)
    if head < quantised.size:
        np.multiply(quantised[head:], scales[full], out=out[head:], dtype=np.float32)


def encode_topk(values: Array, k: int) -> tuple[Array, Array]:
    """The `k` largest-magnitude entries of flat float32 `values`: (sorted flat indices, their values)."""
    flat = values.reshape(-1)
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    chosen = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
    return chosen, flat[chosen].astype(np.float32)


def decode_topk(indices: Array, values: Array, out: Array) -> None:
    """Fill flat float32 `out` with zeros and `values` at `indices`."""
    out.fill(0)
    out[indices] = values


def encode_tensor(values: Array, part: EncodedPart, encoding: DeltaEncoding) -> tuple[list[Array], Array]:
    """A float32 tensor as the arrays of its two wire entries (in `encoded_manifest` order), and what they decode to."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    sent = np.empty_like(flat)
    if encoding.name == "int8":
        quantised, scales = encode_int8(flat, encoding.block_size)
        decode_int8(quantised, scales, encoding.block_size, sent)
        return [quantised.reshape(part.shape), scales], sent.reshape(values.shape)
    indices, kept = encode_topk(flat, topk_count(flat.size, encoding.topk_fraction))
    decode_topk(indices, kept, sent)
    index_dtype = np.int32 if flat.size < 2**31 else np.int64
    return [kept, indices.astype(index_dtype)], sent.reshape(values.shape)


class EncodedValuesCheck:
    """The stream validator's check of encoded entries' values, fed each entry's bytes in order: scales positive,
    int8 in -127..127, indices sorted, unique and in range (across chunks: it keeps the last index of each tensor).
    Float entries are checked finite by the validator itself.

    With `max_abs_value` / `max_norm` (the job's update limits) it bounds what the update decodes to: a top-k
    value as it is, an int8 value as q x scale. The int8 values and scales of a tensor may come in either order, so
    it keeps per block of the tensor (O(n / block_size)) the largest |q| and the sum of q^2 until the scales come,
    or the scales until the values come."""

    def __init__(self, max_abs_value: float | None = None, max_norm: float | None = None) -> None:
        self._max_abs_value = max_abs_value
        self._max_norm = max_norm
        self._last: dict[str, int] = {}
        self._seen: dict[str, int] = {}  # elements of each int8 entry checked so far
        self._blocks: dict[str, tuple[Array, Array]] = {}  # int8 tensor -> per block (max |q|, sum of q^2)
        self._scales: dict[str, Array] = {}  # int8 tensor -> its scales (filled as they come)
        self._scales_seen: dict[str, int] = {}
        self._squares = 0.0

    def __call__(self, spec: TensorSpec, data: memoryview) -> None:
        if not isinstance(spec, EncodedPart):
            return
        if spec.role == "scale":
            scales = np.frombuffer(data, dtype="<f4")
            if not bool((scales > 0).all()):
                raise InvalidUpdateError(f"tensor {spec.name!r}: int8 block scales must be positive")
            if self._bounded:
                self._scale_part(spec.name[: -len(SCALE_SUFFIX)], spec, scales)
        elif spec.role == "int8":
            quantised = np.frombuffer(data, dtype=np.int8)
            if bool((quantised < -INT8_LIMIT).any()):
                raise InvalidUpdateError(f"tensor {spec.name!r}: int8 values must lie in -127..127")
            if self._bounded:
                self._int8_part(spec, quantised)
        elif spec.role == "indices":
            self._check_indices(spec, np.frombuffer(data, dtype="<i4" if spec.dtype == "I32" else "<i8"))
        elif self._bounded:  # top-k values: the values themselves
            self._bound(spec.name, np.frombuffer(data, dtype="<f4").astype(np.float64))

    @property
    def _bounded(self) -> bool:
        return self._max_abs_value is not None or self._max_norm is not None

    def _blocks_of(self, spec: EncodedPart) -> tuple[Array, Array]:
        count = -(-spec.numel // spec.block_size)
        return self._blocks.setdefault(spec.name, (np.zeros(count, np.int16), np.zeros(count, np.int64)))

    def _int8_part(self, spec: EncodedPart, quantised: Array) -> None:
        first = self._seen.get(spec.name, 0)
        self._seen[spec.name] = first + quantised.size
        block = (first + np.arange(quantised.size)) // spec.block_size
        wide = quantised.astype(np.int64)
        largest, squares = self._blocks_of(spec)
        np.maximum.at(largest, block, np.abs(wide).astype(np.int16))
        np.add.at(squares, block, wide * wide)
        if self._seen[spec.name] == spec.numel and self._scales_seen.get(spec.name, -1) == largest.size:
            self._settle(spec.name)

    def _scale_part(self, name: str, spec: EncodedPart, scales: Array) -> None:
        count = -(-spec.numel // spec.block_size)
        held = self._scales.setdefault(name, np.zeros(count, np.float64))
        first = self._scales_seen.get(name, 0)
        held[first : first + scales.size] = scales
        self._scales_seen[name] = first + scales.size
        if self._scales_seen[name] == count and self._seen.get(name, -1) == spec.numel:
            self._settle(name)

    def _settle(self, name: str) -> None:
        """Both parts of int8 tensor `name` have come: bound what it decodes to."""
        scales = self._scales.pop(name)
        largest, squares = self._blocks.pop(name)
        if self._max_abs_value is not None and scales.size:
            top = float((largest * scales).max())
            if top > self._max_abs_value:
                raise InvalidUpdateError(
                    f"tensor {name!r} holds a value of magnitude {top:.6g}, over the job's max_abs_value "
                    f"{self._max_abs_value}"
                )
        self._add_squares(name, float(np.dot(squares.astype(np.float64), scales * scales)))

    def _bound(self, name: str, values: Array) -> None:
        refuse_over_max_abs(name, values, self._max_abs_value)
        self._add_squares(name, float(np.dot(values, values)))

    def _add_squares(self, name: str, squares: float) -> None:
        self._squares += squares
        if self._max_norm is not None and math.sqrt(self._squares) > self._max_norm:
            raise InvalidUpdateError(
                f"the update's L2 norm exceeds the job's max_update_norm {self._max_norm} (at tensor {name!r})"
            )

    def _check_indices(self, spec: EncodedPart, indices: Array) -> None:
        if not indices.size:
            return
        previous = self._last.get(spec.name, -1)
        if int(indices[0]) <= previous or not bool((np.diff(indices) > 0).all()):
            raise InvalidUpdateError(f"tensor {spec.name!r}: top-k indices must be sorted and unique")
        if int(indices[-1]) >= spec.numel:
            raise InvalidUpdateError(f"tensor {spec.name!r}: top-k index {int(indices[-1])} is not below {spec.numel}")
        self._last[spec.name] = int(indices[-1])


def iter_deltas(
    path: Path, manifest: Sequence[TensorSpec], encoding: DeltaEncoding, targets: Mapping[str, str] | None = None
) -> Iterator[tuple[TensorSpec, Array]]:
    """Each tensor of an update (validated against `encoded_manifest(manifest, encoding)`) in stored order, decoded
    and widened to `targets` (name -> dtype; default: the manifest's dtypes).

    One tensor at a time into a reused buffer: each array is valid only until the next one is produced."""
    targets = targets if targets is not None else {spec.name: spec.dtype for spec in manifest}
    if not encoding.feedback:
        yield from iter_tensors(path, targets)
        return
    data_start, order = read_layout(path)
    positions: dict[str, int] = {}
    position = data_start
    for spec in order:  # the validator made the data offsets tile the data section in this order
        positions[spec.name] = position
        position += spec.nbytes
    parts = {part.name: part for part in encoded_manifest(manifest, encoding)}
    shapes = {spec.name: spec.shape for spec in manifest}
    largest = max((_numel(s) for s in shapes.values()), default=0)
    decoded = np.empty(largest, dtype=np.float32)
    # The coordinator's fold widens to float64: into one reused buffer, as a new array per tensor costs page faults.
    widened = np.empty(largest if "F64" in targets.values() else 0, dtype=np.float64)
    with path.open("rb", buffering=0) as f:
        for stored in order:
            if stored.name not in shapes:
                continue
            name, shape = stored.name, shapes[stored.name]
            out = decoded[: _numel(shape)]
            values = _read(f, positions[name], parts[name])
            if encoding.name == "int8":
                decode_int8(
                    values,
                    _read(f, positions[name + SCALE_SUFFIX], parts[name + SCALE_SUFFIX]),
                    encoding.block_size,
                    out,
                )
            else:
                decode_topk(_read(f, positions[name + INDICES_SUFFIX], parts[name + INDICES_SUFFIX]), values, out)
            spec = TensorSpec(name, targets[name], shape)
            if targets[name] == "F32":
                yield spec, out.reshape(shape)
            else:
                exact = widened[: out.size] if spec.dtype == "F64" else np.empty(out.size, _NUMPY[spec.dtype])
                np.copyto(exact, out)
                yield spec, exact.reshape(shape)


_NUMPY: dict[str, np.dtype[Any]] = {
    "I8": np.dtype(np.int8),
    "F32": np.dtype("<f4"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
    "F16": np.dtype("<f2"),
}


def _read(f: BinaryIO, position: int, spec: TensorSpec) -> Array:
    f.seek(position)
    raw = f.read(spec.nbytes)
    if len(raw) < spec.nbytes:
        raise InvalidUpdateError(f"file ends inside tensor {spec.name!r}")
    return np.frombuffer(raw, dtype=_NUMPY[spec.dtype])
