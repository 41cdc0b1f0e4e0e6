"""Files under the data directory: global checkpoints and spooled updates, always written atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedmeki_core.files import atomic_write, fsync_dir, sha256_file
from fedmeki_core.wire import TensorSpec, write_safetensors


class Spool:
    """A file being received: appended and hashed, then made durable and moved into place."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".incoming.", suffix=".tmp", dir=directory)
        self.path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._digest.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def sync(self) -> None:
        """Flush and fsync what was written; the file is then closed for writing."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def commit(self, destination: Path) -> None:
        """fsync, then rename to `destination`: after this returns the file survives a crash."""
        self.sync()
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, destination)
        fsync_dir(destination.parent)

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class Artifacts:
    """Where the coordinator keeps its files; paths stored in the database are relative to `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoint_path(self, job_id: str, round_number: int) -> Path:
        return self.root / "checkpoints" / job_id / f"round-{round_number:05d}.safetensors"

    def update_path(self, job_id: str, round_number: int, silo_id: str) -> Path:
        return self.root / "updates" / job_id / f"round-{round_number:05d}" / f"{silo_id}.safetensors"

    def spool(self, job_id: str) -> Spool:
        return Spool(self.root / "incoming" / job_id)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def write_checkpoint(
        self,
        job_id: str,
        round_number: int,
        manifest: list[TensorSpec],
        tensors: Iterable[np.ndarray[Any, Any]],
    ) -> tuple[Path, int, str]:
        """Write a checkpoint atomically; returns (path, size, sha256)."""
        path = self.checkpoint_path(job_id, round_number)
        with atomic_write(path) as f:
            write_safetensors(f, manifest, tensors)
        return path, path.stat().st_size, sha256_file(path)

    def drop_round_updates(self, job_id: str, round_number: int) -> None:
        shutil.rmtree(self.root / "updates" / job_id / f"round-{round_number:05d}", ignore_errors=True)

    def clear_incoming(self) -> None:
        """Remove half-received files left by a crash; nothing refers to them."""
        shutil.rmtree(self.root / "incoming", ignore_errors=True)
