"""The plaintext global model of a CKKS job, rebuilt where the secret key is (the silos, a hospital's operator).

The coordinator of a CKKS job keeps checkpoint 0 (the submitted initial weights, in the clear) and, for each round
r, the encrypted sum of the silos' weighted deltas. The global model of round r is that of round r-1 plus the
decrypted sum divided by its total weight, checked first (`decrypt_mean`): FedAvg's server step at learning
rate 1, done by the silos.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.files import HashingWriter, atomic_write, sha256_file
from fedmeki_core.privacy.he.ciphertexts import decrypt_mean
from fedmeki_core.privacy.he.keys import CkksContext
from fedmeki_core.wire import iter_tensors, read_layout, write_safetensors


def apply_aggregate(
    context: CkksContext,
    current: Path,
    aggregate: Path,
    destination: Path,
    max_norm: float,
    reuse: Path | None = None,
) -> str:
    """Write `current` + the aggregate's checked mean to `destination` (atomically); returns its sha256."""
    _, order = read_layout(current)
    mean = decrypt_mean(context, aggregate, order, max_norm)

    def tensors() -> Iterator[np.ndarray[Any, Any]]:
        for spec, value in iter_tensors(current):
            updated = mean.pop(spec.name)
            updated += value  # as FedAvg's server half: mean delta (times learning rate 1) plus the current value
            yield updated

    with atomic_write(destination, reuse) as f:
        writer = HashingWriter(f)
        write_safetensors(writer, order, tensors())
    return writer.hexdigest()


def rebuild_model(
    context: CkksContext, initial: Path, aggregates: Sequence[Path], destination: Path, max_norm: float
) -> str:
    """The global model after `aggregates` (rounds 1, 2, ... in order) starting from checkpoint 0; its sha256."""
    if not aggregates:
        shutil.copyfile(initial, destination)
        return sha256_file(destination)
    current = initial
    sha256 = ""
    for index, aggregate in enumerate(aggregates):
        step = destination.with_name(f".{destination.name}.round-{index + 1}")
        sha256 = apply_aggregate(context, current, aggregate, step, max_norm)
        if current != initial:
            current.unlink()
        current = step
    current.replace(destination)
    return sha256
