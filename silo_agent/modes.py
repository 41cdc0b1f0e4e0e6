"""How a job's models come down and its updates go up at this silo, one strategy per task, chosen once from the
job's spec: plaintext (the default), CKKS (the coordinator holds encrypted sums: the silo rebuilds the plaintext
model and encrypts its update) or cyclic (CKKS, the update joining the round's ring instead of going up alone).

The mirror of `coordinator/modes.py`; the rest of the agent asks a task's mode and never branches on the privacy
settings itself. The collaborators (transport, CKKS key holder, ring) are passed in.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedmeki_core.jobspec import JobSpec
from fedmeki_core.privacy.he.policy import uses_ckks, uses_cyclic
from fedmeki_core.records import RoundTask
from silo_agent.cyclic import CyclicSilo
from silo_agent.delta_downloads import DeltaDownloads
from silo_agent.secure_aggregation import CKKS_ENCODING, CkksSilo
from silo_agent.state import StoredFile
from silo_agent.statistics_ckks import CkksStatisticsSilo
from silo_agent.trainer import TrainingResult
from silo_agent.transport import GrpcTransport

logger = logging.getLogger(__name__)


class SiloMode:
    """Plaintext checkpoints down, plaintext deltas up (the default strategy)."""

    # A global model that does not decrypt to a usable mean: only a CKKS job's aggregate can be one, and then the
    # round is aborted here; for other modes the error is raised as it comes.
    aborts_on_bad_aggregate = False
    # A statistics job's release summed under CKKS: its values clipped to the declared edges, no min/max.
    clips_statistics_to_edges = False

    def __init__(self, transport: GrpcTransport) -> None:
        self._transport = transport

    def download(self, task: RoundTask, path: Path, spare: Path) -> str:
        """The round's global model written to `path`; its sha256."""
        self._transport.download(task.checkpoint, path, spare=spare)
        logger.info(
            "job %s round %d: downloaded checkpoint %d (%d bytes, sha256 %s)",
            task.job_id,
            task.round,
            task.checkpoint.round,
            task.checkpoint.size_bytes,
            task.checkpoint.sha256[:12],
        )
        return task.checkpoint.sha256

    def seal(self, task: RoundTask, result: TrainingResult) -> TrainingResult:
        """The update as it travels (here: as trained)."""
        return result

    def send(
        self, task: RoundTask, delta: StoredFile, num_samples: int, metrics: dict[str, float], fresh: bool = False
    ) -> bool:
        """Send the recorded update: True when sent, False when the silo must wait for its turn (a ring). `fresh`:
        trained by this process just now, so no earlier attempt can have left part of it at the coordinator."""
        self._transport.upload(task, delta.path, delta.sha256, num_samples, metrics, fresh=fresh)  # plaintext
        return True


class DeltaDownloadMode(SiloMode):
    """Plaintext, each global model downloaded as its delta from the one this silo holds (`downloads: delta`)."""

    def download(self, task: RoundTask, path: Path, spare: Path) -> str:
        DeltaDownloads(self._transport, path.parent).download(task, path, spare)
        return task.checkpoint.sha256


class CkksMode(SiloMode):
    """Encrypted sums down (decrypted and applied here), ciphertexts up."""

    aborts_on_bad_aggregate = True

    def __init__(self, transport: GrpcTransport, ckks: CkksSilo) -> None:
        super().__init__(transport)
        self._ckks = ckks

    def download(self, task: RoundTask, path: Path, spare: Path) -> str:
        return self._ckks.global_model(task, path, spare=spare)

    def seal(self, task: RoundTask, result: TrainingResult) -> TrainingResult:
        return self._ckks.encrypt_update(task, result)

    def send(
        self, task: RoundTask, delta: StoredFile, num_samples: int, metrics: dict[str, float], fresh: bool = False
    ) -> bool:
        self._transport.upload(
            task, delta.path, delta.sha256, num_samples, metrics, encoding=CKKS_ENCODING, fresh=fresh
        )
        return True


class CkksStatisticsMode(CkksMode):
    """A statistics job under CKKS: its published sums decrypted here, its releases encrypted."""

    clips_statistics_to_edges = True

    def __init__(self, transport: GrpcTransport, ckks: CkksSilo) -> None:
        super().__init__(transport, ckks)
        self._statistics = CkksStatisticsSilo(transport, ckks)

    def download(self, task: RoundTask, path: Path, spare: Path) -> str:
        return self._statistics.published(task, path, spare)

    def seal(self, task: RoundTask, result: TrainingResult) -> TrainingResult:
        return self._statistics.encrypt(task, result)


class CyclicMode(CkksMode):
    """As CKKS, but the encrypted update joins the round's ring, which the coordinator only relays."""

    def __init__(self, transport: GrpcTransport, ckks: CkksSilo, ring: CyclicSilo) -> None:
        super().__init__(transport, ckks)
        self._ring = ring

    def send(
        self, task: RoundTask, delta: StoredFile, num_samples: int, metrics: dict[str, float], fresh: bool = False
    ) -> bool:
        return self._ring.relay(task, delta.path, num_samples, metrics)


def task_mode(spec: JobSpec, transport: GrpcTransport, ckks: CkksSilo, ring: CyclicSilo) -> SiloMode:
    """The strategy of a job's tasks, from its spec."""
    if uses_cyclic(spec):
        return CyclicMode(transport, ckks, ring)
    if uses_ckks(spec):
        return CkksMode(transport, ckks) if spec.statistics is None else CkksStatisticsMode(transport, ckks)
    if spec.downloads == "delta":
        return DeltaDownloadMode(transport)
    return SiloMode(transport)
