"""Receiving a checkpoint download that may be interrupted: append, hash as the bytes arrive, verify, rename."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from fedmeki_core import convert
from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.files import fsync_dir, overwritable
from fedmeki_core.proto.v1 import common_pb2
from fedmeki_core.records import CheckpointInfo

_READ_BLOCK = 1 << 20


class ResumableDownload:
    """Bytes go to `destination.part`; a retry continues at `offset`. One pass of hashing in all.

    With `spare` (a file no longer needed) and nothing to resume, the bytes overwrite the spare in place
    (as `destination.reuse`): its pages are already in the page cache, which makes writing much faster. A
    `.reuse` file left by a crash holds stale bytes past its offset and is never resumed, only overwritten. A
    spare that another name links (a silo's held global model) is never overwritten.
    """

    def __init__(self, destination: Path, spare: Path | None = None) -> None:
        self.destination = destination
        self._partial = destination.with_name(destination.name + ".part")
        self._partial.parent.mkdir(parents=True, exist_ok=True)
        self._digest = hashlib.sha256()
        self.offset = 0
        self.info: CheckpointInfo | None = None
        reuse = destination.with_name(destination.name + ".reuse")
        if not self._partial.exists() and (overwritable(reuse) or (spare is not None and overwritable(spare))):
            if not reuse.exists():
                assert spare is not None
                spare.replace(reuse)
            self._partial = reuse
            return
        if self._partial.exists():  # left by an earlier process: hash what is there, continue after it
            with self._partial.open("rb") as f:
                while block := f.read(_READ_BLOCK):
                    self._digest.update(block)
                    self.offset += len(block)

    def consume(self, messages: Iterable[common_pb2.CheckpointChunk]) -> None:
        """Append one stream's chunks (requested from `offset`); raises what the stream raises."""
        self._partial.touch()
        with self._partial.open("r+b") as f:
            f.seek(self.offset)
            for message in messages:
                kind = message.WhichOneof("payload")
                if kind in ("checkpoint", "delta"):  # what the chunks are: a checkpoint, or a delta to rebuild one
                    self.info = convert.transfer_from_proto(message)
                    if self.offset > self.info.size_bytes:  # not a prefix of this checkpoint: start over
                        f.seek(0)
                        self._digest, self.offset = hashlib.sha256(), 0
                    continue
                if message.chunk.offset != self.offset:
                    raise InvalidUpdateError(f"chunk at offset {message.chunk.offset}, expected {self.offset}")
                f.write(message.chunk.data)
                self._digest.update(message.chunk.data)
                self.offset += len(message.chunk.data)

    def finish(self) -> CheckpointInfo:
        """Check size and sha256 against the server's metadata, then move the file into place."""
        with self._partial.open("r+b") as f:
            f.truncate(self.offset)  # an overwritten spare may be longer than this checkpoint
        info = self.info
        if info is None or self.offset != info.size_bytes or self._digest.hexdigest() != info.sha256:
            self._partial.unlink(missing_ok=True)
            raise InvalidUpdateError(f"download of {self.destination.name} does not match its size or sha256")
        self._partial.replace(self.destination)
        fsync_dir(self.destination.parent)
        return info
