"""The one wire format for tensors: safetensors files moved as byte chunks.

A sender streams a file (`iter_file_chunks`); a receiver validates the bytes while they arrive
(`fedmeki_core/stream_validation.py`). This module holds the format: dtypes, headers, the manifest, the metadata a
delta carries, and reading and writing files.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import RawIOBase
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from fedmeki_core.errors import InvalidUpdateError, LimitExceededError

HEADER_PREFIX_BYTES = 8
# A tensor's rank and each of its dimensions at most (what protobuf's int64 shapes and any real model hold).
MAX_RANK = 16
MAX_DIMENSION = 2**31 - 1
# 256 KiB: as fast as 1 MiB, and gRPC holds about a chunk's worth of buffers per stream in flight, so 16 silos
# uploading at once cost the coordinator half the memory (`fedmeki bench chunks`, docs/benchmarks.md).
DEFAULT_CHUNK_BYTES = 256 << 10
DEFAULT_MAX_HEADER_BYTES = 16 << 20

# safetensors dtype name -> (item size, numpy dtype used to check finiteness or None for integers).
DTYPES: dict[str, tuple[int, np.dtype[Any] | None]] = {
    "F64": (8, np.dtype("<f8")),
    "F32": (4, np.dtype("<f4")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),  # numpy has no bfloat16: checked via its exponent bits
    "I64": (8, None),
    "I32": (4, None),
    "I16": (2, None),
    "I8": (1, None),
    "U8": (1, None),
    "BOOL": (1, None),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a round manifest."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPES[self.dtype][0]


@dataclass(frozen=True)
class FileChunk:
    offset: int
    data: bytes


def itemsize(dtype: str) -> int:
    if dtype not in DTYPES:
        raise InvalidUpdateError(f"unsupported dtype {dtype!r}; supported: {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype][0]


def read_header(path: Path, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file."""
    return read_header_and_start(path, max_header_bytes)[0]


