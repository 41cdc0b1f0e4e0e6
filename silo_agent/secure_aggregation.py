"""A silo's half of CKKS jobs: its secret key, the plaintext global models it rebuilds, its encrypted updates.

For a job with `privacy.secure_aggregation: ckks` the coordinator's checkpoints after round 0 are encrypted sums.
The silo keeps the newest plaintext global model of each job it rebuilt (`work_dir/ckks/<job>/model-NNNNN`) and
brings it forward one round at a time: download the round's aggregate, decrypt, divide by its total weight,
check (finite; L2 norm within the job's `ckks_max_norm`, else the round is aborted here), add. Its own update is
its float32 delta times its weight in the mean (its sample count under weighted FedAvg), encrypted tensor by tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.errors import InvalidInputError, InvalidUpdateError
from fedmeki_core.files import HashingWriter, atomic_write
from fedmeki_core.privacy.he import CkksContext, encrypt_file, read_secret_context
from fedmeki_core.privacy.he.model import apply_aggregate
from fedmeki_core.records import CheckpointInfo, RoundTask
from fedmeki_core.wire import iter_tensors
from silo_agent.trainer import TrainingResult
from silo_agent.transport import GrpcTransport

logger = logging.getLogger(__name__)

_COPY_BLOCK = 1 << 20
CKKS_ENCODING = "ckks"  # an update's encoding in its upload header: ciphertexts


def _model(directory: Path, number: int) -> Path:
    return directory / f"model-{number:05d}.safetensors"


class CkksSilo:
    """Loads the silo's secret context on first use (`ckks_secret_context` in silo.yaml)."""

    def __init__(self, key_path: Path | None, work_dir: Path, transport: GrpcTransport) -> None:
        self._key_path = key_path
        self._work_dir = work_dir
        self._transport = transport
        self._context: CkksContext | None = None

    def context_for(self, task: RoundTask) -> CkksContext:
        """This silo's context, which must be the job's key set."""
        if self._key_path is None:
            raise InvalidInputError(
                f"job {task.job_id} uses CKKS secure aggregation and this silo has no key: set ckks_secret_context "
                "in silo.yaml to the secret.ckks of the federation (fedmeki he keygen)"
            )
        if self._context is None:
            self._context = read_secret_context(self._key_path)
        if self._context.fingerprint != task.spec.privacy.ckks_context_sha256:
            raise InvalidInputError(
                f"job {task.job_id} was submitted with CKKS context {task.spec.privacy.ckks_context_sha256[:12]}…; "
                f"this silo's key {self._key_path} is {self._context.fingerprint[:12]}…: not the same key set"
            )
        return self._context

    def global_model(self, task: RoundTask, destination: Path, spare: Path | None = None) -> str:
        """Write the plaintext global model the task starts from to `destination`; returns its sha256."""
        context = self.context_for(task)
        directory = self._work_dir / "ckks" / task.job_id
        directory.mkdir(parents=True, exist_ok=True)
        target = task.checkpoint.round
        have = max((n for n in self._cached(directory) if n <= target), default=None)
        if have is None:
            self._transport.download(self._checkpoint(task, 0), _model(directory, 0))
            have = 0
        for number in range(have + 1, target + 1):
            aggregate = directory / f"aggregate-{number:05d}.ckks"
            self._transport.download(self._checkpoint(task, number), aggregate)
            max_norm = task.spec.privacy.ckks_max_norm
            apply_aggregate(context, _model(directory, number - 1), aggregate, _model(directory, number), max_norm)
            logger.info("job %s: rebuilt the global model of round %d from its encrypted sum", task.job_id, number)
            aggregate.unlink()
        for number in self._cached(directory):  # only the newest is ever needed again
            if number != target:
                _model(directory, number).unlink()
        with atomic_write(destination, spare) as f, _model(directory, target).open("rb") as source:
            writer = HashingWriter(f)
            while block := source.read(_COPY_BLOCK):
                writer.write(block)
        return writer.hexdigest()

    def encrypt_update(self, task: RoundTask, result: TrainingResult) -> TrainingResult:
        """The trained delta times this silo's weight, encrypted; the plaintext delta file is removed."""
        context = self.context_for(task)
        entry = get_algorithm(task.spec.algorithm.name)
        weight = entry.server(entry.resolve_options(task.spec.algorithm.options)).update_weight(result.num_samples)
        manifest = sorted(task.manifest, key=lambda spec: spec.name)  # the order the trainer writes deltas in

        def tensors() -> Iterator[np.ndarray[Any, Any]]:
            for (spec, values), expected in zip(iter_tensors(result.delta_path), manifest, strict=True):
                if spec.name != expected.name:
                    raise InvalidUpdateError(f"the delta holds {spec.name!r} where {expected.name!r} was expected")
                yield values

        path = result.delta_path.with_suffix(".ckks")
        _, sha256 = encrypt_file(path, context, manifest, tensors(), weight)
        result.delta_path.unlink()
        return TrainingResult(path, sha256, result.num_samples, result.metrics)

    @staticmethod
    def _cached(directory: Path) -> list[int]:
        return sorted(int(path.stem.split("-")[1]) for path in directory.glob("model-*.safetensors"))

    @staticmethod
    def _checkpoint(task: RoundTask, number: int) -> CheckpointInfo:
        """The task names only its own checkpoint; for earlier ones the download checks the server's size and sha256."""
        return task.checkpoint if number == task.checkpoint.round else CheckpointInfo(task.job_id, number, 0, "")
