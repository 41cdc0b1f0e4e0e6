"""Validating a safetensors byte stream while it arrives (`SafetensorsStreamValidator`).

The header length is capped, names, dtypes and shapes must match the round's manifest, data offsets must tile the
data section, and every value must be finite and within the job's update limits. Validation needs memory for one
chunk, never for a whole tensor. The format itself is fedmeki_core/wire.py.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidUpdateError, LimitExceededError
from fedmeki_core.wire import (
    DEFAULT_MAX_HEADER_BYTES,
    DTYPES,
    HEADER_PREFIX_BYTES,
    TensorSpec,
    header_bound,
    local_steps,
    manifest_from_header,
    parse_header_json,
    untrained_tensors,
)


@dataclass(frozen=True)
class _Span:
    spec: TensorSpec
    start: int
    end: int


class ExpectedLayout:
    """What an update of `manifest` must look like, derived once for all of a job's uploads: its tensors by name,
    the longest header it may have (`header_bound`), and the header entries of the usual file, which stores the
    tensors in the manifest's order. A header with exactly those entries is checked by one comparison (hundreds
    of silos upload the same layout each round); any other header is checked entry by entry."""

    def __init__(self, manifest: Sequence[TensorSpec]) -> None:
        self.specs = {spec.name: spec for spec in manifest}
        self._manifest = manifest
        self._usual_entries: dict[str, dict[str, Any]] = {}
        spans = []
        offset = 0
        for spec in manifest:
            end = offset + spec.nbytes
            self._usual_entries[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, end],
            }
            if end > offset:  # empty tensors have no bytes to check
                spans.append(_Span(spec, offset, end))
            offset = end
        self._usual_spans = spans
        self._last: tuple[bytes, dict[str, Any], list[_Span] | None] | None = None

    @functools.cached_property
    def max_header_bytes(self) -> int:
        """Computed when first asked (a JSON dump of the manifest): by the validator, not by the fold."""
        return header_bound(self._manifest)

    def read_header(self, raw: bytes) -> tuple[dict[str, Any], list[_Span] | None]:
        """The header JSON `raw` parsed (`parse_header_json`) and its `usual_spans`, remembered for the last header
        read: hundreds of silos send the same bytes every round, and a header read again costs one comparison instead
        of a parse (at 256 silos the parses were a tenth of the coordinator's GIL time, upload and fold together).
        The dict is shared: its readers do not change it."""
        last = self._last
        if last is not None and last[0] == raw:
            return last[1], last[2]
        header = parse_header_json(raw)
        spans = self.usual_spans(header)
        self._last = (raw, header, spans)
        return header, spans

    def usual_spans(self, header: dict[str, Any]) -> list[_Span] | None:
        """The byte spans of a header (checked by `parse_header_json`: exact integers, no booleans) whose entries
        are the usual file's, else None."""
        entries = dict(header)
        entries.pop("__metadata__", None)
        return self._usual_spans if entries == self._usual_entries else None


class SafetensorsStreamValidator:
    """Validates a safetensors byte stream against a manifest as its bytes arrive.

    Feed the bytes in order with `feed`; call `finish` when the stream ends. Every violation raises
    InvalidUpdateError (or LimitExceededError for an oversized header) naming the problem. `header_check`, when
    given, is called with the parsed header before its tensors are checked (e.g. a ciphertext file's metadata).
    `max_abs_value` and `max_norm` bound every value's magnitude and the L2 norm of all the values (a job's
    `max_abs_value` and `max_update_norm`, fedmeki_core/algorithms/update_limits.py).
    `value_check`, when given, is called with each manifest entry's whole elements as they pass, in stored order (an
    encoded delta's scales and indices, fedmeki_core/encodings.py).
    """

    def __init__(
        self,
        manifest: ExpectedLayout | Sequence[TensorSpec] | None,
        total_size: int,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        header_check: Callable[[dict[str, Any]], None] | None = None,
        max_abs_value: float | None = None,
        max_norm: float | None = None,
        value_check: Callable[[TensorSpec, memoryview], None] | None = None,
    ) -> None:
        self._header_check = header_check
        self._value_check = value_check
        self._max_abs_value = max_abs_value
        self._max_norm = max_norm
        self._squares = 0.0  # sum of the squared values so far, in float64
        # No manifest: the file defines it (an initial checkpoint); layout and values are still checked.
        layout = manifest if manifest is None or isinstance(manifest, ExpectedLayout) else ExpectedLayout(manifest)
        self._layout = layout
        self._manifest = None if layout is None else layout.specs
        self._total_size = total_size
        self._max_header_bytes = max_header_bytes if layout is None else min(max_header_bytes, layout.max_header_bytes)
        self._received = 0
        self._head = bytearray()  # prefix + header JSON, until parsed
        self._header_end: int | None = None
        self._spans: list[_Span] = []
        self._span_index = 0
        self._carry = b""  # bytes of an element split across chunks

    @property
    def received(self) -> int:
        return self._received

    def feed(self, data: bytes) -> None:
        if self._received + len(data) > self._total_size:
            raise InvalidUpdateError(f"stream carries more than the declared {self._total_size} bytes")
        self._received += len(data)
        if self._header_end is None:
            self._head += data
            data = self._try_parse_header()
            if self._header_end is None:
                return
        self._check_data(data)

    def finish(self) -> None:
        if self._received < self._total_size:
            raise InvalidUpdateError(
                f"upload truncated: received {self._received} of {self._total_size} declared bytes"
            )
        if self._header_end is None or self._span_index < len(self._spans) or self._carry:
            raise InvalidUpdateError("upload truncated: stream ended inside a tensor")

    def _try_parse_header(self) -> bytes:
        if len(self._head) < HEADER_PREFIX_BYTES:
            return b""
        (length,) = struct.unpack("<Q", self._head[:HEADER_PREFIX_BYTES])
        if HEADER_PREFIX_BYTES + length > self._total_size:
            raise InvalidUpdateError(
                f"not a safetensors stream: its header length {length} exceeds the declared size {self._total_size}"
            )
        if length > self._max_header_bytes:
            raise LimitExceededError(
                f"safetensors header of {length} bytes exceeds the limit of {self._max_header_bytes}"
            )
        end = HEADER_PREFIX_BYTES + length
        if len(self._head) < end:
            return b""
        raw = bytes(self._head[HEADER_PREFIX_BYTES:end])
        header, usual = (parse_header_json(raw), None) if self._layout is None else self._layout.read_header(raw)
        if self._header_check is not None:
            self._header_check(header)
        rest = bytes(self._head[end:])
        self._head = bytearray()
        self._header_end = end
        self._spans = self._plan_spans(header, usual)
        data_size = self._spans[-1].end if self._spans else 0
        if end + data_size != self._total_size:
            raise InvalidUpdateError(
                f"declared total size {self._total_size} does not match the file's layout ({end + data_size} bytes)"
            )
        return rest

    def _plan_spans(self, header: dict[str, Any], usual: list[_Span] | None) -> list[_Span]:
        local_steps(header)  # malformed: refused here, before it can reach the aggregate
        untrained = untrained_tensors(header)
        if usual is not None and self._manifest is not None and untrained <= self._manifest.keys():
            return usual
        names = {name for name in header if name != "__metadata__"}
        if self._manifest is None:
            self._manifest = {spec.name: spec for spec in manifest_from_header(header)}
        unknown = sorted((names | untrained) - self._manifest.keys())
        if unknown:
            raise InvalidUpdateError(f"tensor {unknown[0]!r} is not in the round's manifest")
        missing = sorted(self._manifest.keys() - names)
        if missing:
            raise InvalidUpdateError(f"missing tensor {missing[0]!r} required by the round's manifest")
        spans = []
        for name in names:
            entry, spec = header[name], self._manifest[name]
            if entry["dtype"] != spec.dtype:
                raise InvalidUpdateError(f"tensor {name!r} has dtype {entry['dtype']}, the manifest says {spec.dtype}")
            if [int(d) for d in entry["shape"]] != list(spec.shape):
                raise InvalidUpdateError(
                    f"tensor {name!r} has shape {list(entry['shape'])}, the manifest says {list(spec.shape)}"
                )
            start, end = (int(v) for v in entry["data_offsets"])
            if end - start != spec.nbytes:
                raise InvalidUpdateError(
                    f"tensor {name!r}: data_offsets span {end - start} bytes, its shape needs {spec.nbytes}"
                )
            spans.append(_Span(spec, start, end))
        spans.sort(key=lambda s: (s.start, s.end))  # empty tensors first at a shared offset
        position = 0
        for span in spans:
            if span.start != position:
                raise InvalidUpdateError(f"tensor {span.spec.name!r}: data_offsets overlap or leave a gap")
            position = span.end
        return [span for span in spans if span.end > span.start]  # empty tensors have no bytes to check

    def _check_data(self, data: bytes) -> None:
        assert self._header_end is not None
        position = self._received - len(data) - self._header_end  # data-section offset of data[0]
        view = memoryview(self._carry + data)
        position -= len(self._carry)
        self._carry = b""
        # Consecutive tensors of one dtype are checked as one array: a model of many small tensors costs a few
        # numpy calls a chunk, not a few per tensor.
        run: list[tuple[_Span, int, int]] = []  # tensors of one dtype and where their whole elements lie in `view`
        at = 0
        while at < len(view) and self._span_index < len(self._spans):
            span = self._spans[self._span_index]
            take = min(len(view) - at, span.end - position)
            size, _ = DTYPES[span.spec.dtype]
            usable = take - take % size
            if run and run[-1][0].spec.dtype != span.spec.dtype:
                self._check_run(view, run)
                run = []
            if usable:
                run.append((span, at, at + usable))
            if usable < take:  # an element split across chunks: keep its bytes for the next feed
                self._carry = bytes(view[at + usable : at + take])
                break
            at += take
            position += take
            if position == span.end:
                self._span_index += 1
        self._check_run(view, run)

    def _check_run(self, view: memoryview, run: list[tuple[_Span, int, int]]) -> None:
        if not run:
            return
        check_dtype = DTYPES[run[0][0].spec.dtype][1]
        if check_dtype is not None:
            if not _finite(run[0][0].spec.dtype, np.frombuffer(view[run[0][1] : run[-1][2]], dtype=check_dtype)):
                for span, start, end in run:  # which tensor: the error names it
                    _require_finite(span.spec, np.frombuffer(view[start:end], dtype=check_dtype))
            if self._max_abs_value is not None or self._max_norm is not None:
                for span, start, end in run:
                    self._check_bounds(span.spec, np.frombuffer(view[start:end], dtype=check_dtype))
        if self._value_check is not None:
            for span, start, end in run:
                self._value_check(span.spec, view[start:end])

    def _check_bounds(self, spec: TensorSpec, values: np.ndarray[Any, Any]) -> None:
        if spec.dtype == "BF16":  # the top half of a float32
            values = np.left_shift(values.astype(np.uint32), 16).view(np.float32)
        wide = values.astype(np.float64)
        refuse_over_max_abs(spec.name, wide, self._max_abs_value)
        self._squares += float(np.dot(wide, wide))
        if self._max_norm is not None and math.sqrt(self._squares) > self._max_norm:  # the sum only grows
            raise InvalidUpdateError(
                f"the update's L2 norm exceeds the job's max_update_norm {self._max_norm} (at tensor {spec.name!r})"
            )


def _finite(dtype: str, values: np.ndarray[Any, Any]) -> bool:
    if dtype == "BF16":
        return bool(((values & 0x7F80) != 0x7F80).all())
    return bool(np.isfinite(values).all())


def _require_finite(spec: TensorSpec, values: np.ndarray[Any, Any]) -> None:
    if not _finite(spec.dtype, values):
        raise InvalidUpdateError(f"tensor {spec.name!r} contains NaN or Inf values")


def refuse_over_max_abs(name: str, values: np.ndarray[Any, Any], max_abs_value: float | None) -> None:
    """InvalidUpdateError when a value of tensor `name` is larger in magnitude than the job's max_abs_value."""
    if max_abs_value is not None and values.size and (top := float(np.abs(values).max())) > max_abs_value:
        raise InvalidUpdateError(
            f"tensor {name!r} holds a value of magnitude {top:.6g}, over the job's max_abs_value {max_abs_value}"
        )
