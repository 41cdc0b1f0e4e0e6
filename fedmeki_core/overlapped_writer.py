"""A hashing writer whose hashing and writing run beside the caller: a large file computed piece by piece (a
checkpoint, tensor by tensor) costs the longest of computing, hashing and writing instead of their sum.

numpy, hashlib (on pieces over 2 KiB) and file writes all release the GIL, so the three overlap on as many cores.
A 100M-parameter checkpoint's commit spent 45% of its time writing, 14% hashing and the rest computing, one after
the other (docs/benchmarks.md, "Hashing and writing beside the computing"). Pieces are copied, so a
caller may reuse its memory after each write; the copy costs a memcpy, far less than the hash or the write.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import BinaryIO

Data = bytes | memoryview

PIECE_BYTES = 1 << 20  # what one buffer holds: writes are gathered into pieces of this size
_SPARE_LIMIT = 8  # buffers kept for the next writers: fresh memory costs a page fault per page, each time


class _SpareBuffers:
    """PIECE_BYTES buffers that closed writers gave back, for the next ones (a checkpoint every round)."""

    def __init__(self) -> None:
        self._kept: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        with self._lock:
            if self._kept:
                return self._kept.pop()
        return bytearray(PIECE_BYTES)

    def give(self, buffers: list[bytearray]) -> None:
        with self._lock:
            self._kept += buffers[: max(0, _SPARE_LIMIT - len(self._kept))]


_SPARES = _SpareBuffers()


def _write_all(target: BinaryIO, piece: Data) -> None:
    """Every byte of `piece`: an unbuffered file may take fewer than it is given."""
    rest = memoryview(piece)
    while rest:
        rest = rest[target.write(rest) :]


class _Stage:
    """A thread that applies `work` to each piece given, in order; after a failure it only lets pieces pass."""

    def __init__(self, name: str, work: Callable[[Data], object], done: Callable[[], None]) -> None:
        self._work = work
        self._done = done
        self._pieces: queue.SimpleQueue[Data | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def give(self, data: Data) -> None:
        self._pieces.put(data)

    def stop(self) -> None:
        """Finish what was given, then end."""
        self._pieces.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (data := self._pieces.get()) is not None:
            if self.error is None:
                try:
                    self._work(data)
                except BaseException as exc:  # handed to the caller at its next write or at close
                    self.error = exc
            self._done()
            del data  # not held while waiting for the next piece


class OverlappedHashingWriter:
    """Writes through to `target` while hashing, as HashingWriter does, on two threads of its own. What is written
    is copied into one of `depth` buffers of PIECE_BYTES (writes are gathered and cut into pieces of that size; the
    buffers are kept for the next writer) before `write` returns, so the caller may reuse its memory at once, as
    with any write (a reader's reused buffer, say), and memory stays bounded. Use it as a context manager: leaving
    the block waits for every piece to be hashed and written and raises the first error either met (a full disk as
    the write raised it); a block left by an exception waits for the pieces given, then lets that exception pass.
    """

    def __init__(self, target: BinaryIO, depth: int = 3) -> None:
        self._digest = hashlib.sha256()
        self._buffers = [_SPARES.take() for _ in range(depth)]
        self._given = 0  # pieces handed over
        self._filling: memoryview | None = None  # the buffer being filled, and how far
        self._filled = 0
        self._room = threading.Semaphore(depth)
        self._passed_lock = threading.Lock()
        self._passed = [0, 0]  # pieces each stage has passed (both take them in the order given)
        self._hashing = _Stage("fedmeki-hash", self._digest.update, lambda: self._count(0))
        self._writing = _Stage("fedmeki-write", lambda piece: _write_all(target, piece), lambda: self._count(1))
        self._closed = False

    def write(self, data: Data) -> int:
        """Copy `data` into the buffer being filled; each full buffer goes to the threads (many small writes, a
        model of small tensors, cost one hand-over per PIECE_BYTES, not one each)."""
        if self._closed:
            raise ValueError("write to a closed OverlappedHashingWriter")
        self._raise_failure()
        rest = memoryview(data).cast("B")
        written = len(rest)
        while rest:
            if self._filling is None:
                self._room.acquire()  # the buffer used `depth` pieces ago is free: both stages passed that piece
                self._filling = memoryview(self._buffers[self._given % len(self._buffers)])
                self._filled = 0
            taken = min(len(rest), PIECE_BYTES - self._filled)
            self._filling[self._filled : self._filled + taken] = rest[:taken]
            self._filled += taken
            rest = rest[taken:]
            if self._filled == PIECE_BYTES:
                self._hand_over()
        return written

    def _hand_over(self) -> None:
        assert self._filling is not None
        piece = self._filling[: self._filled]
        self._filling = None
        self._given += 1
        self._hashing.give(piece)
        self._writing.give(piece)

    def _count(self, stage: int) -> None:
        """A stage passed its next piece: the buffer of a piece both have passed is free again."""
        with self._passed_lock:
            before = min(self._passed)
            self._passed[stage] += 1
            freed = min(self._passed) > before
        if freed:
            self._room.release()

    def hexdigest(self) -> str:
        if not self._closed:
            raise RuntimeError("the digest is known once the writer is closed")
        return self._digest.hexdigest()

    def close(self) -> None:
        """Wait for every piece given to be hashed and written (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._filling is not None:
            self._hand_over()
        self._hashing.stop()
        self._writing.stop()
        _SPARES.give(self._buffers)

    def _raise_failure(self) -> None:
        error = self._writing.error or self._hashing.error
        if error is not None:
            raise error

    def __enter__(self) -> OverlappedHashingWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
        if kind is None:
            self._raise_failure()
