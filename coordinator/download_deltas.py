"""Delta downloads (a job's `downloads: delta`): the coordinator's half. At a round's commit it turns the aggregate
into the change E_r from the checkpoint C_b the round started from, in the job's lossy encoding with its own
error-feedback residual, and commits C_b + decode(E_r) as the checkpoint (`fedmeki_core/global_deltas.py`); a silo
that holds C_b is then sent E_r instead of C_r.

Beside the checkpoints of the job: `download-delta-NNNNN.safetensors` (E_r) and `download-residual-NNNNN.safetensors`
(what C_r still lacks of the aggregates: float32, C_r's order). A round reads its base's residual and writes its own
before the commit, so an aggregation retried after a crash or restart starts from the same residual; the commit of
round r lets the earlier ones go, into the pool of zeroed files that later writes overwrite in place (a new or
emptied file, whose pages the kernel must allocate, costs several times as much to write here).

The residual is fsynced (the next round's aggregate reads it); the delta is not: a process killed loses nothing
(the page cache holds it), and a delta that a power loss damaged or lost costs the silo a whole download, never a
wrong model: each silo checks the checkpoint it rebuilds against C_r's sha256, which is committed (fsynced) with C_r.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.aggregation import AggregationError
from coordinator.artifacts import Artifacts
from fedmeki_core.encodings import DeltaEncoding, EncodedPart, encode_tensor
from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.files import atomic_write, sha256_file
from fedmeki_core.global_deltas import (
    BASE_ROUND_KEY,
    BASE_SHA256_KEY,
    as_float32,
    delta_base,
    delta_layout,
    rebuilt,
)
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.records import CheckpointInfo
from fedmeki_core.wire import TensorSpec, iter_tensors, safetensors_header

Array = np.ndarray[Any, Any]


def uses_delta_downloads(spec: JobSpec) -> bool:
    return spec.downloads == "delta"


def delta_path(artifacts: Artifacts, job_id: str, round_number: int) -> Path:
    return artifacts.checkpoint_path(job_id, 0).with_name(f"download-delta-{round_number:05d}.safetensors")


def residual_path(artifacts: Artifacts, job_id: str, round_number: int) -> Path:
    return artifacts.checkpoint_path(job_id, 0).with_name(f"download-residual-{round_number:05d}.safetensors")


def committed_tensors(
    artifacts: Artifacts,
    job_id: str,
    spec: JobSpec,
    number: int,
    base: CheckpointInfo,
    order: Sequence[TensorSpec],
    steps: Iterable[tuple[Array, Array]],
) -> Iterator[Array]:
    """Checkpoint `number`'s tensors, C_b + decode(E), from each tensor's C_b and aggregate (`steps`, in `order`,
    the order of checkpoint `base`), writing E and the new residual as they pass; both files appear once the last
    tensor is taken. One tensor at a time."""
    encoding = DeltaEncoding.of(spec)
    parts = delta_layout(order, encoding)
    residuals = as_float32(order)
    held_path = residual_path(artifacts, job_id, base.round)
    held = iter_tensors(held_path) if held_path.is_file() else None
    metadata = {BASE_ROUND_KEY: str(base.round), BASE_SHA256_KEY: base.sha256}
    delta = delta_path(artifacts, job_id, number)
    with (
        atomic_write(delta, reuse=artifacts.claim_pooled(_bytes(parts)), durable=False) as delta_file,
        atomic_write(
            residual_path(artifacts, job_id, number), reuse=artifacts.claim_pooled(_bytes(residuals))
        ) as residual_file,
    ):
        delta_file.write(safetensors_header(parts, metadata))
        residual_file.write(safetensors_header(residuals))
        for index, (tensor, (old, new)) in enumerate(zip(order, steps, strict=True)):
            change = _difference(new, old)
            if held is not None:
                change += next(held)[1]
            arrays, sent = encode_tensor(change, _part(parts, index), encoding)
            committed = rebuilt(old, sent)
            if not bool(np.isfinite(committed).all()):
                raise AggregationError(f"the new value of tensor {tensor.name!r} is not finite in {old.dtype}")
            for array in arrays:
                delta_file.write(np.ascontiguousarray(array).data.cast("B"))
            # What the committed tensor lacks of the aggregate (plus the old residual), the encoding's and the add's
            # rounding both: the next round sends it.
            change -= _difference(committed, old)
            residual_file.write(np.ascontiguousarray(change).data.cast("B"))
            yield committed


def _bytes(layout: Sequence[TensorSpec]) -> int:
    return sum(spec.nbytes for spec in layout)


def _difference(new: Array, old: Array) -> Array:
    """new - old as float32 (a float32 tensor's directly, others through float64)."""
    if new.dtype == old.dtype == np.float32:
        return np.subtract(new, old)
    wide: Array = new.astype(np.float64) - old.astype(np.float64)
    return wide.astype(np.float32)


def _part(parts: Sequence[TensorSpec], index: int) -> EncodedPart:
    part = parts[2 * index]  # values first, then the scales or indices
    assert isinstance(part, EncodedPart)
    return part


def drop_earlier_deltas(artifacts: Artifacts, job_id: str, number: int) -> None:
    """Round `number` committed: the deltas and residuals of earlier checkpoints are no longer read."""
    folder = artifacts.checkpoint_path(job_id, 0).parent
    for kind in ("delta", "residual"):
        for path in folder.glob(f"download-{kind}-*.safetensors"):
            if int(path.name.rsplit("-", 1)[1].split(".")[0]) < number:
                with suppress(FileNotFoundError):  # let go meanwhile by another commit's retention
                    artifacts.recycle(path)


@dataclass(frozen=True)
class DeltaSource:
    """A checkpoint's delta file, ready to stream: the checkpoint it rebuilds and the base it changes."""

    checkpoint: CheckpointInfo
    base_round: int
    path: Path
    size_bytes: int
    sha256: str


class DeltaSources:
    """Which silo download can be a delta: the checkpoint's delta exists and changes exactly the checkpoint the
    silo holds. A delta's sha256 is computed on its first request and remembered (the file never changes)."""

    def __init__(self, artifacts: Artifacts) -> None:
        self._artifacts = artifacts
        self._digests: dict[str, tuple[tuple[str, int, int], str]] = {}  # job -> its newest delta's (file, sha256)
        self._lock = threading.Lock()

    def source(self, checkpoint: CheckpointInfo, base_round: int, base_sha256: str) -> DeltaSource | None:
        path = delta_path(self._artifacts, checkpoint.job_id, checkpoint.round)
        try:
            if delta_base(path) != (base_round, base_sha256):
                return None
            stat = path.stat()
        except FileNotFoundError:  # no delta of this checkpoint (a full-download job, round 0, or expired)
            return None
        except InvalidUpdateError:  # its header lost to a power loss (it is not fsynced): the whole checkpoint goes
            return None
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            known, sha256 = self._digests.get(checkpoint.job_id, (None, ""))
        if known != key:
            sha256 = sha256_file(path)
            with self._lock:
                self._digests[checkpoint.job_id] = (key, sha256)
        return DeltaSource(checkpoint, base_round, path, stat.st_size, sha256)
