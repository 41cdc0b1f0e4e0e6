"""CKKS jobs on the coordinator: the job's public context, the checks of ciphertext uploads.

A job with `privacy.secure_aggregation: ckks` arrives with its public TenSEAL context (a context holding a secret
key is refused and never stored), kept beside its checkpoints as `public.ckks`. Silos upload ciphertext files
(encoding `ckks`); the coordinator checks their header against the round's manifest and the context's
fingerprint while the bytes arrive, then parses every ciphertext under the public context before accepting the
update. At the round's end it adds the ciphertexts (`CkksMode` in `coordinator/modes.py`); it never decrypts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from coordinator.artifacts import Artifacts
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.privacy.he import CkksContext, load_public_context, parse_header
from fedmeki_core.privacy.he.policy import require_additive
from fedmeki_core.recent import Recent
from fedmeki_core.wire import TensorSpec

PLAINTEXT_ENCODING = "safetensors"
CKKS_ENCODING = "ckks"
UPDATE_ENCODINGS = ("", PLAINTEXT_ENCODING, CKKS_ENCODING)  # "" is the plaintext default
THREADS = 1  # TenSEAL threads per context parsed here (its default is one per CPU, for every context)


def submitted_context(spec: JobSpec, public_context: bytes) -> CkksContext:
    """Check a submitted CKKS job's settings (`CkksMode.check_submission`); its parsed public context."""
    require_additive(spec)
    if not public_context:
        raise InvalidJobSpecError(
            "privacy.secure_aggregation",
            f"a {spec.privacy.secure_aggregation} job needs its public context "
            "(fedmeki job submit --ckks-public-context public.ckks)",
        )
    context = load_public_context(public_context, n_threads=THREADS)
    if context.fingerprint != spec.privacy.ckks_context_sha256:
        raise InvalidJobSpecError(
            "privacy.ckks_context_sha256",
            f"{spec.privacy.ckks_context_sha256 or '(empty)'} is not the fingerprint of the public context sent "
            f"with the job ({context.fingerprint})",
        )
    return context


def require_encoding(encoding: str, context: CkksContext | None) -> None:
    """An update travels as ciphertexts for a CKKS job and as plaintext safetensors otherwise, never the other way."""
    expected = PLAINTEXT_ENCODING if context is None else CKKS_ENCODING
    if (encoding or PLAINTEXT_ENCODING) != expected:
        raise InvalidInputError(
            f"this job takes updates encoded as {expected!r}, not {encoding or PLAINTEXT_ENCODING!r}"
        )


def ciphertext_header_check(manifest: list[TensorSpec], context: CkksContext) -> Callable[[dict[str, Any]], None]:
    """For the stream validator: the upload's header must describe the manifest's tensors under this context."""

    def check(header: dict[str, Any]) -> None:
        parse_header(header).require(manifest, context.fingerprint)

    return check


class CkksContexts:
    """The public contexts of CKKS jobs, stored with their checkpoints; the `limit` most recently used stay parsed.

    Each parsed context holds its keys (megabytes) and TenSEAL threads, so they are parsed with one thread each
    and the least recently used is dropped past the limit (parsed again from its file when next needed).
    """

    def __init__(self, artifacts: Artifacts, limit: int = 8) -> None:
        self._artifacts = artifacts
        self._loaded: Recent[str, CkksContext] = Recent(limit)
        self._lock = threading.Lock()

    def save(self, job_id: str, context: CkksContext, data: bytes) -> None:
        self._artifacts.write_ckks_context(job_id, data)
        with self._lock:
            self._loaded.put(job_id, context)

    def get(self, job_id: str) -> CkksContext:
        with self._lock:
            context = self._loaded.get(job_id)
            if context is None:
                data = self._artifacts.ckks_context_path(job_id).read_bytes()
                context = load_public_context(data, n_threads=THREADS)
            self._loaded.put(job_id, context)
            return context

    @property
    def parsed(self) -> int:
        return len(self._loaded)
