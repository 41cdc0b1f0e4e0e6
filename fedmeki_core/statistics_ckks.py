"""A statistics job under CKKS (`privacy.secure_aggregation: ckks`): the silos encrypt their releases, the
coordinator adds ciphertexts, only key holders decrypt.

Every feature declares its histogram edges (min/max cannot be summed, so they are never released) and values are
clipped to them. CKKS holds plaintexts up to MAX_PLAIN_MAGNITUDE, so each figure is divided by a public scale from
the edges before it is encrypted: totals by the feature's largest absolute edge, squares about the global mean by
the edges' range squared; every figure is then at most the silo's row count, and a silo with more rows than
MAX_ROWS declines. Decrypting multiplies the scales back and rounds the counts (CKKS adds noise near 1e-6).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError, InvalidUpdateError
from fedmeki_core.jobspec_statistics import StatisticsSpec
from fedmeki_core.privacy.he import CkksContext, encrypt_file
from fedmeki_core.privacy.he.ciphertexts import MAX_PLAIN_MAGNITUDE, load_ciphertext
from fedmeki_core.privacy.he.encoding import CiphertextReader
from fedmeki_core.privacy.he.keys import SLOTS
from fedmeki_core.statistics import layout
from fedmeki_core.wire import iter_tensors

Array = np.ndarray[Any, Any]
MAX_ROWS = int(MAX_PLAIN_MAGNITUDE)
COUNTS = ("count", "released", "histogram", "suppressed_bins")  # whole numbers: rounded after decryption


def declared_edges(spec: StatisticsSpec) -> Array:
    """Every feature's declared edges, padded to the widest with its last edge (as round 1 fixes them in the clear)."""
    edges = np.zeros((len(spec.features), spec.width + 1))
    for index, name in enumerate(spec.features):
        own = np.array(spec.edges[name], dtype=np.float64)
        edges[index, : len(own)] = own
        edges[index, len(own) :] = own[-1]
    return edges


def scales(spec: StatisticsSpec) -> dict[str, Array]:
    """The public divisors of the summed tensors that are not counts: each keeps a silo's figure <= its rows."""
    edges = [np.array(spec.edges[name], dtype=np.float64) for name in spec.features]
    reach = np.array([max(abs(e[0]), abs(e[-1])) for e in edges])  # > 0: the edges increase
    spread = np.array([(e[-1] - e[0]) ** 2 for e in edges])
    return {"total": reach, "squares": spread}


def encrypt_release(context: CkksContext, spec: StatisticsSpec, release: Path, destination: Path) -> str:
    """A silo's plaintext release (the job's layout) scaled and encrypted into `destination`; its sha256."""
    tensors = {tensor.name: np.array(value, dtype=np.float64) for tensor, value in iter_tensors(release)}
    rows = float(tensors["count"].max(initial=0.0))
    if rows > MAX_ROWS:
        raise InvalidInputError(
            f"this silo has {rows:.0f} rows; a CKKS statistics job takes at most {MAX_ROWS} per silo "
            "(its figures would exceed the range CKKS holds)"
        )
    for name, scale in scales(spec).items():
        tensors[name] = tensors[name] / scale
    manifest = layout(spec)

    def ordered() -> Iterator[Array]:
        for tensor in manifest:
            yield tensors[tensor.name]

    _, sha256 = encrypt_file(destination, context, manifest, ordered())
    return sha256


def decrypt_sums(context: CkksContext, spec: StatisticsSpec, path: Path) -> dict[str, Array]:
    """An aggregate of a CKKS statistics job decrypted (summed, not divided), unscaled, its counts rounded, with
    the declared edges; min/max stay zero: they are never released under CKKS."""
    if not context.is_secret:
        raise InvalidUpdateError("decrypting needs the secret CKKS context")
    manifest = layout(spec)
    tensors: dict[str, Array] = {}
    with CiphertextReader(path) as reader:
        reader.header.require(manifest, context.fingerprint, "the statistics aggregate's ciphertexts")
        for tensor in reader.header.tensors:
            values = np.empty(tensor.size, dtype=np.float64)
            for index in range(tensor.ciphertexts):
                vector = load_ciphertext(context, tensor, index, reader.blob(tensor, index))
                values[index * SLOTS : index * SLOTS + tensor.slots(index)] = vector.decrypt()
            if not bool(np.isfinite(values).all()) or float(np.abs(values).max(initial=0.0)) > 2**19:
                raise InvalidUpdateError(
                    f"the decrypted statistics of {tensor.name!r} are out of range: a ciphertext made under another "
                    "key, or a corrupt one, was added"
                )
            tensors[tensor.name] = values.reshape(tensor.shape)
    for name, scale in scales(spec).items():
        tensors[name] = tensors[name] * scale
    for name in COUNTS:
        tensors[name] = np.rint(tensors[name])
    tensors["edges"] = declared_edges(spec)
    tensors["minimum"][:] = 0.0
    tensors["maximum"][:] = 0.0
    return tensors


def suppress_small_cells(spec: StatisticsSpec, tensors: dict[str, Array]) -> dict[str, Array]:
    """The global minimum cell rule on decrypted sums: a feature counted under the job's min_count releases
    nothing, a histogram bin under it is 0 (counted in suppressed_bins)."""
    result = {name: np.array(value, dtype=np.float64) for name, value in tensors.items()}
    small_feature = result["count"] < spec.min_count
    for name in ("count", "total", "squares", "released"):
        result[name][small_feature] = 0.0
    result["histogram"][small_feature] = 0.0
    histogram = result["histogram"]
    small = (histogram < spec.min_count) & (histogram > 0)
    result["suppressed_bins"] += small.sum(axis=1)
    histogram[small] = 0.0
    return result
