"""Durable files: atomic writes (temp file, fsync, rename) and sha256 digests."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from fedmeki_core.errors import StorageFullError

_READ_BLOCK = 1 << 20
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HashingWriter:
    """Writes through to a file while hashing what passes, so a written file needs no second read."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self._digest = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self._digest.update(data)
        return self._target.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@contextmanager
def space_checked(what: str) -> Iterator[None]:
    """A full disk or quota (ENOSPC, EDQUOT) while writing `what` becomes StorageFullError; other errors pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise StorageFullError(f"no space left on disk to write {what}; retry once space is freed") from exc
        raise


@contextmanager
def atomic_write(path: Path, reuse: Path | None = None) -> Iterator[BinaryIO]:
    """Yield a file that appears at `path` whole, or not at all, once the block exits cleanly.

    With `reuse` (a file no longer needed), that file is overwritten in place instead of a new one being
    created: its pages are already in the kernel's page cache, which makes writing many times faster. A full
    disk raises StorageFullError and leaves no temp file and whatever `path` held before.
    """
    with space_checked(path.name):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        if reuse is not None and reuse.exists():
            os.close(fd)
            os.replace(reuse, tmp)
            fd = os.open(tmp, os.O_RDWR)
        try:
            with open(fd, "r+b") as f:
                yield f
                f.truncate(f.tell())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
