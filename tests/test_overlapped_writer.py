"""OverlappedHashingWriter: the same bytes and digest as HashingWriter, the caller's memory free after each write,
errors (a full disk) raised to the caller, and no thread left behind."""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

import numpy as np
import pytest

from fedmeki_core.errors import StorageFullError
from fedmeki_core.files import HashingWriter, atomic_write, space_checked
from fedmeki_core.overlapped_writer import PIECE_BYTES, OverlappedHashingWriter


def _pieces() -> list[bytes]:
    rng = np.random.default_rng(7)
    sizes = [0, 1, 2047, 2048, 70_000, PIECE_BYTES - 1, PIECE_BYTES, PIECE_BYTES + 5, 3 * PIECE_BYTES + 17, 8]
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]


@pytest.fixture
def running() -> set[int]:
    """The threads running when the test starts (another test's coordinator may still be ending in this process)."""
    return {id(t) for t in threading.enumerate()}


def _writer_threads(running: set[int]) -> list[threading.Thread]:
    """Writer threads started by the test and still running."""
    return [t for t in threading.enumerate() if t.name in ("fedmeki-hash", "fedmeki-write") and id(t) not in running]


def test_same_bytes_and_digest_as_hashing_writer(tmp_path: Path, running: set[int]) -> None:
    pieces = _pieces()
    plain, overlapped = io.BytesIO(), tmp_path / "overlapped.bin"
    reference = HashingWriter(plain)
    for piece in pieces:
        reference.write(piece)
    with atomic_write(overlapped) as f, OverlappedHashingWriter(f, depth=2) as writer:
        for piece in pieces:
            assert writer.write(memoryview(piece)) == len(piece)
    assert overlapped.read_bytes() == plain.getvalue()
    assert writer.hexdigest() == reference.hexdigest() == hashlib.sha256(plain.getvalue()).hexdigest()
    assert not _writer_threads(running)


def test_the_caller_may_reuse_its_buffer_after_each_write(tmp_path: Path) -> None:
    """As iter_tensors does: one buffer, overwritten for every tensor; what was written is what it held then."""
    buffer = np.zeros(PIECE_BYTES // 2 + 3, dtype=np.uint8)
    expected = hashlib.sha256()
    target = tmp_path / "reused.bin"
    written = bytearray()
    with target.open("wb") as f, OverlappedHashingWriter(f) as writer:
        for value in range(40):
            buffer.fill(value)
            writer.write(buffer.data.cast("B"))
            expected.update(buffer.tobytes())
            written += buffer.tobytes()
    assert target.read_bytes() == bytes(written)
    assert writer.hexdigest() == expected.hexdigest()


def test_a_full_disk_reaches_the_caller_as_storage_full_and_stops_the_writer(running: set[int]) -> None:
    """/dev/full refuses every write with ENOSPC, as a full filesystem does: raised at a later write or at the
    block's end, where `space_checked` (as in atomic_write) makes it StorageFullError."""
    with (
        open("/dev/full", "wb", buffering=0) as full,
        pytest.raises(StorageFullError),
        space_checked("a checkpoint"),
        OverlappedHashingWriter(full, depth=2) as writer,
    ):
        for _ in range(50):  # not all 50 are taken: the failure stops the writing
            writer.write(bytes(PIECE_BYTES))
    assert not _writer_threads(running)


def test_an_exception_in_the_block_passes_and_the_threads_end(tmp_path: Path, running: set[int]) -> None:
    with (
        pytest.raises(ValueError, match="computing failed"),
        (tmp_path / "cut.bin").open("wb") as f,
        OverlappedHashingWriter(f) as writer,
    ):
        writer.write(b"header")
        raise ValueError("computing failed")
    assert not _writer_threads(running)
    open_writer = OverlappedHashingWriter(io.BytesIO())
    with pytest.raises(RuntimeError, match="once the writer is closed"):
        open_writer.hexdigest()
    open_writer.close()
    assert not _writer_threads(running)
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"more")  # after its block: refused, not queued for threads that have ended
