"""Files under the data directory: global checkpoints and spooled updates, always written atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from safetensors.numpy import load_file, save

from fedmeki_core.algorithms.base import ServerState
from fedmeki_core.errors import InvalidUpdateError, PreconditionError, StorageFullError
from fedmeki_core.files import atomic_write, fsync_dir, private_dirs, scrub, space_checked
from fedmeki_core.overlapped_writer import OverlappedHashingWriter
from fedmeki_core.privacy.he import PUBLIC_FILE
from fedmeki_core.wire import TensorSpec, write_safetensors

_REPLAY_BLOCK = 1 << 20


class Spool:
    """A file being received: written and hashed, then made durable and moved into place.

    It may reuse a recycled file (`reuse=True`), which `Artifacts.recycle` overwrote with zeros first: no silo's
    bytes outlive their use in the pool; `sync` cuts what the file held beyond the bytes written. A new file is made
    with mode 0600 whatever the umask.
    """

    def __init__(self, path: Path, reuse: bool = False) -> None:
        self.path = path
        with space_checked("a received file"):
            if reuse:
                self._file: BinaryIO = path.open("r+b")
            else:  # 0600 whatever the umask: a silo's delta is for the coordinator's eyes only
                self._file = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        self._digest = hashlib.sha256()
        self.size = 0
        self.out_of_space = False  # a write found the disk full: the file is deleted, not kept for reuse
        self._held = 0  # bytes of a kept partial upload not yet replayed

    @contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            with space_checked("a received file"):
                yield
        except StorageFullError:
            self.out_of_space = True
            raise

    @classmethod
    def resume(cls, path: Path) -> Spool:
        """A spool that continues a kept partial file; `replay` hashes (and yields) what it holds first."""
        spool = cls(path, reuse=True)
        spool._held = path.stat().st_size
        return spool

    def replay(self) -> Iterator[bytes]:
        """The bytes an interrupted upload left (none for a new spool), read back and hashed, so that a resumed
        upload is checked and digested exactly as if it had come in one stream."""
        remaining = self._held
        self._file.seek(0)
        while remaining > 0:
            block = self._file.read(min(remaining, _REPLAY_BLOCK))
            if not block:
                raise InvalidUpdateError("a kept partial upload is shorter than recorded")
            remaining -= len(block)
            self._digest.update(block)
            self.size += len(block)
            yield block
        self._held = 0

    def write(self, data: bytes) -> None:
        with self._writing():
            self._file.write(data)
        self._digest.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def sync(self) -> None:
        """Cut what a reused file held beyond what was written, fsync; the file is then closed for writing."""
        if not self._file.closed:
            with self._writing():
                self._file.truncate(self.size)
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()

    def commit(self, destination: Path) -> None:
        """fsync, then rename to `destination`: after this returns the file survives a crash."""
        self.sync()
        with self._writing():
            private_dirs(destination.parent)
            os.replace(self.path, destination)
            fsync_dir(destination.parent)

    def close(self) -> None:
        """Close without making durable (the file is given up); buffered bytes a full disk refuses are dropped."""
        if not self._file.closed:
            with suppress(OSError):
                self._file.close()


class Artifacts:
    """Where the coordinator keeps its files; paths stored in the database are relative to `root`."""

    def __init__(self, root: Path, spool_pool_files: int = 8) -> None:
        self.root = root
        self._pool = root / "spool-pool"  # finished files, zeroed, kept for the next writes to overwrite
        self._pool_limit = spool_pool_files
        private_dirs(root)
        os.chmod(root, 0o700)  # an existing data directory too: it holds hospitals' deltas
        private_dirs(self._pool)

    def checkpoint_path(self, job_id: str, round_number: int) -> Path:
        return self.root / "checkpoints" / job_id / f"round-{round_number:05d}.safetensors"

    def ckks_context_path(self, job_id: str) -> Path:
        """A CKKS job's public context (never a secret one)."""
        return self.root / "checkpoints" / job_id / PUBLIC_FILE

    def write_ckks_context(self, job_id: str, data: bytes) -> None:
        with atomic_write(self.ckks_context_path(job_id)) as f:
            f.write(data)

    def server_state_path(self, job_id: str, round_number: int) -> Path:
        return self.root / "checkpoints" / job_id / f"server-state-{round_number:05d}.safetensors"

    def read_server_state(self, job_id: str, round_number: int) -> dict[str, ServerState]:
        """The server half's state saved with checkpoint `round_number` (empty when it keeps none)."""
        path = self.server_state_path(job_id, round_number)
        state: dict[str, ServerState] = {}
        if path.is_file():
            for key, array in load_file(str(path)).items():
                slot, name = key.split("/", 1)
                state.setdefault(name, {})[slot] = array
        return state

    def write_server_state(self, job_id: str, round_number: int, state: dict[str, ServerState]) -> None:
        """Save it atomically beside the checkpoint (keys `slot/tensor`); nothing when the server half keeps none."""
        arrays = {f"{slot}/{name}": array for name, slots in state.items() for slot, array in slots.items()}
        if arrays:
            with atomic_write(self.server_state_path(job_id, round_number)) as f:
                f.write(save(arrays))

    def drop_server_state(self, job_id: str, round_number: int) -> None:
        self.server_state_path(job_id, round_number).unlink(missing_ok=True)

    def update_path(self, job_id: str, round_number: int, silo_id: str) -> Path:
        return self.root / "updates" / job_id / f"round-{round_number:05d}" / f"{silo_id}.safetensors"

    def cycle_final_path(self, job_id: str, round_number: int) -> Path:
        """A cyclic secure-aggregation round's unmasked encrypted sum (the ring's last hop), beside its updates."""
        return self.update_path(job_id, round_number, "cycle-final").with_suffix(".ckks")

    def spool(self, job_id: str, size: int = 0) -> Spool:
        """A new spool under incoming/ for about `size` bytes, on a recycled file when the pool has one."""
        directory = private_dirs(self.root / "incoming" / job_id)
        path = directory / f"{uuid.uuid4().hex}.tmp"
        pooled = self.claim_pooled(size)
        if pooled is None:
            return Spool(path)
        os.replace(pooled, path)
        return Spool(path, reuse=True)

    def partial_path(self, job_id: str, round_number: int, silo_id: str, sha256: str) -> Path:
        """Where the bytes of an interrupted upload wait for the rest (until the round closes or a restart)."""
        return self.root / "incoming" / job_id / f"r{round_number:05d}-{silo_id}-{sha256}.part"

    def partial_size(self, job_id: str, round_number: int, silo_id: str, sha256: str) -> int:
        path = self.partial_path(job_id, round_number, silo_id, sha256)
        return path.stat().st_size if path.is_file() else 0

    def keep_partial(self, spool: Spool, job_id: str, round_number: int, silo_id: str, sha256: str) -> bool:
        """An upload broke off (the silo went away or stalled): keep what arrived, fsynced, for it to resume; a
        silo's older partials of the round go (it is sending another delta). False when nothing arrived."""
        if spool.size == 0:
            return False
        spool.sync()
        for old in spool.path.parent.glob(f"r{round_number:05d}-{silo_id}-*.part"):
            if old != spool.path:
                old.unlink()
        os.replace(spool.path, self.partial_path(job_id, round_number, silo_id, sha256))
        return True

    def resume(self, job_id: str, round_number: int, silo_id: str, sha256: str, offset: int) -> Spool:
        """The spool of a kept partial upload that holds exactly `offset` bytes; PreconditionError if there is none."""
        path = self.partial_path(job_id, round_number, silo_id, sha256)
        held = path.stat().st_size if path.is_file() else 0
        if held != offset:
            raise PreconditionError(
                f"the upload resumes at byte {offset}, but {held} bytes of this update are held here: ask "
                "UploadOffset where to resume"
            )
        return Spool.resume(path)

    def drop_partials(self, job_id: str, round_number: int) -> None:
        """The round is closed: interrupted uploads to it will never be resumed."""
        for path in (self.root / "incoming" / job_id).glob(f"r{round_number:05d}-*.part"):
            path.unlink(missing_ok=True)

    def discard(self, spool: Spool) -> None:
        """Give up a spool (a rejected or finished upload): its file goes back to the pool, if still here."""
        spool.close()
        if spool.out_of_space:  # its space is better given back than kept for reuse, and the pool's too
            spool.path.unlink(missing_ok=True)
            self.release_pool()
        elif spool.path.exists():
            self.recycle(spool.path)

    def recycle(self, path: Path) -> None:
        """Keep a file that is no longer needed for reuse, up to the pool's limit; delete it beyond. A kept file is
        overwritten with zeros first (`scrub`): a silo's delta or a refused upload must not outlive its use in the
        pool, and its allocated pages make the next write into it several times faster than an emptied file's."""
        if sum(1 for _ in self._pool.glob("*.spool")) < self._pool_limit:
            scrub(path)
            os.replace(path, self._pool / f"{uuid.uuid4().hex}.spool")
        else:
            path.unlink(missing_ok=True)

    def release_pool(self) -> None:
        """Delete the pool's files: the disk is full, and each holds the space of a file it once was (a writer that
        claimed one and found the disk full deletes it: a checkpoint retried every tick drains the pool too)."""
        for pooled in self._pool.glob("*.spool"):
            pooled.unlink(missing_ok=True)

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
        """Write a checkpoint atomically, on a pooled file when there is one; returns (path, size, sha256)."""
        path = self.checkpoint_path(job_id, round_number)
        with (
            atomic_write(path, reuse=self.claim_pooled(sum(spec.nbytes for spec in manifest))) as f,
            OverlappedHashingWriter(f) as writer,
        ):
            write_safetensors(writer, manifest, tensors)
        return path, path.stat().st_size, writer.hexdigest()

    def encrypted_checkpoint_path(self, job_id: str, round_number: int) -> Path:
        """Where a CKKS round's checkpoint goes: the sum of the silos' ciphertexts (`coordinator/modes.py`)."""
        return self.root / "checkpoints" / job_id / f"round-{round_number:05d}.ckks"

    def claim_pooled(self, size: int = 0) -> Path | None:
        """A recycled file for a writer of about `size` bytes to overwrite (faster than a new one), or None: the
        smallest that holds them, else the largest (a writer allocates what its file lacks and frees the tail it
        leaves, pages a larger writer could have used)."""
        sizes: dict[Path, int] = {}
        for pooled in self._pool.glob("*.spool"):
            with suppress(FileNotFoundError):  # claimed meanwhile by another writer
                sizes[pooled] = pooled.stat().st_size
        for candidate in sorted(sizes, key=lambda p: (sizes[p] < size, abs(sizes[p] - size))):
            claimed = candidate.with_suffix(".claimed")
            try:
                os.rename(candidate, claimed)  # atomic: no two writers get the same file
            except FileNotFoundError:
                continue
            return claimed
        return None

    def drop_round_updates(self, job_id: str, round_number: int) -> None:
        directory = self.root / "updates" / job_id / f"round-{round_number:05d}"
        if directory.is_dir():
            for path in directory.iterdir():
                self.recycle(path)
            directory.rmdir()

    def clear_incoming(self) -> None:
        """Remove half-received files left by a crash; nothing refers to them."""
        shutil.rmtree(self.root / "incoming", ignore_errors=True)
        for claimed in self._pool.glob("*.claimed"):  # claimed by a writer that did not finish: still its zeros
            claimed.rename(claimed.with_suffix(".spool"))
