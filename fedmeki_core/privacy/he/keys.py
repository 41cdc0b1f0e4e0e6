"""CKKS keys for secure aggregation: made at the hospitals' side, never by the coordinator.

One TenSEAL CKKS context per federation. Its **secret** serialisation (with the secret key) goes to every silo;
its **public** serialisation (public key only: no secret key, and no relinearisation or Galois keys, which
addition does not need) goes to the coordinator with the job. The context's **fingerprint** is the sha256 of
the public serialisation; every ciphertext file names it, so ciphertexts of another key set are refused by name.

Parameters (measured for addition-only aggregation, issue 5): N = 8192 (4096 slots per ciphertext),
coefficient moduli [60, 40] bits, scale 2^40. A fresh ciphertext then has one 60-bit data prime, so a slot
holds values of magnitude below 2^(60-40-1) = 2^19 (the sum of the silos' weighted deltas must stay inside it).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenseal as ts

from fedmeki_core.errors import InvalidInputError

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40)
SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2  # values one ciphertext packs
# A fresh ciphertext: 2 polynomials x N coefficients x 1 data prime x 8 bytes, plus the serialisation's headers.
MAX_CIPHERTEXT_BYTES = 2 * POLY_MODULUS_DEGREE * (len(COEFF_MOD_BIT_SIZES) - 1) * 8 + 4096

SECRET_FILE = "secret.ckks"  # noqa: S105 (a file name)
PUBLIC_FILE = "public.ckks"


@dataclass(frozen=True)
class CkksContext:
    """A TenSEAL CKKS context and its fingerprint; only a secret context can decrypt."""

    context: Any  # tenseal.Context (untyped library)
    fingerprint: str

    @property
    def is_secret(self) -> bool:
        return bool(self.context.is_private())


def generate_context() -> CkksContext:
    """A new secret context with the federation's parameters (at provisioning, on the hospitals' side)."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES)
    )
    context.global_scale = 2.0**SCALE_BITS
    return CkksContext(context, _fingerprint(context))


def public_bytes(context: CkksContext) -> bytes:
    """The serialisation the coordinator gets: the public key and the parameters, nothing that decrypts."""
    return bytes(
        context.context.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
    )


def secret_bytes(context: CkksContext) -> bytes:
    """The serialisation every silo of the federation gets: the public and the secret key."""
    if not context.is_secret:
        raise InvalidInputError("this CKKS context holds no secret key")
    return bytes(
        context.context.serialize(
            save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
    )


def load_context(data: bytes, what: str = "CKKS context", n_threads: int | None = None) -> CkksContext:
    """Parse a serialised context and check it has the federation's parameters. TenSEAL starts `n_threads` threads
    for it (None: one per CPU), which live as long as the context."""
    try:
        context = ts.context_from(data, n_threads=n_threads)
    except (ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"{what} is not a TenSEAL context: {exc}") from None
    parameters = context.seal_context().data.key_context_data()
    degree = parameters.parms().poly_modulus_degree()
    bits = parameters.total_coeff_modulus_bit_count()
    if (
        parameters.parms().scheme().name != "CKKS"
        or degree != POLY_MODULUS_DEGREE
        or bits != sum(COEFF_MOD_BIT_SIZES)
        or context.global_scale != 2.0**SCALE_BITS
    ):
        raise InvalidInputError(
            f"{what} does not have fedmeki's CKKS parameters (N {POLY_MODULUS_DEGREE}, coefficient moduli "
            f"{list(COEFF_MOD_BIT_SIZES)}, scale 2^{SCALE_BITS})"
        )
    if not context.has_public_key():
        raise InvalidInputError(f"{what} holds no public key")
    return CkksContext(context, _fingerprint(context))


def load_public_context(data: bytes, n_threads: int | None = None) -> CkksContext:
    """The coordinator's view: a public context; one that holds a secret key is refused, never stored."""
    context = load_context(data, "the public CKKS context", n_threads)
    if context.is_secret:
        raise InvalidInputError(
            "the public CKKS context holds a secret key: send public.ckks, never secret.ckks, to the coordinator"
        )
    return context


def read_secret_context(path: Path) -> CkksContext:
    """A silo's context, from the file `fedmeki he keygen` wrote."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the CKKS secret context {path}: {exc}") from None
    context = load_context(data, f"CKKS secret context {path}")
    if not context.is_secret:
        raise InvalidInputError(f"{path} holds no secret key (is it {PUBLIC_FILE}?)")
    return context


def write_key_files(directory: Path) -> CkksContext:
    """Make a key set: `secret.ckks` (mode 0600) for every silo and `public.ckks` for the job submitter."""
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / SECRET_FILE
    if secret.exists():
        raise InvalidInputError(f"{secret} exists: a key set in use is never overwritten")
    context = generate_context()
    fd = os.open(secret, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # never overwrite a key in use
    with open(fd, "wb") as f:
        f.write(secret_bytes(context))
    (directory / PUBLIC_FILE).write_bytes(public_bytes(context))
    return context


def _fingerprint(context: Any) -> str:
    return hashlib.sha256(public_bytes(CkksContext(context, ""))).hexdigest()
