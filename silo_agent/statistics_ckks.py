"""A silo's half of a statistics job under CKKS (fedmeki_core/statistics_ckks.py): round 1's encrypted sums
decrypted into the plaintext checkpoint its round-2 release reads (the global counts and totals, the declared
edges), and every release encrypted before it goes up. Checkpoint 0 is the job's zeros, in the clear."""

from __future__ import annotations

import logging
from pathlib import Path

from fedmeki_core.files import HashingWriter, atomic_write
from fedmeki_core.records import RoundTask
from fedmeki_core.statistics import layout
from fedmeki_core.statistics_ckks import decrypt_sums, encrypt_release
from fedmeki_core.wire import write_safetensors
from silo_agent.secure_aggregation import CkksSilo
from silo_agent.trainer import TrainingResult
from silo_agent.transport import GrpcTransport

logger = logging.getLogger(__name__)


class CkksStatisticsSilo:
    """Decrypts the published sums and encrypts the releases with the silo's key (CkksSilo)."""

    def __init__(self, transport: GrpcTransport, ckks: CkksSilo) -> None:
        self._transport = transport
        self._ckks = ckks

    def published(self, task: RoundTask, path: Path, spare: Path) -> str:
        """The round's checkpoint in the clear at `path`; its sha256."""
        if task.checkpoint.round == 0:
            self._transport.download(task.checkpoint, path, spare=spare)
            return task.checkpoint.sha256
        statistics = task.spec.statistics
        assert statistics is not None
        context = self._ckks.context_for(task)
        encrypted = path.with_suffix(".ckks")
        self._transport.download(task.checkpoint, encrypted)
        tensors = decrypt_sums(context, statistics, encrypted)
        encrypted.unlink()
        order = layout(statistics)
        with atomic_write(path, spare) as f:
            writer = HashingWriter(f)
            write_safetensors(writer, order, (tensors[spec.name] for spec in order))
        logger.info("job %s: decrypted the sums of round %d", task.job_id, task.checkpoint.round)
        return writer.hexdigest()

    def encrypt(self, task: RoundTask, result: TrainingResult) -> TrainingResult:
        """The release scaled and encrypted; the plaintext file is removed."""
        statistics = task.spec.statistics
        assert statistics is not None
        path = result.delta_path.with_suffix(".ckks")
        sha256 = encrypt_release(self._ckks.context_for(task), statistics, result.delta_path, path)
        result.delta_path.unlink()
        return TrainingResult(path, sha256, result.num_samples, result.metrics)
