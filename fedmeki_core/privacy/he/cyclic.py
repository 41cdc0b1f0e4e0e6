"""The silos' half of cyclic secure aggregation (PPPML-HMI's ring): mask, add to the running sum, unmask.

A round's initiator adds a random mask M to its encrypted weighted delta (hop 1); each next silo adds its own
encrypted weighted delta to the running sum it received; the initiator receives the last running sum and removes
M (hop K+1). M is added and removed as plaintext values under encryption, so nobody ever decrypts a running sum
in the protocol, and a curious silo that decrypts the one it relays sees its partial sum shifted by M.

M is drawn from a 32-byte seed the initiator keeps (never sent), in the files' ciphertext order, uniform in
[-MASK_MAGNITUDE, MASK_MAGNITUDE]: with weighted deltas of magnitude x it hides them to a statistical distance of
about |x| / MASK_MAGNITUDE per value (a real-valued mask, not a one-time pad over a group). Adding M can push a
running sum past the 2^19 a slot decrypts, which does not matter: ciphertext arithmetic is exact modulo q, so
removing M brings the sum back.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmeki_core.files import atomic_write, sha256_file
from fedmeki_core.privacy.he.aggregate import write_ciphertext_sum
from fedmeki_core.privacy.he.ciphertexts import load_ciphertext
from fedmeki_core.privacy.he.encoding import CiphertextReader, CiphertextWriter
from fedmeki_core.privacy.he.keys import CkksContext
from fedmeki_core.wire import TensorSpec

MASK_MAGNITUDE = float(2**17)
SEED_BYTES = 32


def new_mask_seed() -> bytes:
    return secrets.token_bytes(SEED_BYTES)


def shift_by_mask(
    destination: Path,
    context: CkksContext,
    source: Path,
    manifest: Sequence[TensorSpec],
    seed: bytes,
    sign: int,
) -> tuple[int, str]:
    """`source`'s ciphertexts plus (`sign` 1) or minus (`sign` -1) the mask of `seed`, as an update file written
    atomically; returns (size, sha256)."""
    if len(seed) != SEED_BYTES or sign not in (1, -1):
        raise ValueError("a mask needs a 32-byte seed and a sign of 1 or -1")
    rng = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32))
    with CiphertextReader(source) as reader, atomic_write(destination) as f:
        reader.header.require(manifest, context.fingerprint, f"running sum {source.name}")
        writer = CiphertextWriter(f, reader.header.tensors, context.fingerprint)
        for tensor, index, blob in reader.blobs():
            vector = load_ciphertext(context, tensor, index, blob)
            mask = rng.uniform(-MASK_MAGNITUDE, MASK_MAGNITUDE, tensor.slots(index))
            vector.add_((sign * mask).tolist())
            writer.add(bytes(vector.serialize()))
        writer.finish()
    return destination.stat().st_size, sha256_file(destination)


def add_to_running_sum(
    destination: Path, context: CkksContext, running_sum: Path, own: Path, manifest: Sequence[TensorSpec]
) -> tuple[int, str]:
    """The running sum plus this silo's encrypted weighted delta, as an update file written atomically."""
    with atomic_write(destination) as f:
        write_ciphertext_sum(f, context, [running_sum, own], manifest, None)
    return destination.stat().st_size, sha256_file(destination)
