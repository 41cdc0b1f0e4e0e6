"""A training job's `normalise: {from_job: ID}`, checked at submission and filled in with the statistics job's
global means and standard deviations, so every silo standardises its table the same way."""

from __future__ import annotations

from sqlalchemy.orm import Session

from coordinator.artifacts import Artifacts
from coordinator.modes import mode_class
from coordinator.statistics_rounds import read_tensors
from coordinator.store.views import find_job_row, latest_checkpoint
from fedmeki_core.architectures import ARCHITECTURES
from fedmeki_core.errors import FedmekiError, InvalidJobSpecError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.records import JobState
from fedmeki_core.statistics_table import normaliser
from fedmeki_core.stored_spec import read_stored_spec

_FIELD = "normalise.from_job"


def with_normaliser(session: Session, artifacts: Artifacts, spec: JobSpec) -> JobSpec:
    """`spec` with its normaliser's figures; InvalidJobSpecError when the named job cannot provide them."""
    wanted = spec.normalise
    if wanted is None:
        return spec
    if wanted.mean:
        raise InvalidJobSpecError("normalise.mean", "is filled in from the statistics job: give from_job only")
    job = find_job_row(session, wanted.from_job)
    if job is None:
        raise InvalidJobSpecError(_FIELD, f"no job {wanted.from_job!r}")
    source = read_stored_spec(job.spec)
    statistics = source.statistics
    if statistics is None:
        raise InvalidJobSpecError(_FIELD, f"job {job.id} is a training job, not a statistics job")
    if not mode_class(source).plaintext_result:
        raise InvalidJobSpecError(
            _FIELD, f"statistics job {job.id} summed its figures under CKKS: the coordinator cannot read its result"
        )
    if job.state != JobState.COMPLETED.value:
        raise InvalidJobSpecError(_FIELD, f"statistics job {job.id} is {job.state}, not completed")
    if source.task != spec.task:
        raise InvalidJobSpecError(_FIELD, f"statistics job {job.id} read task {source.task}, this job {spec.task}")
    config = {**ARCHITECTURES[spec.model.architecture], **spec.model.config}
    width = config.get("num_features")
    if width != len(statistics.features):
        raise InvalidJobSpecError(
            _FIELD,
            f"statistics job {job.id} has {len(statistics.features)} features; the model takes {width} "
            "(model.config.num_features)",
        )
    checkpoint = latest_checkpoint(session, job.id)
    assert checkpoint is not None  # a completed job has its result
    try:
        mean, std = normaliser(statistics, read_tensors(artifacts.absolute(checkpoint.path)))
    except FedmekiError as exc:
        raise InvalidJobSpecError(_FIELD, f"statistics job {job.id}: {exc.message}") from None
    return spec.model_copy(update={"normalise": wanted.model_copy(update={"mean": tuple(mean), "std": tuple(std)})})
