"""The ciphertext file: a safetensors file whose tensors are serialised CKKS ciphertexts (uint8 blobs).

Each float tensor of the model is flattened and packed into ceil(size / 4096) ciphertexts, stored as the U8
tensors `<tensor>/0`, `<tensor>/1`, ... (TenSEAL's protobuf serialisation of a CKKSVector; never pickle). The
header's `__metadata__` (strings, as safetensors requires) says what they hold:

    format          "fedmeki-ckks/1"
    context_sha256  the fingerprint of the public context the ciphertexts were made under
    tensors         JSON list, in stored order, of {"name", "dtype", "shape", "slots", "ciphertexts"}: the plaintext
                    tensor's dtype and shape, the values per ciphertext (4096) and how many ciphertexts it takes
    total_weight    (aggregates only) the sum of the silos' weights, in the clear: the silos divide by it
    updates         (aggregates only) how many silos' ciphertexts were added

Ciphertext sizes vary a little (TenSEAL compresses them), so a writer reserves a header sized for the largest
possible ciphertexts, writes the blobs as they are made, then rewrites the header, padded with spaces to the
reserved length: one pass, one ciphertext in memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fedmeki_core.errors import InvalidUpdateError
from fedmeki_core.privacy.he.keys import MAX_CIPHERTEXT_BYTES, SLOTS
from fedmeki_core.wire import HEADER_PREFIX_BYTES, TensorSpec, read_header, safetensors_header

FORMAT = "fedmeki-ckks/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class EncryptedTensor:
    """A plaintext tensor and the ciphertexts that pack it."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ciphertexts(self) -> int:
        return -(-self.size // SLOTS)

    def slots(self, index: int) -> int:
        """How many values ciphertext `index` holds (the last one holds the remainder)."""
        return min(SLOTS, self.size - index * SLOTS)

    def blob_name(self, index: int) -> str:
        return f"{self.name}/{index}"

    @classmethod
    def of(cls, spec: TensorSpec) -> EncryptedTensor:
        return cls(spec.name, spec.dtype, spec.shape)


@dataclass(frozen=True)
class CiphertextHeader:
    """What a ciphertext file's header says; blob offsets are absolute positions in the file."""

    fingerprint: str
    tensors: tuple[EncryptedTensor, ...]
    blobs: Mapping[str, tuple[int, int]]
    total_weight: float | None = None
    updates: int = 0

    def require(self, manifest: Sequence[TensorSpec], fingerprint: str, what: str = "ciphertexts") -> None:
        """Raise InvalidUpdateError unless the file holds exactly `manifest`'s tensors under `fingerprint`."""
        if self.fingerprint != fingerprint:
            raise InvalidUpdateError(
                f"{what} were made under CKKS context {self.fingerprint[:12]}…, this job's context is "
                f"{fingerprint[:12]}… (a silo with another key set?)"
            )
        expected = {spec.name: EncryptedTensor.of(spec) for spec in manifest}
        found = {tensor.name: tensor for tensor in self.tensors}
        missing = sorted(expected.keys() - found.keys())
        if missing:
            raise InvalidUpdateError(f"{what}: missing tensor {missing[0]!r} required by the round's manifest")
        unknown = sorted(found.keys() - expected.keys())
        if unknown:
            raise InvalidUpdateError(f"{what}: tensor {unknown[0]!r} is not in the round's manifest")
        for name, tensor in found.items():
            if tensor != expected[name]:
                raise InvalidUpdateError(
                    f"{what}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, the manifest says "
                    f"{expected[name].dtype} {list(expected[name].shape)}"
                )


def metadata(
    tensors: Sequence[EncryptedTensor], fingerprint: str, total_weight: float | None = None, updates: int = 0
) -> dict[str, str]:
    described = [
        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "slots": SLOTS, "ciphertexts": t.ciphertexts}
        for t in tensors
    ]
    values = {"format": FORMAT, "context_sha256": fingerprint, "tensors": json.dumps(described)}
    if total_weight is not None:
        values |= {"total_weight": repr(float(total_weight)), "updates": str(updates)}
    return values


