"""Streaming accumulation of a round's deltas: one weighted running sum per tensor, O(model) memory.

Each accepted update is folded in once, tensor by tensor, read from its spooled file with plain reads into one
reused buffer, so the coordinator holds the sums plus one tensor, whatever the number of silos, and no file is
memory-mapped (mapped pages would count against its resident memory).

Updates are folded in one fixed order, the round's selected silos sorted by id, whatever order they arrive in:
floating-point addition is not associative, and a fixed order makes the new checkpoint the same bits in every
run, after any restart. An update that arrives ahead of its turn waits (as a file on disk) until the silos
before it have arrived, or until the round closes without them.

A model whose float64 sums would pass `running_sum_bytes` (the coordinator's `running_sum_bytes`) is summed at
close instead, when its updates are plain floats: the updates wait as files (as the ones ahead of their turn do) and
each tensor's sum is made, when the next checkpoint is written, from every update's file a block at a time, in the
same order and with the same float64 operations as the running sum: the same bits, with one tensor's sum in memory
instead of the model's.

The sums, the mean and the server step are float64 whatever the model's dtype, so no set of finite updates can
overflow them; the new value of each tensor is cast back to the checkpoint's dtype and must be finite there, or the
round fails (AggregationError) with the reason. An update that cannot be folded fails the round too: an update
with a receipt is in the aggregate or its round does not commit.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Iterator, Sequence
from io import RawIOBase
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.robust_round import NUMPY_DTYPES, RobustRound, UpdateFile
from coordinator.sum_buffers import SumBuffers
from fedmeki_core.algorithms import ServerAlgorithm
from fedmeki_core.algorithms.base import ServerState
from fedmeki_core.algorithms.robust import RobustAggregation
from fedmeki_core.algorithms.update_limits import capped_shares
from fedmeki_core.encodings import DeltaEncoding, iter_deltas
from fedmeki_core.errors import FedmekiError, InvalidInputError
from fedmeki_core.jobspec import DifferentialPrivacySpec
from fedmeki_core.privacy.dp import clip_factor, l2_norm
from fedmeki_core.stream_validation import ExpectedLayout
from fedmeki_core.wire import (
    TensorSpec,
    iter_tensors,
    local_steps,
    parse_header_json,
    read_exactly,
    read_header_bytes,
    read_layout,
    untrained_tensors,
)

# float64 values: 8 MiB. Each chunk's two numpy calls release the GIL and must take it back, which costs up to the
# 5 ms switch interval while the event loop thread runs Python: 256 KiB chunks made a 10M fold take 1.6 s beside a
# busy thread (25 ms alone); 8 MiB ones 0.14 s (33 ms alone). A few reacquisitions per tensor, not hundreds.
_FOLD_CHUNK = 1 << 20


class AggregationError(FedmekiError):
    """The round cannot produce a usable checkpoint (an update cannot be folded, or a new value is not finite):
    the round and its job fail with this reason. Nothing a retry would change."""


class RoundAccumulator:
    """The running sum of one round. With central DP (`dp`), each update is clipped to `dp.clip_norm` before it
    is added, and the mean gets Gaussian noise of std `dp.noise_multiplier * dp.clip_norm / updates`.

    `robust` (fedmeki_core/algorithms/robust.py): `clip` clips each update like central DP (the job spec allows
    one of the two) and keeps the weighted mean; the whole-round methods fold nothing and compute each tensor's
    delta from the update files when the round closes (`coordinator/robust_round.py`).

    `max_silo_weight` (fedmeki_core/algorithms/update_limits.py) caps each update's share of the round's weight:
    the shares are known only when the round closes, so updates wait (as files) and are folded then.
    """

    def __init__(
        self,
        manifest: list[TensorSpec],
        order: Sequence[str],
        dp: DifferentialPrivacySpec | None = None,
        robust: RobustAggregation | None = None,
        max_silo_weight: float | None = None,
        encoding: DeltaEncoding | None = None,
        buffers: SumBuffers | None = None,
        running_sum_bytes: int | None = None,
    ) -> None:
        self._dp = dp
        self._encoding = encoding or DeltaEncoding()
        self._max_silo_weight = max_silo_weight
        self._failure: BaseException | None = None  # a fold that failed: the accumulator is unusable
        self._robust = robust or RobustAggregation()
        self._clip_norm = dp.clip_norm if dp else self._robust.clip_norm if self._robust.method == "clip" else None
        self._manifest = manifest
        self._kept: dict[str, Path] = {}  # whole-round methods: the updates, read back when the round closes
        self._order = sorted(order)
        self._next = 0  # position in `_order` of the next silo to fold
        self._waiting: dict[str, tuple[Path, float]] = {}
        self._dtypes = {spec.name: spec.dtype for spec in manifest}
        self._largest = max((math.prod(spec.shape) for spec in manifest), default=0)
        # Each delta is read as float32 (float64 for a float64 tensor): every other float dtype widens to it exactly,
        # and the fold widens it to float64 chunk by chunk, in one pass over the running sum.
        self._exact = {spec.name: "F64" if spec.dtype == "F64" else "F32" for spec in manifest}
        # Every tensor's sum is a view of one float64 buffer (`_flat`, from `buffers`, at the first fold), at its
        # place in the manifest's order; `_sums` holds the views of the tensors folded so far.
        self._buffers = buffers or SumBuffers(0)
        self._offsets: dict[str, int] = {}
        self._size = 0
        for spec in manifest:
            self._offsets[spec.name] = self._size
            self._size += math.prod(spec.shape)
        self._sums: dict[str, np.ndarray[Any, Any]] = {}
        self._flat: np.ndarray[Any, Any] | None = None
        self._whole = False  # every tensor's sum begun by one fold of the whole buffer (`_add_flat`)
        self._released = False
        # The layout an update must have to be folded as one array (`_add_flat`): the manifest's; None: never.
        plain = not self._encoding.feedback and all(spec.dtype == "F32" for spec in manifest)
        self._flat_layout = ExpectedLayout(manifest) if plain else None
        # Summed at close (the module's docstring): each update's file and the factor it is summed with, in order.
        at_close = (
            running_sum_bytes is not None
            and 8 * self._size > running_sum_bytes
            and self._encoding.name == DeltaEncoding().name
            and not self._robust.whole_round
            and all(spec.dtype in NUMPY_DTYPES for spec in manifest)
        )
        self._at_close: list[tuple[UpdateFile, float]] | None = [] if at_close else None
        self._weights: dict[str, float] = {}  # per tensor: silos that did not train a tensor add no weight to it
        self._steps = (0.0, 0.0)  # (sum of weight x declared local steps, sum of those updates' weights)
        self._folded: set[str] = set()
        self._lock = threading.Lock()

    def offer(self, silo_id: str, update_path: Path, weight: float) -> None:
        """An accepted update: folded now if it is its turn (with any waiting ones after it), else kept waiting."""
        with self._lock:
            if self._released:  # its round committed or its job ended meanwhile: nothing reads the sums any more
                return
            self._require_usable()
            if silo_id not in self._folded:
                self._waiting[silo_id] = (update_path, weight)
            if self._max_silo_weight is not None:  # the shares need every weight: folded at close
                return
            while self._next < len(self._order) and self._order[self._next] in self._waiting:
                self._fold(self._order[self._next])
                self._next += 1

    def close(self) -> None:
        """No more updates will come: fold the waiting ones, in order, past the silos that never reported."""
        with self._lock:
            self._require_usable()
            if self._max_silo_weight is not None:
                waiting = [silo_id for silo_id in self._order if silo_id in self._waiting]
                shares = capped_shares([self._waiting[s][1] for s in waiting], self._max_silo_weight)
                for silo_id, share in zip(waiting, shares, strict=True):
                    self._waiting[silo_id] = (self._waiting[silo_id][0], share)
            for silo_id in self._order[self._next :]:
                if silo_id in self._waiting:
                    self._fold(silo_id)
            self._next = len(self._order)

    def _require_usable(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fold(self, silo_id: str) -> None:
        """Fold one waiting update; a failure leaves the accumulator unusable (its sums are partial): a data
        problem as AggregationError (the round fails), anything else as itself (the round is folded anew)."""
        update_path, weight = self._waiting.pop(silo_id)
        self._folded.add(silo_id)
        try:
            self._add(silo_id, update_path, weight)
        except (InvalidInputError, ArithmeticError, ValueError) as exc:
            message = exc.message if isinstance(exc, FedmekiError) else str(exc)
            self._failure = AggregationError(f"the update of silo {silo_id} cannot be aggregated: {message}")
            raise self._failure from exc
        except BaseException as exc:
            self._failure = exc
            raise

    def _add(self, silo_id: str, update_path: Path, weight: float) -> None:
        """Add `weight` times the update's tensors to the running sums, in float64 (the lock is held)."""
        if self._robust.whole_round:
            self._kept[silo_id] = update_path
            return
        scale = weight  # clipping scales the update, not its weight in the mean
        if self._clip_norm is not None:  # a first pass for the norm: the clip applies to the whole update
            scale *= clip_factor(l2_norm(self._deltas(update_path, self._dtypes)), self._clip_norm)
        raw, data_start = read_header_bytes(update_path)
        header, usual = (
            (parse_header_json(raw), None) if self._flat_layout is None else self._flat_layout.read_header(raw)
        )
        untrained = untrained_tensors(header)
        if (steps := local_steps(header)) is not None:
            self._steps = (self._steps[0] + weight * steps, self._steps[1] + weight)
        if self._at_close is not None:
            self._at_close.append((UpdateFile(update_path), scale))
            self._count_weight(weight, untrained)
            return
        if (
            not untrained
            and self._clip_norm is None
            and usual is not None
            and self._add_flat(update_path, data_start, scale)
        ):
            self._count_weight(weight, untrained)
            return
        scaled = np.empty(0, dtype=np.float64)  # one chunk of a delta times its weight, only while folding
        for spec, delta in self._deltas(update_path, self._exact):  # decoded or widened from the encoding
            if spec.name in untrained:
                continue
            if spec.name in self._sums:
                if not scaled.size:
                    scaled = np.empty(max(1, min(self._largest, _FOLD_CHUNK)), dtype=np.float64)
                _add_scaled(self._sums[spec.name].reshape(-1), delta.reshape(-1), scale, scaled)
            else:
                self._sums[spec.name] = np.multiply(delta, scale, out=self._view(spec), dtype=np.float64)
            self._weights[spec.name] = self._weights.get(spec.name, 0.0) + weight

    def _count_weight(self, weight: float, untrained: set[str]) -> None:
        """`weight` added to the weight of every tensor the update trained."""
        for spec in self._manifest:
            if spec.name not in untrained:
                self._weights[spec.name] = self._weights.get(spec.name, 0.0) + weight

    def _buffer(self) -> np.ndarray[Any, Any]:
        """The buffer every sum lives in, taken from `buffers` at the first fold."""
        if self._flat is None:
            self._flat = self._buffers.take(self._size)
        return self._flat

    def _view(self, spec: TensorSpec) -> np.ndarray[Any, Any]:
        """Where tensor `spec`'s sum lives in the buffer."""
        start = self._offsets[spec.name]
        return self._buffer()[start : start + math.prod(spec.shape)].reshape(spec.shape)

    def release(self) -> None:
        """The round is committed or dropped: its buffer goes back to `buffers` for another round. Skipped (the buffer
        left to the allocator) while a fold or a commit still holds the lock: a commit cut short by an error leaves
        its generator, and so the lock, until it is collected."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            flat, self._flat = self._flat, None
            self._sums.clear()
            self._released = True
        finally:
            self._lock.release()
        if flat is not None:
            self._buffers.give(flat)

    def _add_flat(self, update_path: Path, data_start: int, scale: float) -> bool:
        """The common case in one pass over the file instead of one per tensor (a model of many small tensors
        cost a few numpy calls per tensor and update): a float32 update that stores every tensor of a float32
        manifest in the manifest's order is one float32 array, folded into one float64 buffer that the per-tensor
        sums are views of. Element by element the same float64 operations as tensor by tensor: the same bits.
        The caller checked the update's header is the usual one; False (nothing done) where the sums were begun
        tensor by tensor."""
        if self._sums and not self._whole:
            return False
        first = not self._whole
        flat = self._buffer()
        chunk = np.empty(min(flat.size, _FOLD_CHUNK), dtype=np.float32)
        scratch = np.empty(0 if first else chunk.size, dtype=np.float64)
        with update_path.open("rb", buffering=0) as f:
            assert isinstance(f, RawIOBase)  # unbuffered: reads go straight into the chunk
            f.seek(data_start)
            for start in range(0, flat.size, chunk.size):
                values = chunk[: min(chunk.size, flat.size - start)]
                read_exactly(f, values.data.cast("B"), update_path, "its data section")
                if first:
                    np.multiply(values, scale, out=flat[start : start + values.size], dtype=np.float64)
                else:
                    _add_scaled(flat[start : start + values.size], values, scale, scratch)
        if first:
            self._whole = True
            for spec in self._manifest:
                self._sums[spec.name] = self._view(spec)
        return True

    def _deltas(self, update_path: Path, dtypes: dict[str, str]) -> Iterator[tuple[TensorSpec, np.ndarray[Any, Any]]]:
        """The update's tensors one at a time, decoded from the job's delta encoding into the manifest's dtypes."""
        return iter_deltas(update_path, self._manifest, self._encoding, dtypes)

    def next_global(
        self, current_checkpoint: Path, server: ServerAlgorithm, server_state: dict[str, ServerState]
    ) -> tuple[list[TensorSpec], Iterator[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]]:
        """The next global model: its tensor order and, lazily, each tensor's (current, next) values (server half
        on the mean delta). The current one is read from `current_checkpoint` once, for the step and for a caller
        that needs it too (a delta download's change), and is valid only until the next pair is produced.

        Consumes the sums as it goes, so memory falls as the checkpoint is written. `server_state` (tensor name ->
        slots) holds the previous round's server state and is updated in place as the tensors are produced.
        """
        self._require_usable()
        if not self._folded:
            raise ValueError("no update has been folded into this round")
        _, order = read_layout(current_checkpoint)
        try:
            server.begin_round(self._steps[0] / self._steps[1] if self._steps[1] > 0 else None)
        except InvalidInputError as exc:  # e.g. FedNova's updates declare no local steps
            raise AggregationError(exc.message) from None
        robust = (
            RobustRound([self._kept[s] for s in sorted(self._kept)], self._manifest, self._robust)
            if self._robust.whole_round
            else None
        )

        def steps() -> Iterator[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
            with self._lock:
                for spec, current in iter_tensors(current_checkpoint):
                    delta = self._mean_delta(spec, noise) if robust is None else robust.delta(spec)
                    if delta is None:  # no silo trained it this round: it stays, and so does its state
                        yield current, current
                        continue
                    wide = delta.astype(np.float64, copy=False)
                    state = server_state.setdefault(spec.name, {})
                    yield current, _finite_as(spec.name, server.apply(spec.name, current, wide, state), current.dtype)

        noise = np.random.default_rng(secrets.randbits(128))  # fresh OS entropy: the noise must not be guessable

        return order, steps()

    def _mean_delta(self, spec: TensorSpec, noise: np.random.Generator) -> np.ndarray[Any, Any] | None:
        """The weighted mean of the folded deltas of tensor `spec` (plus central DP's noise); None if none."""
        name = spec.name
        if self._at_close is not None:
            if name not in self._weights:
                return None
            mean_delta = self._sum_at_close(spec, self._at_close)
        elif name not in self._sums:
            return None
        else:
            mean_delta = self._sums.pop(name)
        mean_delta /= self._weights[name]
        if self._dp is not None and self._dp.noise_multiplier > 0:
            std = self._dp.noise_multiplier * self._dp.clip_norm / len(self._folded)
            mean_delta += noise.standard_normal(mean_delta.shape) * std
        return mean_delta

    @staticmethod
    def _sum_at_close(spec: TensorSpec, updates: list[tuple[UpdateFile, float]]) -> np.ndarray[Any, Any]:
        """Tensor `spec`'s weighted sum over `updates` (in order), a block of every update's file at a time: per
        value the running sum's float64 operations in its order (the first product, then each product added)."""
        total = np.empty(math.prod(spec.shape), dtype=np.float64)
        scaled = np.empty(min(total.size, _FOLD_CHUNK), dtype=np.float64)
        scratch = bytearray(scaled.nbytes)  # a block's stored bytes: at most 8 a value
        trained = [(update, scale) for update, scale in updates if spec.name not in update.untrained]
        for first in range(0, total.size, scaled.size):
            count = min(scaled.size, total.size - first)
            out = total[first : first + count]
            for index, (update, scale) in enumerate(trained):
                stored = update.read_stored(spec.name, first, count, scratch)
                if index == 0:
                    np.multiply(stored, scale, out=out, dtype=np.float64)
                else:
                    _add_scaled(out, stored, scale, scaled[:count])
        return total.reshape(spec.shape)


def _add_scaled(
    total: np.ndarray[Any, Any], delta: np.ndarray[Any, Any], scale: float, scratch: np.ndarray[Any, Any]
) -> None:
    """total += float64(delta) * scale, a chunk of `scratch`'s size at a time: the widened, scaled delta is never
    whole in memory, and the running sum is read and written once."""
    for start in range(0, total.size, scratch.size):
        stop = min(start + scratch.size, total.size)
        scaled = scratch[: stop - start]
        np.multiply(delta[start:stop], scale, out=scaled, dtype=np.float64)
        total[start:stop] += scaled


def _finite_as(name: str, value: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """`value` cast to the checkpoint's `dtype`; AggregationError when a value is not finite there."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf, refused just below
        cast = value.astype(dtype, copy=False)
    if not bool(np.isfinite(cast).all()):
        raise AggregationError(
            f"the new value of tensor {name!r} is not finite in {dtype} (an update or the noise is too large): "
            "the round cannot commit"
        )
    return cast
