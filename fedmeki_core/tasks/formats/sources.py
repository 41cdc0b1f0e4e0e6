"""Reading an import's source files one by one: each accepted or refused with its reason, and the report of it.

A refused file never stops the others from being read, so the report (`--report FILE`, CSV) has one row per
source file: `source,status,samples,reason,warnings`. The report names a file by its place in the import's listing
(`data row 3` of the labels CSV, `record 2` of the JSON) and never by its path, which hospitals often build from
patient IDs; the console lines name the path. Whether a refusal fails the whole import is the importer's call.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import CT_DICOM, XRAY_DICOM, Modality, TaskInfo
from fedmeki_core.tasks.dataset import FloatArray
from fedmeki_core.tasks.formats.ct import read_ct_volume
from fedmeki_core.tasks.formats.ecg import read_ecg
from fedmeki_core.tasks.formats.ehr import read_ehr
from fedmeki_core.tasks.formats.rules import ImportOptions, ReaderNoise, one_line, quiet_readers
from fedmeki_core.tasks.formats.xray import read_xray

T = TypeVar("T")
REPORT_COLUMNS = ("source", "status", "samples", "reason", "warnings")


@dataclass(frozen=True)
class SourceOutcome:
    file: str  # the path
    source: str  # its place in the listing: "data row 3", "record 2", "volume 1"
    samples: int  # what the file gave the dataset; 0 when refused
    reason: str = ""  # why it was refused (naming the path); empty when accepted
    warnings: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return not self.reason

    @property
    def reported_reason(self) -> str:
        """The reason with the path written as <source>."""
        return self.reason.replace(self.file, "<source>")


@dataclass(frozen=True)
class SampleRead:
    features: FloatArray  # [sum of samples, *sample]: the accepted files' samples in source order
    outcomes: tuple[SourceOutcome, ...]

    def repeat(self, values: Sequence[T]) -> list[T]:
        """One value per source -> one per sample: dropped for a refused file, repeated for a multi-frame one."""
        return [value for value, o in zip(values, self.outcomes, strict=True) for _ in range(o.samples)]


def read_source(file: str, read: Callable[[ReaderNoise], T]) -> tuple[T | None, str, tuple[str, ...]]:
    """(result or None, refusal reason or '', warnings) of reading one untrusted file, third-party output quiet."""
    noise = ReaderNoise()
    try:
        with quiet_readers(noise):
            result = read(noise)
    except InvalidInputError as exc:
        return None, exc.message, tuple(noise.summary())
    except Exception as exc:  # an untrusted file can trip any reader's own errors: refuse it, never a traceback
        return None, f"{file}: cannot be read ({type(exc).__name__}: {one_line(exc)})", tuple(noise.summary())
    return result, "", tuple(noise.summary())


def read_sample(
    task: TaskInfo,
    path: Path,
    image_size: int | None = None,
    options: ImportOptions | None = None,
    noise: ReaderNoise | None = None,
) -> FloatArray:
    """The samples of `task` one modality file holds, [K, *task.sample_shape(image_size)]; K > 1 only for the
    frames of a multi-frame DICOM file read with --frames all."""
    shape = task.sample_shape(image_size)
    if task.modality == Modality.XRAY:
        return read_xray(path, shape[1], options, noise, task.dicom or XRAY_DICOM)
    if task.modality == Modality.ECG:
        return read_ecg(path)[np.newaxis]
    if task.modality == Modality.EHR:
        return read_ehr(path, shape[0])[np.newaxis]
    if task.modality == Modality.CT_VOLUME:
        return read_ct_volume(path, shape[1], shape[2], options, task.dicom or CT_DICOM)[np.newaxis]
    raise InvalidInputError(f"task {task.name}: {task.modality.value} samples are not read one file per sample")


def read_samples(
    task: TaskInfo,
    paths: list[Path],
    image_size: int | None,
    *,
    label: str,
    first: int = 0,
    options: ImportOptions | None = None,
) -> SampleRead:
    """Every file read, each accepted or refused; each named `label` and its number (e.g. "data row 3")."""
    arrays: list[FloatArray] = []
    outcomes = []
    for index, path in enumerate(paths):

        def read(noise: ReaderNoise, path: Path = path) -> FloatArray:
            return read_sample(task, path, image_size, options, noise)

        samples, reason, warnings = read_source(str(path), read)
        where = f"{label} {index + first}"
        if samples is not None:
            arrays.append(samples)
        count = 0 if samples is None else len(samples)
        outcomes.append(SourceOutcome(str(path), where, count, reason, warnings))
    empty = np.empty((0, *task.sample_shape(image_size)), dtype=np.float32)
    return SampleRead(np.concatenate([empty, *arrays]), tuple(outcomes))


def refusal_summary(outcomes: Sequence[SourceOutcome]) -> str:
    """'' when every file was accepted; otherwise how many were refused and the first reason."""
    refused = [o for o in outcomes if not o.accepted]
    if not refused:
        return ""
    first = refused[0]
    return f"{len(refused)} of {len(outcomes)} source files refused; the first, {first.source}: {first.reason}"


def write_report(path: Path, outcomes: Sequence[SourceOutcome]) -> None:
    """The import report: one CSV row per source file."""
    rows: list[list[Any]] = [list(REPORT_COLUMNS)]
    for o in outcomes:
        status = "accepted" if o.accepted else "refused"
        rows.append([o.source, status, o.samples, o.reported_reason, "; ".join(o.warnings)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
