"""Delta downloads (a job's `downloads: delta`): the silo's half. The silo keeps the newest global model it
downloaded in the job's folder (`held-global-NNNNN-SHA256.safetensors`, so an agent restart still gets deltas; the
name carries the sha256 it was checked against, so no request hashes it again) and asks
for each next checkpoint as its delta from it; it rebuilds the checkpoint with the coordinator's functions
(`fedmeki_core/global_deltas.py`) and checks the result's sha256 against the round's. A mismatch discards it and
downloads the full checkpoint (logged); so does a silo that holds nothing, or an older model than the delta's base.

No copies and no new files per round: the held model is a second name (a hard link) of the task's checkpoint file,
and the two files a round writes overwrite spares in place (the checkpoint the held model before it, which the
next round's download gets as its spare; the delta the previous delta). Nothing here is fsynced: a process
killed loses nothing (the page cache holds the files), every file is one the coordinator can send again, and a
held model that a power loss damaged costs a download, never a wrong model: it is the base of a rebuild whose
result must match the round's sha256, or is hashed by the transport before it stands for the task's checkpoint.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from fedmeki_core.encodings import DeltaEncoding
from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.files import link_replace, recycle
from fedmeki_core.global_deltas import rebuild
from fedmeki_core.records import CheckpointInfo, RoundTask
from silo_agent.transport import GrpcTransport

logger = logging.getLogger(__name__)

_HELD = re.compile(r"held-global-(\d{5,})-([0-9a-f]{64})\.safetensors")


@dataclass(frozen=True)
class HeldModel:
    round: int
    sha256: str
    path: Path


class DeltaDownloads:
    """A job's global models at this silo: the one held, and each next one fetched as a delta from it."""

    def __init__(self, transport: GrpcTransport, folder: Path) -> None:
        self._transport = transport
        self._folder = folder

    def held(self) -> HeldModel | None:
        """The newest global model kept here, if any."""
        if not self._folder.is_dir():
            return None
        kept = sorted(
            (int(m.group(1)), m.group(2), path) for path in self._folder.iterdir() if (m := _HELD.fullmatch(path.name))
        )
        return HeldModel(*kept[-1]) if kept else None

    def download(self, task: RoundTask, path: Path, spare: Path) -> None:
        """Checkpoint `task.checkpoint` to `path` (checked against its sha256), as a delta where one can come."""
        target = task.checkpoint
        held = self.held()
        if held is not None and held.round == target.round:
            link_replace(held.path, path)  # checked against its sha256 by the transport just below
        elif (
            held is not None
            and held.round < target.round
            and not path.with_name(path.name + ".part").exists()  # not an earlier full download to resume
            and self._fetched(task, held, path, spare)
        ):
            self._keep(path, target, spare)
            return
        if held is None or held.round != target.round:
            logger.info(
                "job %s: downloading checkpoint %d whole (%d bytes): %s",
                task.job_id,
                target.round,
                target.size_bytes,
                "no global model held here" if held is None else f"checkpoint {held.round} held here",
            )
        self._transport.download(target, path, spare=spare)  # nothing to do when `path` holds it already
        self._keep(path, target, spare)

    def _fetched(self, task: RoundTask, held: HeldModel, path: Path, spare: Path) -> bool:
        """Ask for checkpoint `task.checkpoint` as a delta from `held`: True when `path` holds it (rebuilt from the
        delta, or sent whole because the coordinator has no delta from `held`), False when the rebuilt one did not
        match its sha256."""
        target = task.checkpoint
        base = CheckpointInfo(task.job_id, held.round, held.path.stat().st_size, held.sha256)
        delta = self._folder / f"download-delta-{target.round:05d}-from-{held.round:05d}.safetensors"
        delta_spare = self._folder / "download-delta.spare"
        if not self._transport.download_delta(target, base, delta, path, spare, delta_spare):
            logger.info(
                "job %s: checkpoint %d came whole (%d bytes): the coordinator has no delta to it from checkpoint %d",
                task.job_id,
                target.round,
                target.size_bytes,
                held.round,
            )
            return True
        size = delta.stat().st_size
        try:
            sha256 = rebuild(held.path, delta, path, DeltaEncoding.of(task.spec), reuse=spare)
        except InvalidUpdateError as exc:
            sha256 = f"unusable ({exc.message})"
        finally:
            delta.replace(delta_spare)
        if sha256 != target.sha256:
            logger.warning(
                "job %s: checkpoint %d rebuilt from checkpoint %d does not match its sha256 (%s, expected %s): "
                "downloading it whole",
                task.job_id,
                target.round,
                held.round,
                sha256[:80],
                target.sha256,
            )
            path.unlink(missing_ok=True)
            return False
        logger.info(
            "job %s: checkpoint %d came as a delta of %d bytes from checkpoint %d (%.3fx its %d bytes)",
            task.job_id,
            target.round,
            size,
            held.round,
            size / target.size_bytes,
            target.size_bytes,
        )
        return True

    def _keep(self, path: Path, checkpoint: CheckpointInfo, spare: Path) -> None:
        """Hold the checkpoint just downloaded and checked, as a second name of the task's file (whose own name is
        recycled once the round ends: `files.recycle` only unlinks a linked file), unless a newer one is held. The
        model held before becomes the next download's `spare` when nothing else names it."""
        held = self.held()
        if held is not None and held.round >= checkpoint.round:
            return
        link_replace(path, self._folder / f"held-global-{checkpoint.round:05d}-{checkpoint.sha256}.safetensors")
        if held is not None:
            if spare.exists():
                held.path.unlink(missing_ok=True)
            else:
                recycle(held.path, spare)
