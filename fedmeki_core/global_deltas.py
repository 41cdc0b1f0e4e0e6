"""Global models sent as deltas (a job's `downloads: delta`): what coordinator and silo share to agree bit for bit.

For such a job the checkpoint C_r that round r commits is DEFINED as C_b + decode(E_r), where C_b is the checkpoint
the round started from and E_r the change to it in the job's lossy encoding (int8 or topk, with the coordinator's
own error-feedback residual). The coordinator writes E_r beside C_r; a silo holding C_b downloads E_r instead of
C_r and rebuilds C_r with the same functions (`encodings.py`'s decoders, `rebuilt`'s adds), so its file has C_r's
sha256. E_r is a safetensors file laid out as an update in that encoding (`encoded_manifest` of C_b's tensors as
float32, in C_b's order), its `__metadata__` naming C_b's round and sha256.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.encodings import DeltaEncoding, encoded_manifest, iter_deltas
from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.files import atomic_write
from fedmeki_core.overlapped_writer import OverlappedHashingWriter
from fedmeki_core.wire import TensorSpec, iter_tensors, read_header, read_layout, write_safetensors

BASE_ROUND_KEY = "fedmeki.base_round"
BASE_SHA256_KEY = "fedmeki.base_sha256"
Array = np.ndarray[Any, Any]


def as_float32(order: Sequence[TensorSpec]) -> list[TensorSpec]:
    """A checkpoint's tensors as the float32 deltas that change them."""
    return [TensorSpec(spec.name, "F32", spec.shape) for spec in order]


def delta_layout(order: Sequence[TensorSpec], encoding: DeltaEncoding) -> list[TensorSpec]:
    """The entries of a delta to a checkpoint whose tensors are `order`, in the order they are stored."""
    return encoded_manifest(as_float32(order), encoding)


def rebuilt(base: Array, decoded: Array) -> Array:
    """A tensor of the next checkpoint: `base` plus the float32 `decoded` change, added in float32 (in float64 for a
    float64 tensor) and stored in `base`'s dtype."""
    wide = np.float64 if base.dtype == np.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf, which the caller refuses
        total: Array = base.astype(wide, copy=False) + decoded.astype(wide, copy=False)
    return total.astype(base.dtype, copy=False)


def delta_base(path: Path) -> tuple[int, str] | None:
    """The round and sha256 of the checkpoint a delta file changes, as its metadata names them (None if it does not)."""
    metadata = read_header(path).get("__metadata__") or {}
    round_text, sha256 = metadata.get(BASE_ROUND_KEY, ""), metadata.get(BASE_SHA256_KEY, "")
    return (int(round_text), sha256) if round_text.isdigit() and sha256 else None


def rebuild(base: Path, delta: Path, destination: Path, encoding: DeltaEncoding, reuse: Path | None = None) -> str:
    """Write the checkpoint that `delta` makes of checkpoint `base` to `destination` (atomically, overwriting `reuse`
    when given); its sha256. InvalidUpdateError if the delta is not laid out as one to `base` in `encoding`.

    Not fsynced: a process killed loses nothing (the page cache holds the file), and against a power loss a silo's
    rebuilt checkpoint is as durable as one it downloads whole (`transfer.py` fsyncs no data either); the same file
    as the held model is checked before each use (`silo_agent/delta_downloads.py`)."""
    _, order = read_layout(base)
    _, stored = read_layout(delta)
    expected = delta_layout(order, encoding)
    if [(s.name, s.dtype, s.shape) for s in stored] != [(s.name, s.dtype, s.shape) for s in expected]:
        raise InvalidUpdateError(f"{delta.name} is not a delta in {encoding.name} to the checkpoint held here")

    def tensors() -> Iterator[Array]:
        changes = iter_deltas(delta, as_float32(order), encoding)
        for (spec, old), (change, decoded) in zip(iter_tensors(base), changes, strict=True):
            if change.name != spec.name:
                raise InvalidUpdateError(f"{delta.name} holds {change.name!r} where {spec.name!r} belongs")
            yield rebuilt(old, decoded)

    with atomic_write(destination, reuse=reuse, durable=False) as f, OverlappedHashingWriter(f) as writer:
        write_safetensors(writer, order, tensors())
    return writer.hexdigest()
