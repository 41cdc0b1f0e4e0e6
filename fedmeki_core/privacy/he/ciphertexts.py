"""The silos' half of CKKS aggregation: encrypt a weighted delta, decrypt and check the aggregate.

Weighted FedAvg under encryption: a silo multiplies its delta by its weight (its sample count for a weighted
mean) before it encrypts; the coordinator adds the ciphertexts and writes the sum of the weights, in the clear,
into the aggregate's header; a silo decrypts the sum and divides by that total.

A silo checks the decrypted mean before using it: every value finite and its L2 norm within a bound. TenSEAL adds
a ciphertext made under a foreign key without complaint, and the decrypted sum is then garbage of magnitude 1e7
and more per value; the bound catches that (and any corrupt ciphertext), and the round is aborted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tenseal as ts

from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.files import atomic_write, sha256_file
from fedmeki_core.privacy.he.encoding import CiphertextReader, CiphertextWriter, EncryptedTensor
from fedmeki_core.privacy.he.keys import SCALE_BITS, SLOTS, CkksContext
from fedmeki_core.wire import TensorSpec

# Largest magnitude a silo may encrypt: 2^16, leaving headroom below the 2^19 a slot holds for the sum of silos.
MAX_PLAIN_MAGNITUDE = float(2**16)


class AggregateCheckError(InvalidUpdateError):
    """A decrypted aggregate that is not finite or whose norm exceeds the bound: the round must not use it."""


def encrypt_tensor(context: CkksContext, tensor: EncryptedTensor, values: np.ndarray[Any, Any]) -> Iterator[bytes]:
    """The serialised ciphertexts packing `values` (the tensor's values, any shape), 4096 at a time."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size != tensor.size:
        raise ValueError(f"tensor {tensor.name!r} has {flat.size} values, expected {tensor.size}")
    if not bool(np.isfinite(flat).all()):
        raise InvalidUpdateError(f"tensor {tensor.name!r} has non-finite values; they cannot be encrypted")
    largest = float(np.abs(flat).max(initial=0.0))
    if largest > MAX_PLAIN_MAGNITUDE:
        raise InvalidUpdateError(
            f"tensor {tensor.name!r}: weighted value {largest:.3g} exceeds {MAX_PLAIN_MAGNITUDE:g}, the range CKKS "
            f"with scale 2^{SCALE_BITS} holds here (a diverged delta, or weights too large: use unweighted fedavg)"
        )
    for index in range(tensor.ciphertexts):
        yield bytes(ts.ckks_vector(context.context, flat[index * SLOTS : (index + 1) * SLOTS]).serialize())


def write_encrypted(
    f: BinaryIO,
    context: CkksContext,
    manifest: Sequence[TensorSpec],
    tensors: Iterable[np.ndarray[Any, Any]],
    weight: float = 1.0,
) -> None:
    """Encrypt `weight` x each tensor (in manifest order) into a ciphertext file, one tensor at a time."""
    encrypted = [EncryptedTensor.of(spec) for spec in manifest]
    writer = CiphertextWriter(f, encrypted, context.fingerprint)
    for tensor, values in zip(encrypted, tensors, strict=True):
        scaled = np.asarray(values, dtype=np.float64) * weight
        for blob in encrypt_tensor(context, tensor, scaled):
            writer.add(blob)
    writer.finish()


def encrypt_file(
    destination: Path,
    context: CkksContext,
    manifest: Sequence[TensorSpec],
    tensors: Iterable[np.ndarray[Any, Any]],
    weight: float = 1.0,
    reuse: Path | None = None,
) -> tuple[int, str]:
    """`write_encrypted` into a file that appears whole or not at all; returns (size, sha256)."""
    with atomic_write(destination, reuse) as f:
        write_encrypted(f, context, manifest, tensors, weight)
    return destination.stat().st_size, sha256_file(destination)


def load_ciphertext(context: CkksContext, tensor: EncryptedTensor, index: int, blob: bytes) -> Any:
    """One ciphertext as a CKKSVector linked to `context`, checked to be what the header says it is."""
    name = tensor.blob_name(index)
    if not blob:
        raise InvalidUpdateError(f"ciphertext {name!r} is empty (0 bytes): refused")
    try:
        vector = ts.ckks_vector_from(context.context, blob)
    except (ValueError, RuntimeError) as exc:
        raise InvalidUpdateError(f"ciphertext {name!r} is not a CKKS vector of this context: {exc}") from None
    if vector.size() != tensor.slots(index):
        raise InvalidUpdateError(
            f"ciphertext {name!r} holds {vector.size()} values, expected {tensor.slots(index)}"
            + (" (a size-0 vector: refused)" if vector.size() == 0 else "")
        )
    chunks = vector.ciphertext()
    if len(chunks) != 1 or chunks[0].size() != 2 or chunks[0].scale != 2.0**SCALE_BITS:
        raise InvalidUpdateError(f"ciphertext {name!r} is not a fresh ciphertext at scale 2^{SCALE_BITS}")
    return vector


def decrypt_mean(
    context: CkksContext, path: Path, manifest: Sequence[TensorSpec], max_norm: float
) -> dict[str, np.ndarray[Any, Any]]:
    """The aggregate's weighted mean: decrypt, divide by its total weight, check finite and norm <= `max_norm`
    (the job's `privacy.ckks_max_norm`).

    Returns every tensor of the manifest in its dtype; raises AggregateCheckError when the check fails, and
    InvalidUpdateError when the file does not match the manifest or the context.
    """
    if not context.is_secret:
        raise InvalidUpdateError("decrypting needs the secret CKKS context")
    dtypes = {spec.name: _NUMPY_DTYPES[spec.dtype] for spec in manifest}
    means: dict[str, np.ndarray[Any, Any]] = {}
    squares = 0.0
    with CiphertextReader(path) as reader:
        reader.header.require(manifest, context.fingerprint, "the aggregate's ciphertexts")
        total = reader.header.total_weight
        if total is None:
            raise InvalidUpdateError(f"{path.name} is not an aggregate: it carries no total_weight")
        for tensor in reader.header.tensors:
            values = np.empty(tensor.size, dtype=np.float64)
            for index in range(tensor.ciphertexts):
                vector = load_ciphertext(context, tensor, index, reader.blob(tensor, index))
                values[index * SLOTS : index * SLOTS + tensor.slots(index)] = vector.decrypt()
            values /= total
            if not bool(np.isfinite(values).all()):
                raise AggregateCheckError(f"the decrypted aggregate of {tensor.name!r} is not finite; round aborted")
            squares += float(np.dot(values, values))
            means[tensor.name] = values.reshape(tensor.shape).astype(dtypes[tensor.name])
    norm = math.sqrt(squares)
    if not norm <= max_norm:
        raise AggregateCheckError(
            f"the decrypted aggregate has L2 norm {norm:.3g}, above the bound {max_norm:g}: a ciphertext made under "
            "another key, or a corrupt one, was added; round aborted"
        )
    return means


_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
