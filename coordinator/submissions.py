"""Idempotent submission: a job remembers the request id its submitter gave it, so that a SubmitJob sent again
(its answer was lost on the wire) answers the job the first one created instead of creating a second.

The id is unique per submitting principal (a unique index on (submitted_by, request_id)): two researchers
may use the same id, and two concurrent submissions with one id cannot both insert a job, whatever the timing.
The request's digest (spec, weights, CKKS context) tells a true retry from an id reused for something else.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.store.models import Job
from fedmeki_core.errors import AlreadyExistsError, InvalidInputError
from fedmeki_core.jobspec import JobSpec

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True)
class Submission:
    """Who submits, under which request id ("" when the client sent none), and the digest of what they send."""

    submitted_by: str
    request_id: str
    digest: str

    @classmethod
    def of(
        cls,
        submitted_by: str,
        request_id: str,
        spec: JobSpec,
        weights_size: int,
        weights_sha256: str,
        ckks_public_context: bytes = b"",
    ) -> Submission:
        if request_id and not _REQUEST_ID.fullmatch(request_id):
            raise InvalidInputError("request_id must be 1 to 64 characters of A-Z a-z 0-9 . _ : -")
        digest = hashlib.sha256()
        # The spec as the coordinator parsed it: the same request sent twice gives the same canonical form.
        digest.update(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode())
        digest.update(f"\0{weights_size}\0{weights_sha256.lower()}\0".encode())
        digest.update(hashlib.sha256(ckks_public_context).digest())
        return cls(submitted_by, request_id, digest.hexdigest())


def earlier_job(session: Session, submission: Submission) -> Job | None:
    """The job this submission's request id already created, if any; an id reused for a different request is
    refused (ALREADY_EXISTS), never answered with a job that is not what was asked for."""
    if not submission.request_id:
        return None
    job = session.scalars(
        select(Job).where(Job.submitted_by == submission.submitted_by, Job.request_id == submission.request_id)
    ).one_or_none()
    if job is not None and job.request_digest != submission.digest:
        raise AlreadyExistsError(
            f"request id {submission.request_id!r} was already used for job {job.id}, with a different spec, "
            "initial weights or CKKS context: submit a new job under a new request id"
        )
    return job
