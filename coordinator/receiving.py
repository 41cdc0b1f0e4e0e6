"""Receiving a chunked safetensors stream: validate while reading, spool to disk, check size and sha256."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from coordinator.artifacts import Spool
from fedmeki_core.encodings import EncodedValuesCheck
from fedmeki_core.errors import InvalidInputError, InvalidUpdateError, LimitExceededError, TruncatedUpdateError
from fedmeki_core.wire import SafetensorsStreamValidator, TensorSpec

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ProgressCallback = Callable[[int, int], None]  # (received bytes, total bytes)


def check_declared(what: str, total_size: int, sha256: str, limit: int) -> None:
    if total_size <= 0:
        raise InvalidInputError(f"{what}: total size must be positive, got {total_size}")
    if total_size > limit:
        raise LimitExceededError(f"{what}: declared size {total_size} bytes exceeds the limit of {limit}")
    check_sha256(what, sha256)


def check_sha256(what: str, sha256: str) -> None:
    if not _SHA256.match(sha256):
        raise InvalidInputError(f"{what}: sha256 must be 64 lowercase hex digits")


def receive(
    chunks: Iterable[Any],
    spool: Spool,
    manifest: list[TensorSpec] | None,
    total_size: int,
    sha256: str,
    max_header_bytes: int,
    progress: ProgressCallback | None = None,
    progress_every: int = 8 << 20,
    header_check: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Consume `chunks` (messages with `offset` and `data`) into `spool`, validating as they come.

    A spool resuming an interrupted upload holds its first bytes already: the chunks continue after them.
    Raises InvalidUpdateError (or LimitExceededError) on the first problem; on return the spool holds
    exactly the declared bytes with the declared digest (not yet fsynced). `header_check` is the stream
    validator's (a ciphertext upload's header against the job's manifest and context).
    """
    validator = SafetensorsStreamValidator(manifest, total_size, max_header_bytes, header_check, EncodedValuesCheck())
    for block in spool.replay():  # a resumed upload: what the interrupted one left, checked again
        validator.feed(block)
    next_report = progress_every
    for chunk in chunks:
        if chunk.offset != spool.size:
            raise InvalidUpdateError(f"chunk at offset {chunk.offset}, expected {spool.size}")
        validator.feed(chunk.data)
        spool.write(chunk.data)
        if progress is not None and spool.size >= next_report:
            progress(spool.size, total_size)
            next_report = spool.size + progress_every
    if spool.size < total_size:  # the stream ended early, as a killed silo's does: what came is sound so far
        raise TruncatedUpdateError(f"upload truncated: received {spool.size} of {total_size} declared bytes")
    validator.finish()
    if spool.sha256 != sha256:
        raise InvalidUpdateError(f"sha256 mismatch: received bytes hash to {spool.sha256}, header says {sha256}")
    if progress is not None:
        progress(spool.size, total_size)