def parse_header(header: Mapping[str, Any], data_start: int = 0) -> CiphertextHeader:
    """Check a parsed safetensors header is a well-formed ciphertext file; InvalidUpdateError names the problem."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidUpdateError(f"not a CKKS ciphertext file: its __metadata__ lacks format {FORMAT!r}")
    fingerprint = meta.get("context_sha256")
    if not isinstance(fingerprint, str) or not _SHA256.match(fingerprint):
        raise InvalidUpdateError("ciphertext file: context_sha256 must be 64 lowercase hex digits")
    tensors = _parse_tensors(meta.get("tensors"))
    blobs: dict[str, tuple[int, int]] = {}
    for tensor in tensors:
        for index in range(tensor.ciphertexts):
            blob = tensor.blob_name(index)
            entry = header.get(blob)
            if not isinstance(entry, dict):
                raise InvalidUpdateError(
                    f"ciphertext file: tensor {tensor.name!r} needs {tensor.ciphertexts} ciphertexts, "
                    f"{blob!r} is missing"
                )
            start, end = (int(v) for v in entry["data_offsets"])
            if entry["dtype"] != "U8" or list(entry["shape"]) != [end - start]:
                raise InvalidUpdateError(f"ciphertext {blob!r} must be a U8 vector of its byte length")
            if end == start:
                raise InvalidUpdateError(f"ciphertext {blob!r} is empty (0 bytes): refused")
            if end - start > MAX_CIPHERTEXT_BYTES:
                raise InvalidUpdateError(
                    f"ciphertext {blob!r} has {end - start} bytes, more than a CKKS ciphertext of these parameters "
                    f"({MAX_CIPHERTEXT_BYTES})"
                )
            blobs[blob] = (data_start + start, data_start + end)
    extra = sorted(set(header) - set(blobs) - {"__metadata__"})
    if extra:
        raise InvalidUpdateError(f"ciphertext file: entry {extra[0]!r} belongs to no tensor of its metadata")
    total_weight = _parse_weight(meta.get("total_weight"))
    updates = meta.get("updates", "0")
    if not isinstance(updates, str) or not updates.isdigit():
        raise InvalidUpdateError("ciphertext file: updates must be a count")
    return CiphertextHeader(fingerprint, tuple(tensors), blobs, total_weight, int(updates))


def _parse_tensors(raw: Any) -> list[EncryptedTensor]:
    try:
        described = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        described = None
    if not isinstance(described, list):
        raise InvalidUpdateError("ciphertext file: metadata 'tensors' must be a JSON list")
    tensors, seen = [], set()
    for item in described:
        ok = isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("dtype"), str)
        shape = item.get("shape") if ok else None
        if not ok or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidUpdateError("ciphertext file: each tensor needs a name, a dtype and a shape")
        tensor = EncryptedTensor(item["name"], item["dtype"], tuple(shape))
        if item.get("slots") != SLOTS or item.get("ciphertexts") != tensor.ciphertexts:
            raise InvalidUpdateError(
                f"ciphertext file: tensor {tensor.name!r} of shape {list(shape)} packs {SLOTS} values a ciphertext "
                f"in {tensor.ciphertexts} ciphertexts; the metadata says {item.get('slots')} values in "
                f"{item.get('ciphertexts')}"
            )
        if tensor.name in seen:
            raise InvalidUpdateError(f"ciphertext file: tensor {tensor.name!r} is described twice")
        seen.add(tensor.name)
        tensors.append(tensor)
    return tensors


def _parse_weight(raw: Any) -> float | None:
    if raw is None:
        return None
    try:
        weight = float(raw)
    except (TypeError, ValueError):
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise InvalidUpdateError(f"ciphertext file: total_weight must be a positive number, got {raw!r}")
    return weight


def read_ciphertext_header(path: Path) -> CiphertextHeader:
    header = read_header(path)
    with path.open("rb") as f:
        length = int.from_bytes(f.read(HEADER_PREFIX_BYTES), "little")
    return parse_header(header, HEADER_PREFIX_BYTES + length)


class CiphertextWriter:
    """Writes a ciphertext file to a seekable binary file, one ciphertext at a time, in the tensors' order."""

    def __init__(
        self,
        f: BinaryIO,
        tensors: Sequence[EncryptedTensor],
        fingerprint: str,
        total_weight: float | None = None,
        updates: int = 0,
    ) -> None:
        self._f = f
        self._metadata = metadata(tensors, fingerprint, total_weight, updates)
        self._pending = [(t, i) for t in tensors for i in range(t.ciphertexts)]
        self._written: list[TensorSpec] = []
        self._start = f.tell()
        self._reserved = len(safetensors_header(self._blob_specs(MAX_CIPHERTEXT_BYTES), self._metadata))
        f.write(b"\0" * self._reserved)

    def _blob_specs(self, size: int) -> list[TensorSpec]:
        return [TensorSpec(tensor.blob_name(index), "U8", (size,)) for tensor, index in self._pending]

    def add(self, blob: bytes) -> None:
        position = len(self._written)
        if position == len(self._pending):
            raise ValueError("more ciphertexts than the tensors need")
        if not 0 < len(blob) <= MAX_CIPHERTEXT_BYTES:
            raise ValueError(f"a ciphertext of {len(blob)} bytes")
        tensor, index = self._pending[position]
        self._f.write(blob)
        self._written.append(TensorSpec(tensor.blob_name(index), "U8", (len(blob),)))

    def finish(self) -> None:
        """Rewrite the header with the true sizes; the file position is left at the end of the data."""
        if len(self._written) != len(self._pending):
            raise ValueError(f"{len(self._written)} of {len(self._pending)} ciphertexts written")
        end = self._f.tell()
        self._f.seek(self._start)
        self._f.write(safetensors_header(self._written, self._metadata, min_length=self._reserved))
        self._f.seek(end)


class CiphertextReader:
    """Reads a ciphertext file's blobs by name with plain reads (no memory map)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = read_ciphertext_header(path)
        self._f = path.open("rb")

    def __enter__(self) -> CiphertextReader:
        return self

    def __exit__(self, *_: object) -> None:
        self._f.close()

    def blob(self, tensor: EncryptedTensor, index: int) -> bytes:
        start, end = self.header.blobs[tensor.blob_name(index)]
        self._f.seek(start)
        data = self._f.read(end - start)
        if len(data) != end - start:
            raise InvalidUpdateError(f"{self.path.name}: file ends inside ciphertext {tensor.blob_name(index)!r}")
        return data

    def blobs(self) -> Iterator[tuple[EncryptedTensor, int, bytes]]:
        for tensor in self.header.tensors:
            for index in range(tensor.ciphertexts):
                yield tensor, index, self.blob(tensor, index)
