"""The float64 buffers that rounds' running sums live in, kept from one round to the next.

A round's sums are one float64 buffer of the model's size (8 bytes a parameter), written from the first fold to the
commit. A buffer the process has not touched costs a page fault per page on first write; on the virtual machines
measured here that was 2.3 ms per MiB (a 100M-parameter model's 763 MiB of sums: 2 s of each round's aggregation,
against 0.15 s to fold the same update into pages already touched; docs/benchmarks.md). A job's rounds all need a
buffer of the same size, so the buffer a committed round gives back serves the next round's first fold.

Kept buffers are bounded by `limit_bytes` (the coordinator's `sum_buffer_bytes`): one beyond it is left to the
allocator, as before. A buffer is handed out to one round at a time, whole; its content is garbage until that round's
first fold writes every value it reads.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


class SumBuffers:
    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._kept: list[Array] = []  # newest last
        self._lock = threading.Lock()

    def take(self, size: int) -> Array:
        """A float64 buffer of `size` values: a kept one of that size (the newest), else a new one."""
        with self._lock:
            for index in range(len(self._kept) - 1, -1, -1):
                if self._kept[index].size == size:
                    return self._kept.pop(index)
        return np.empty(size, dtype=np.float64)

    def give(self, buffer: Array) -> None:
        """Keep a buffer no round uses any more, dropping the oldest kept ones beyond the limit."""
        if buffer.nbytes > self._limit:
            return
        with self._lock:
            self._kept.append(buffer)
            while sum(kept.nbytes for kept in self._kept) > self._limit:
                self._kept.pop(0)

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(kept.nbytes for kept in self._kept)
