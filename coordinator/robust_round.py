"""Robust aggregation over a whole round (median, trimmed mean, Krum): the updates read back from their files.

These methods need every update at once, so nothing is folded while updates arrive; when the round closes, each
tensor's robust delta is computed from the spooled files, in blocks of `BLOCK_ELEMENTS` values per update, so
memory is O(updates x block) besides the tensor being produced, never O(updates x model). Updates are taken in
silo-id order, so the result does not depend on arrival order. An update counts for a tensor only if its silo
trained it (`fedmeki.untrained` in its header); a tensor no update trained stays as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import RawIOBase
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.algorithms.robust import (
    RobustAggregation,
    add_squared_distances,
    coordinate_median,
    krum_choice,
    trimmed_mean,
)
from fedmeki_core.wire import (
    TensorSpec,
    read_elements,
    read_exactly,
    read_header,
    read_layout,
    untrained_tensors,
)

BLOCK_ELEMENTS = 1 << 20
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
}  # the model's dtypes

Array = np.ndarray[Any, Any]


def _count(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64))


class UpdateFile:
    """One spooled update: where each tensor's bytes are, in which dtype, and which tensors its silo trained. Read
    by position, a block at a time (the robust methods here, a mean summed at close: coordinator/aggregation.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data_start, order = read_layout(path)
        self.untrained = untrained_tensors(read_header(path))
        self._tensors: dict[str, tuple[int, str, int]] = {}  # name -> (byte position, dtype, item size)
        position = data_start
        for spec in order:  # the upload's validator made the data offsets tile the data section in this order
            self._tensors[spec.name] = (position, spec.dtype, spec.nbytes // max(_count(spec), 1))
            position += spec.nbytes

    def read(self, name: str, first: int, out: Array) -> None:
        """Elements first .. first + out.size of tensor `name`, widened to out's dtype."""
        position, dtype, itemsize = self._tensors[name]
        with self.path.open("rb") as f:
            read_elements(f, position + first * itemsize, dtype, out)

    def read_stored(self, name: str, first: int, count: int, scratch: bytearray) -> Array:
        """Elements first .. first + count of tensor `name` in their stored dtype: a view of `scratch` (at least 8
        bytes a value), valid until its next use; no allocation."""
        position, dtype, itemsize = self._tensors[name]
        raw = memoryview(scratch)[: count * itemsize]
        with self.path.open("rb", buffering=0) as f:
            assert isinstance(f, RawIOBase)  # unbuffered: the bytes go straight into `scratch`
            f.seek(position + first * itemsize)
            read_exactly(f, raw, self.path, f"tensor {name!r}")
        return np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype])


class RobustRound:
    """The robust delta of each tensor of `manifest` (the model's), from the updates at `paths` (silo-id order)."""

    def __init__(self, paths: Sequence[Path], manifest: Sequence[TensorSpec], robust: RobustAggregation) -> None:
        self._files = [UpdateFile(path) for path in paths]
        self._robust = robust
        self._chosen = self._files[self._krum(manifest)] if robust.method == "krum" and self._files else None

    def delta(self, spec: TensorSpec) -> Array | None:
        """The robust delta of tensor `spec`, in its dtype, or None when no update trained it."""
        out = np.empty(_count(spec), dtype=NUMPY_DTYPES[spec.dtype])
        if self._chosen is not None:
            if spec.name in self._chosen.untrained:
                return None
            self._chosen.read(spec.name, 0, out)
            return out.reshape(spec.shape)
        files = [f for f in self._files if spec.name not in f.untrained]
        if not files:
            return None
        for first in range(0, out.size, BLOCK_ELEMENTS):
            stacked = self._stack(files, spec, first, min(BLOCK_ELEMENTS, out.size - first))
            if self._robust.method == "median":
                out[first : first + stacked.shape[1]] = coordinate_median(stacked)
            else:
                out[first : first + stacked.shape[1]] = trimmed_mean(stacked, self._robust.trim_fraction)
        return out.reshape(spec.shape)

    def _krum(self, manifest: Sequence[TensorSpec]) -> int:
        """Krum's choice among the updates, by squared distances summed over all the tensors they carry."""
        distances = np.zeros((len(self._files), len(self._files)))
        for spec in manifest:
            for first in range(0, _count(spec), BLOCK_ELEMENTS):
                count = min(BLOCK_ELEMENTS, _count(spec) - first)
                add_squared_distances(self._stack(self._files, spec, first, count), distances)
        return krum_choice(distances, self._robust.byzantine)

    def _stack(self, files: Sequence[UpdateFile], spec: TensorSpec, first: int, count: int) -> Array:
        stacked = np.empty((len(files), count), dtype=NUMPY_DTYPES[spec.dtype])
        for row, update in zip(stacked, files, strict=True):
            update.read(spec.name, first, row)
        return stacked
