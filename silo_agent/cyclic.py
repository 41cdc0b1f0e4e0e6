"""A silo's part in a cyclic secure-aggregation round (`privacy.secure_aggregation: cyclic`): its place in the
round's ring, told by the coordinator (RelayStep), and the hops it makes.

The silo has encrypted its weighted delta like a star-mode CKKS silo. Then, in turn: the initiator uploads it plus
a random mask M (hop 1) and keeps M's seed in the job's folder (`ckks/<job>/mask-NNNNN.seed`, mode 0600, fsynced:
a restarted agent unmasks with the same M); every other silo downloads the running sum before it, adds its
ciphertexts and uploads the result; the initiator downloads the last running sum, removes M and uploads the
encrypted sum (hop K+1), which the coordinator keeps as the round's aggregate. Every silo then decrypts that
aggregate like a star-mode one, at the next round's start (CkksSilo.global_model), where it is checked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedmeki_core.errors import AlreadyExistsError, InvalidInputError
from fedmeki_core.privacy.he.cyclic import SEED_BYTES, add_to_running_sum, new_mask_seed, shift_by_mask
from fedmeki_core.records import RelayAction, RoundTask
from silo_agent.secure_aggregation import CKKS_ENCODING, CkksSilo
from silo_agent.transport import GrpcTransport

logger = logging.getLogger(__name__)


class CyclicSilo:
    def __init__(self, ckks: CkksSilo, work_dir: Path, transport: GrpcTransport) -> None:
        self._ckks = ckks
        self._work_dir = work_dir
        self._transport = transport

    def relay(self, task: RoundTask, encrypted: Path, num_samples: int, metrics: dict[str, float]) -> bool:
        """Do this silo's hops of the round's ring that are due (`encrypted`: its encrypted weighted delta). True
        when nothing is left for it; False when it must wait for its turn: the coordinator then hands it the round
        again (NextTask) once the turn comes, and other work meanwhile. The coordinator's refusals (a failed round)
        are raised as they come."""
        context = self._ckks.context_for(task)
        folder = self._work_dir / "ckks" / task.job_id
        folder.mkdir(parents=True, exist_ok=True)
        seed_path = folder / f"mask-{task.round:05d}.seed"
        hop_path, running = folder / f"hop-{task.round:05d}.ckks", folder / f"running-{task.round:05d}.ckks"
        while True:
            step = self._transport.relay_step(task)
            if step.action == RelayAction.DONE:
                seed_path.unlink(missing_ok=True)
                return True
            if step.action == RelayAction.WAIT:
                logger.info(
                    "job %s round %d: waiting for hop %d of the ring (place %d of %d)",
                    task.job_id,
                    task.round,
                    step.hop - 1,
                    step.position,
                    step.silos,
                )
                return False
            if step.action == RelayAction.START:
                seed = _mask_seed(seed_path, create=True)
                _, sha256 = shift_by_mask(hop_path, context, encrypted, task.manifest, seed, 1)
            else:
                assert step.source is not None  # ADD and UNMASK name the hop they continue
                self._transport.download(step.source, running, relay_hop=step.hop - 1)
                if step.action == RelayAction.ADD:
                    _, sha256 = add_to_running_sum(hop_path, context, running, encrypted, task.manifest)
                else:
                    seed = _mask_seed(seed_path, create=False)
                    _, sha256 = shift_by_mask(hop_path, context, running, task.manifest, seed, -1)
                running.unlink()
            try:
                self._transport.upload(
                    task, hop_path, sha256, num_samples, metrics, encoding=CKKS_ENCODING, relay_hop=step.hop
                )
            except AlreadyExistsError:  # a retried upload whose first try was taken: the ring goes on
                logger.info("job %s round %d: the coordinator already has hop %d", task.job_id, task.round, step.hop)
            hop_path.unlink()
            logger.info(
                "job %s round %d: %s, uploaded hop %d of %d",
                task.job_id,
                task.round,
                step.action,
                step.hop,
                step.silos + 1,
            )


def _mask_seed(path: Path, create: bool) -> bytes:
    """The initiator's mask seed of a round: made once, durable before its masked hop leaves, never sent."""
    if path.exists():
        seed = path.read_bytes()
        if len(seed) == SEED_BYTES:
            return seed
        path.unlink()  # torn by a crash before its fsync: the masked hop it would have made was never sent
    if not create:
        raise InvalidInputError(f"{path} is gone: the mask of this round cannot be removed, the round is lost")
    seed = new_mask_seed()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with open(fd, "wb") as f:
        f.write(seed)
        f.flush()
        os.fsync(f.fileno())
    return seed