def read_header_and_start(path: Path, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> tuple[dict[str, Any], int]:
    """The parsed JSON header of a safetensors file, and where its data section starts."""
    raw, start = read_header_bytes(path, max_header_bytes)
    return parse_header_json(raw), start


def read_header_bytes(path: Path, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> tuple[bytes, int]:
    """The JSON header of a safetensors file as stored (not parsed), and where its data section starts."""
    with path.open("rb") as f:
        prefix = f.read(HEADER_PREFIX_BYTES)
        if len(prefix) < HEADER_PREFIX_BYTES:
            raise InvalidUpdateError(f"{path.name}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > max_header_bytes:
            raise LimitExceededError(f"{path.name}: header of {length} bytes exceeds {max_header_bytes}")
        return f.read(length), HEADER_PREFIX_BYTES + length


def read_layout(path: Path, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> tuple[int, list[TensorSpec]]:
    """Where a safetensors file's data section starts, and its tensors in the order they are stored."""
    header, start = read_header_and_start(path, max_header_bytes)
    entries = sorted((int(e["data_offsets"][0]), name) for name, e in header.items() if name != "__metadata__")
    by_name = {spec.name: spec for spec in manifest_from_header(header)}
    return start, [by_name[name] for _, name in entries]


def read_exactly(f: RawIOBase, view: memoryview, path: Path, what: str) -> None:
    """Fill `view` from the unbuffered file `f` (at `path`); InvalidUpdateError naming `what` if it ends first."""
    while view:
        read = f.readinto(view)
        if not read:
            raise InvalidUpdateError(f"{path.name}: file ends inside {what}")
        view = view[read:]


def iter_tensors(
    path: Path, targets: Mapping[str, str] | None = None
) -> Iterator[tuple[TensorSpec, np.ndarray[Any, Any]]]:
    """Each tensor of a safetensors file in stored order, read with plain reads into one reused buffer.

    No memory map and no allocation per tensor: each array is a view that is only valid until the next
    one is produced (copy it to keep it). Float tensors only. `targets` (name -> dtype) widens tensors stored
    in a narrower encoding (F16, BF16) to the dtype given, in a second reused buffer.
    """
    data_start, order = read_layout(path)
    targets = targets or {}
    largest = max((spec.nbytes for spec in order), default=0)
    buffer = bytearray(largest)
    widened = bytearray(max((_element_count(s) * DTYPES[targets.get(s.name, s.dtype)][0] for s in order), default=0))
    with path.open("rb", buffering=0) as f:
        assert isinstance(f, RawIOBase)  # unbuffered: reads go straight into the buffer
        f.seek(data_start)
        for spec in order:
            read_exactly(f, memoryview(buffer)[: spec.nbytes], path, f"tensor {spec.name!r}")
            target = targets.get(spec.name, spec.dtype)
            stored = _float_view(buffer, spec)
            if target == spec.dtype:
                yield spec, stored
                continue
            out = np.frombuffer(widened, dtype=DTYPES[target][1], count=_element_count(spec)).reshape(spec.shape)
            _widen(stored, spec.dtype, out)
            yield TensorSpec(spec.name, target, spec.shape), out


def read_elements(f: BinaryIO, position: int, stored: str, out: np.ndarray[Any, Any]) -> None:
    """Fill float array `out` with `out.size` values of safetensors dtype `stored` read from `f` at byte
    `position`, widened exactly where `out` is wider (F16 or BF16 into F32, F32 into F64)."""
    size = DTYPES[stored][0]
    f.seek(position)
    raw = f.read(out.size * size)
    if len(raw) < out.size * size:
        raise InvalidUpdateError("file ends inside a tensor")
    _widen(np.frombuffer(raw, dtype=DTYPES[stored][1]).reshape(out.shape), stored, out)


def _widen(stored: np.ndarray[Any, Any], dtype: str, out: np.ndarray[Any, Any]) -> None:
    if dtype != "BF16":
        np.copyto(out, stored)
    elif out.dtype == np.float32:  # bfloat16 is the top half of a float32
        bits = out.view(np.uint32)
        np.copyto(bits, stored)
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(out, np.left_shift(stored.astype(np.uint32), 16).view(np.float32))


def _element_count(spec: TensorSpec) -> int:
    return spec.nbytes // DTYPES[spec.dtype][0]


def _float_view(buffer: bytearray, spec: TensorSpec) -> np.ndarray[Any, Any]:
    dtype = DTYPES[spec.dtype][1]
    if dtype is None:
        raise InvalidUpdateError(f"tensor {spec.name!r}: {spec.dtype} is not a float dtype")
    return np.frombuffer(buffer, dtype=dtype, count=_element_count(spec)).reshape(spec.shape)


# Delta encodings a job may choose: the safetensors dtype every exchanged tensor travels as (None: its own).
DELTA_ENCODINGS: dict[str, str | None] = {"float32": None, "bfloat16": "BF16", "float16": "F16"}


def wire_manifest(manifest: Sequence[TensorSpec], encoding: str) -> list[TensorSpec]:
    """What an update must contain under a delta encoding: the manifest's names and shapes, encoded dtypes."""
    dtype = DELTA_ENCODINGS[encoding]
    return [spec if dtype is None else TensorSpec(spec.name, dtype, spec.shape) for spec in manifest]


def read_manifest(path: Path) -> list[TensorSpec]:
    """The tensors of a safetensors file, in name order."""
    header = read_header(path)
    return manifest_from_header(header)


def manifest_from_header(header: dict[str, Any]) -> list[TensorSpec]:
    specs = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        itemsize(entry["dtype"])
        specs.append(TensorSpec(name=name, dtype=entry["dtype"], shape=tuple(int(d) for d in entry["shape"])))
    return sorted(specs, key=lambda s: s.name)


# A delta's header may name, in its `__metadata__`, tensors the silo did not train this round (it holds no data for
# their task): they travel as zeros and count for nothing in those tensors' means. Newline-separated names.
UNTRAINED_KEY = "fedmeki.untrained"


def untrained_tensors(header: Mapping[str, Any]) -> set[str]:
    """The tensors a delta's header declares untrained (see UNTRAINED_KEY); the header was parsed here."""
    value: str = header.get("__metadata__", {}).get(UNTRAINED_KEY, "")
    return set(filter(None, value.split("\n")))


# A delta's header may declare the local optimiser steps behind it (FedNova normalises by them): a positive integer
# of ASCII digits, at most MAX_LOCAL_STEPS (a larger count would overflow the weighted mean of the round's steps).
LOCAL_STEPS_KEY = "fedmeki.local_steps"
MAX_LOCAL_STEPS = 10**9
_LOCAL_STEPS = re.compile(r"[1-9][0-9]{0,9}")


def local_steps(header: Mapping[str, Any]) -> int | None:
    """The local steps a delta's header declares (see LOCAL_STEPS_KEY), or None."""
    value = (header.get("__metadata__") or {}).get(LOCAL_STEPS_KEY)
    if value is None:
        return None
    if not isinstance(value, str) or not _LOCAL_STEPS.fullmatch(value) or int(value) > MAX_LOCAL_STEPS:
        shown = value[:40] + "..." if isinstance(value, str) and len(value) > 40 else value
        raise InvalidUpdateError(
            f"__metadata__[{LOCAL_STEPS_KEY!r}] must be an integer from 1 to {MAX_LOCAL_STEPS}, got {shown!r}"
        )
    return int(value)


# Room in an update's header for metadata besides the untrained names (writers may add e.g. "format").
HEADER_METADATA_SLACK = 64 << 10


def header_bound(manifest: Sequence[TensorSpec]) -> int:
    """The longest header an update of `manifest` may have: its entries, every name listed as untrained, and
    HEADER_METADATA_SLACK. A stream declaring a longer one is refused before its header is buffered."""
    every_name = {UNTRAINED_KEY: "\n".join(spec.name for spec in manifest)}
    return len(safetensors_header(manifest, every_name)) + HEADER_METADATA_SLACK


def safetensors_header(
    manifest: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None, min_length: int = 0
) -> bytes:
    """The 8-byte length prefix and JSON header of a file holding `manifest`'s tensors in that order.

    `metadata` becomes the header's `__metadata__`; `min_length` pads the header with spaces to at least that
    many bytes (prefix included), so a header written before its tensors' sizes are known can be rewritten.
    """
    entries: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for spec in manifest:
        entries[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * max(0, min_length - HEADER_PREFIX_BYTES - len(raw))
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data section starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


class Writer(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...


def write_safetensors(
    f: Writer,
    manifest: Sequence[TensorSpec],
    tensors: Iterable[np.ndarray[Any, Any]],
    untrained: Iterable[str] = (),
    steps: int | None = None,
) -> None:
    """Write tensors one at a time, in manifest order, without building the whole file in memory; the header
    declares the `untrained` tensors and the local `steps` when given."""
    metadata = {}
    if names := sorted(untrained):
        metadata[UNTRAINED_KEY] = "\n".join(names)
    if steps is not None:
        metadata[LOCAL_STEPS_KEY] = str(steps)
    f.write(safetensors_header(manifest, metadata or None))
    for spec, array in zip(manifest, tensors, strict=True):
        if tuple(array.shape) != spec.shape:
            raise ValueError(f"tensor {spec.name!r} has shape {array.shape}, expected {spec.shape}")
        f.write(np.ascontiguousarray(array).data.cast("B"))


def iter_file_chunks(path: Path, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[FileChunk]:
    """The file's bytes from `offset`, `chunk_bytes` at a time, read lazily."""
    with path.open("rb") as f:
        f.seek(offset)
        while data := f.read(chunk_bytes):
            yield FileChunk(offset=offset, data=data)
            offset += len(data)


def parse_header_json(raw: bytes) -> dict[str, Any]:
    try:  # UTF-8 only (as safetensors), no repeated keys: Python's parser would keep the last of them
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # ValueError covers decoding, syntax and over-long numbers
        raise InvalidUpdateError(f"safetensors header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise InvalidUpdateError("safetensors header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise InvalidUpdateError("safetensors __metadata__ must be an object of strings")
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise InvalidUpdateError(f"tensor {name!r}: header entry lacks dtype, shape or data_offsets")
        if not isinstance(entry["dtype"], str):
            raise InvalidUpdateError(f"tensor {name!r}: dtype must be a string")
        if not _naturals(entry["shape"], MAX_DIMENSION) or len(entry["shape"]) > MAX_RANK:
            raise InvalidUpdateError(
                f"tensor {name[:100]!r}: shape must be a list of at most {MAX_RANK} integers from 0 to {MAX_DIMENSION}"
            )
        offsets = entry["data_offsets"]
        if not (_naturals(offsets, 2**63 - 1) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise InvalidUpdateError(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
    return header


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    unique = dict(pairs)
    if len(unique) < len(pairs):
        keys = [key for key, _ in pairs]
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise InvalidUpdateError(f"safetensors header has a duplicate key {repeated!r}")
    return unique


def _naturals(value: Any, largest: int) -> bool:
    """A JSON list of integers from 0 to `largest` (booleans excluded)."""
    return isinstance(value, list) and all(type(v) is int and 0 <= v <= largest for v in value)
