"""The coordinator's half of CKKS aggregation: check uploaded ciphertext files, add them. It never decrypts.

It holds only the public context. Adding CKKS ciphertexts is exact modular arithmetic, so the sum is the same
bits in any order. The files are read in lockstep, ciphertext by ciphertext: memory is one ciphertext per silo.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.files import atomic_write, sha256_file
from fedmeki_core.privacy.he.ciphertexts import load_ciphertext
from fedmeki_core.privacy.he.encoding import CiphertextReader, CiphertextWriter
from fedmeki_core.privacy.he.keys import CkksContext
from fedmeki_core.wire import TensorSpec


def verify_ciphertext_file(context: CkksContext, path: Path, manifest: Sequence[TensorSpec]) -> None:
    """An upload holds the manifest's tensors as ciphertexts of `context`'s parameters, none empty or truncated.

    A ciphertext made under another key with the same parameters passes: only the silos can tell (decrypt_mean).
    """
    with CiphertextReader(path) as reader:
        reader.header.require(manifest, context.fingerprint)
        if reader.header.total_weight is not None:
            raise InvalidUpdateError("an update must not carry total_weight: that is for aggregates")
        for tensor, index, blob in reader.blobs():
            load_ciphertext(context, tensor, index, blob)


def write_ciphertext_sum(
    f: BinaryIO,
    context: CkksContext,
    updates: Sequence[Path],
    manifest: Sequence[TensorSpec],
    total_weight: float | None,
) -> None:
    """Write the sum of `updates` (ciphertext files of silos, already weighted) with `total_weight` in the clear
    (None: the sum is itself an update, a running sum of cyclic aggregation)."""
    if not updates:
        raise ValueError("no update to add")
    with ExitStack() as stack:
        readers = [stack.enter_context(CiphertextReader(path)) for path in updates]
        for reader in readers:
            reader.header.require(manifest, context.fingerprint, f"update {reader.path.name}")
        tensors = readers[0].header.tensors
        writer = CiphertextWriter(f, tensors, context.fingerprint, total_weight, len(readers))
        for tensor in tensors:
            for index in range(tensor.ciphertexts):
                total = load_ciphertext(context, tensor, index, readers[0].blob(tensor, index))
                for reader in readers[1:]:
                    total.add_(load_ciphertext(context, tensor, index, reader.blob(tensor, index)))
                writer.add(bytes(total.serialize()))
        writer.finish()


def add_ciphertext_files(
    destination: Path,
    context: CkksContext,
    updates: Sequence[Path],
    manifest: Sequence[TensorSpec],
    total_weight: float,
    reuse: Path | None = None,
) -> tuple[int, str]:
    """`write_ciphertext_sum` into a file that appears whole or not at all; returns (size, sha256)."""
    with atomic_write(destination, reuse) as f:
        write_ciphertext_sum(f, context, updates, manifest, total_weight)
    return destination.stat().st_size, sha256_file(destination)
