"""Admission: whether a silo may upload to a round now (`UploadOffset`, and `UploadUpdate` before its bytes), and
what an admitted upload must match.

Each upload asks twice (its offset, then its header) and hundreds of silos ask in a round, so a check reads only
the round's state, joined to its job's; what never changes while a job runs (its spec, its manifest, what they
imply) is read once per job and kept (`JobTerms`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator import cyclic
from coordinator.credentials import SiloIdentity
from coordinator.modes import Modes
from coordinator.rounds import round_for_silo, same_update, silo_round, takes_report
from coordinator.secure_aggregation import require_encoding
from coordinator.store.database import Database
from coordinator.store.models import Job
from coordinator.store.views import is_job_id, tensor_specs
from fedmeki_core.algorithms.update_limits import UpdateLimits, update_limits
from fedmeki_core.encodings import DeltaEncoding, encoded_manifest
from fedmeki_core.errors import NotFoundError, PreconditionError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.privacy.he import CkksContext
from fedmeki_core.recent import Recent
from fedmeki_core.records import RoundKind, UpdateReceipt
from fedmeki_core.stored_spec import read_stored_spec
from fedmeki_core.stream_validation import ExpectedLayout
from fedmeki_core.wire import TensorSpec

_KEPT_JOBS = 64  # jobs whose terms are kept: a coordinator runs a few at a time


@dataclass(frozen=True)
class UploadHeader:
    """An upload's first message, checked at the door (sizes, digest, sample count, finite metrics)."""

    job_id: str
    round: int
    num_samples: int
    metrics: dict[str, float]
    encoding: str
    total_size: int
    sha256: str
    relay_hop: int = 0  # a cyclic round's hop (1..K+1); 0 for every other upload
    offset: int = 0  # where a resumed upload's bytes continue


@dataclass(frozen=True)
class JobTerms:
    """What a job's uploads are checked against, fixed at its submission."""

    spec: JobSpec
    job_manifest: list[TensorSpec]  # the model's tensors, as the round's running sum holds them
    manifest: list[TensorSpec]  # in the job's delta encoding: what an update's bytes must match
    layout: ExpectedLayout  # the same, derived for the stream validator
    limits: UpdateLimits  # the job's bounds on one update (max_update_norm, max_abs_value)


@dataclass(frozen=True)
class Admission:
    """An upload let in: what its bytes must match, and what recording it needs of the job, read at admission (the
    job's spec and manifest do not change while it runs) so that recording reads only the round's state again."""

    silo: SiloIdentity
    header: UploadHeader
    manifest: list[TensorSpec]  # in the job's delta encoding: what the bytes must match
    layout: ExpectedLayout  # the same, derived once per job for the stream validator
    ckks: CkksContext | None  # the job's public context when its updates are ciphertexts
    limits: UpdateLimits  # the job's bounds on one update (max_update_norm, max_abs_value), checked as bytes come
    spec: JobSpec
    job_manifest: list[TensorSpec]  # the model's tensors, as the round's running sum holds them


class UploadAdmission:
    def __init__(self, database: Database, modes: Modes) -> None:
        self._db = database
        self._modes = modes
        self._terms: Recent[str, JobTerms] = Recent(_KEPT_JOBS)  # job id -> its terms
        self._terms_lock = threading.Lock()

    def admit(self, silo: SiloIdentity, header: UploadHeader) -> UpdateReceipt | Admission:
        """One read before the bytes: the receipt of this very update if it was accepted already (a silo that lost
        its receipt sends it again and must get the same answer, even after the round closed), else what the
        upload must match; raises when it may not come now."""
        size, sha256, samples = header.total_size, header.sha256, header.num_samples
        with self._db.read() as session:
            terms = self._job_terms(session, header.job_id)
            if terms is not None and not header.relay_hop and not self._modes.of(header.job_id, terms.spec).ring:
                found = silo_round(session, silo, header.job_id, header.round)  # the round and the silo's report
                if found is not None and found.is_report(size, sha256, samples, with_file=True):
                    return UpdateReceipt(size, sha256)
                takes_report(found, silo, header.job_id, header.round, RoundKind.TRAIN)
            else:  # a ring's hops: several reports of one silo in a round
                existing = same_update(session, silo, header.job_id, header.round, size, sha256, samples)
                if existing is not None:
                    return UpdateReceipt(existing.size_bytes, existing.sha256)
                terms = self._check(session, silo, header.job_id, header.round, header.relay_hop)
        ckks = self._modes.of(header.job_id, terms.spec).context()  # None: a plaintext job
        require_encoding(header.encoding, ckks)
        return Admission(silo, header, terms.manifest, terms.layout, ckks, terms.limits, terms.spec, terms.job_manifest)

    def check(self, silo: SiloIdentity, job_id: str, round_number: int, hop: int = 0) -> None:
        """Raises when the silo may not upload to this round now (an upload's refusals, before any byte).

        `hop` is the hop of a cyclic secure-aggregation round (1..K+1), 0 for every other upload."""
        with self._db.read() as session:
            self._check(session, silo, job_id, round_number, hop)

    def ckks_context(self, job_id: str) -> CkksContext | None:
        """The public context of a CKKS job (its updates are ciphertexts); None for a plaintext job."""
        with self._db.read() as session:
            terms = self._job_terms(session, job_id)
        if terms is None:
            raise NotFoundError(f"no job {job_id!r}")
        return self._modes.of(job_id, terms.spec).context()

    def _check(self, session: Session, silo: SiloIdentity, job_id: str, round_number: int, hop: int) -> JobTerms:
        """The job's terms, if the silo may upload to this round now; raises otherwise."""
        terms = self._job_terms(session, job_id)
        if terms is None:
            raise PreconditionError(f"silo {silo.name!r} is not selected for round {round_number} of job {job_id!r}")
        if hop or self._modes.of(job_id, terms.spec).ring:
            # A ring's round takes hops in turn; a job without a ring refuses any hop (relay_round says which).
            _, ring_round = self._modes.relay_round(session, silo, job_id, round_number, hop)
            assert ring_round is not None
            cyclic.require_upload_turn(session, ring_round, silo.id, silo.name, hop)
        else:
            round_for_silo(session, silo, job_id, round_number, RoundKind.TRAIN)
        return terms

    def _job_terms(self, session: Session, job_id: str) -> JobTerms | None:
        """The job's terms, read from its row the first time (None: no such job)."""
        with self._terms_lock:
            terms = self._terms.get(job_id)
            if terms is not None:
                return terms
        if not is_job_id(job_id):
            return None
        found = session.execute(select(Job.spec, Job.manifest).where(Job.id == job_id)).first()
        if found is None:
            return None
        spec = read_stored_spec(found.spec)
        job_manifest = tensor_specs(found.manifest)
        manifest = encoded_manifest(job_manifest, DeltaEncoding.of(spec))
        terms = JobTerms(spec, job_manifest, manifest, ExpectedLayout(manifest), update_limits(spec.algorithm.options))
        with self._terms_lock:
            self._terms.put(job_id, terms)
        return terms
