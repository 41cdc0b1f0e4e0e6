"""Receiving a chunked safetensors stream: validate while reading, spool to disk, check size and sha256."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from coordinator.artifacts import Spool
from coordinator.store.views import MAX_METRIC_NAME, MAX_METRICS_SHOWN
from fedmeki_core.algorithms.update_limits import UpdateLimits
from fedmeki_core.encodings import EncodedPart, EncodedValuesCheck
from fedmeki_core.errors import InvalidInputError, InvalidUpdateError, LimitExceededError, TruncatedUpdateError
from fedmeki_core.stream_validation import ExpectedLayout, SafetensorsStreamValidator

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ProgressCallback = Callable[[int, int], None]  # (received bytes, total bytes)


MAX_METRICS = MAX_METRICS_SHOWN  # metric names one update or evaluation may carry (a fedmeki final evaluation: 207)
MAX_METRIC_MAGNITUDE = 1e12  # a metric's value, so that sample-weighted sums stay finite
_METRIC_NAME = re.compile(r"[A-Za-z0-9_.:/\-]+")


def check_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """A silo's metrics, checked at the door: at most MAX_METRICS names of at most MAX_METRIC_NAME plain characters
    (letters, digits, `_ . : / -`), each value finite and at most MAX_METRIC_MAGNITUDE in magnitude."""
    if len(values) > MAX_METRICS:
        raise InvalidInputError(f"metrics: {len(values)} names, at most {MAX_METRICS} are allowed")
    for name, value in values.items():
        if len(name) > MAX_METRIC_NAME or not _METRIC_NAME.fullmatch(name):
            raise InvalidInputError(
                f"metrics: name {name[:40]!r} must be 1 to {MAX_METRIC_NAME} letters, digits or _ . : / -"
            )
        if not math.isfinite(value) or abs(value) > MAX_METRIC_MAGNITUDE:
            raise InvalidInputError(
                f"metrics: {name!r} must be finite and at most {MAX_METRIC_MAGNITUDE:g}, got {value}"
            )
    return dict(values)


def check_declared(what: str, total_size: int, sha256: str, limit: int) -> None:
    if total_size <= 0:
        raise InvalidInputError(f"{what}: total size must be positive, got {total_size}")
    if total_size > limit:
        raise LimitExceededError(f"{what}: declared size {total_size} bytes exceeds the limit of {limit}")
    check_sha256(what, sha256)


def check_sha256(what: str, sha256: str) -> None:
    if not _SHA256.match(sha256):
        raise InvalidInputError(f"{what}: sha256 must be 64 lowercase hex digits")


class Receiver:
    """Receives a chunked safetensors stream into `spool`, validating as chunks come: `feed` each chunk (a message
    with `offset` and `data`), then `finish`. Blocking work (file writes, parsing): call it off the event loop.

    A spool resuming an interrupted upload holds its first bytes already: the chunks continue after them.
    Raises InvalidUpdateError (or LimitExceededError) on the first problem; after `finish` the spool holds
    exactly the declared bytes with the declared digest (not yet fsynced). `layout` is what the bytes must match
    (the job's, derived once; None: the file defines it, as a ciphertext's does). `header_check` is the stream
    validator's (a ciphertext upload's header against the job's manifest and context); `limits` the job's bounds
    on the update's values.
    """

    def __init__(
        self,
        spool: Spool,
        layout: ExpectedLayout | None,
        total_size: int,
        sha256: str,
        max_header_bytes: int,
        progress: ProgressCallback | None = None,
        progress_every: int = 8 << 20,
        header_check: Callable[[dict[str, Any]], None] | None = None,
        limits: UpdateLimits | None = None,
    ) -> None:
        limits = limits or UpdateLimits()
        encoded = layout is not None and any(isinstance(spec, EncodedPart) for spec in layout.specs.values())
        self._validator = SafetensorsStreamValidator(  # an encoded update's bounds hold for what it decodes to
            layout,
            total_size,
            max_header_bytes,
            header_check,
            None if encoded else limits.max_abs_value,
            None if encoded else limits.max_update_norm,
            EncodedValuesCheck(limits.max_abs_value, limits.max_update_norm),
        )
        self._spool = spool
        self._total_size = total_size
        self._sha256 = sha256
        self._progress = progress
        self._progress_every = progress_every
        for block in spool.replay():  # a resumed upload: what the interrupted one left, checked again
            self._validator.feed(block)
        self._next_report = progress_every

    def feed(self, chunk: Any) -> None:
        spool = self._spool
        if chunk.offset != spool.size:
            raise InvalidUpdateError(f"chunk at offset {chunk.offset}, expected {spool.size}")
        self._validator.feed(chunk.data)
        spool.write(chunk.data)
        if self._progress is not None and spool.size >= self._next_report:
            self._progress(spool.size, self._total_size)
            self._next_report = spool.size + self._progress_every

    def finish(self) -> None:
        spool = self._spool
        if spool.size < self._total_size:  # the stream ended early, as a killed silo's does: what came is sound so far
            raise TruncatedUpdateError(f"upload truncated: received {spool.size} of {self._total_size} declared bytes")
        self._validator.finish()
        if spool.sha256 != self._sha256:
            raise InvalidUpdateError(
                f"sha256 mismatch: received bytes hash to {spool.sha256}, header says {self._sha256}"
            )
        if self._progress is not None:
            self._progress(spool.size, self._total_size)
