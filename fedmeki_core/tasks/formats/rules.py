"""What an imaging import accepts: DICOM modality and SOP class, burned-in text, frames, sizes, CT intensities.

Every rule refuses with one InvalidInputError line that names the file and says what it is; the readers in
xray.py and ct.py call them before decoding pixels where the header suffices. `quiet_readers` keeps pydicom's and
nibabel's warnings and logged tracebacks off the console and counts them for the import report instead.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import UID

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import DicomAcceptance

# An image is refused when the task would enlarge it more than this factor (a 3x3 image is no radiograph).
MAX_UPSCALE = 2.0
# Chest CT in Hounsfield units: the lungs and the air around the body lie at or below -500 HU, and the bulk of
# the values within the 12-bit range CT scanners store (-1024..3071).
AIR_HU, MIN_AIR_FRACTION, MAX_BULK_HU = -500.0, 0.01, 3071.0
_THIRD_PARTY_LOGGERS = ("pydicom", "nibabel")


class Frames(enum.StrEnum):
    """What to do with a multi-frame DICOM file."""

    REFUSE = "refuse"
    FIRST = "first"  # keep frame 0, say so in the report
    ALL = "all"  # one sample per frame, each with the file's label


@dataclass(frozen=True)
class ImportOptions:
    frames: Frames = Frames.REFUSE
    allow_burned_in: bool = False
    resample_slices: bool = False  # build a CT volume from fewer slices than the task's depth by interpolation


@dataclass
class ReaderNoise:
    """What third-party readers said while one file was read: counted, never printed (their text can quote
    header values such as dates)."""

    warnings: int = 0
    log_records: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        said = self.warnings + self.log_records
        return [*self.notes, *([f"{said} reader warnings (pydicom/nibabel) not shown"] if said else [])]


class _Counter(logging.Handler):
    def __init__(self, noise: ReaderNoise) -> None:
        super().__init__(logging.DEBUG)
        self.noise = noise

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.noise.log_records += 1


@contextlib.contextmanager
def quiet_readers(noise: ReaderNoise) -> Iterator[ReaderNoise]:
    """Count pydicom's and nibabel's warnings and log records (tracebacks included) instead of printing them."""
    loggers = [logging.getLogger(name) for name in _THIRD_PARTY_LOGGERS]
    saved = [(logger.propagate, list(logger.handlers)) for logger in loggers]
    counter = _Counter(noise)
    for logger in loggers:
        logger.propagate, logger.handlers = False, [counter]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield noise
        noise.warnings += len(caught)
    finally:
        for logger, (propagate, handlers) in zip(loggers, saved, strict=True):
            logger.propagate, logger.handlers = propagate, handlers


def one_line(exc: BaseException) -> str:
    """A third-party exception's text on one line (pydicom's decoder errors span several)."""
    return " ".join(str(exc).split())


def describe_dicom(ds: pydicom.Dataset) -> str:
    """What a DICOM file is, from its SOP class and modality: e.g. 'RT Dose Storage (modality RTDOSE)'."""
    sop = str(ds.get("SOPClassUID", "") or "")
    name = UID(sop).name if sop else "no SOP class"
    return f"{name} (modality {ds.get('Modality', '') or 'not set'})"


def check_dicom(ds: pydicom.Dataset, path: Path, accepts: DicomAcceptance, options: ImportOptions) -> int:
    """Refuse a DICOM file the task does not take; return how many frames it holds."""
    modality = str(ds.get("Modality", "") or "")
    sop = str(ds.get("SOPClassUID", "") or "")
    if modality not in accepts.modalities or sop not in accepts.sop_classes:
        raise InvalidInputError(f"{path}: {describe_dicom(ds)} is not {accepts.describe()}")
    if str(ds.get("BurnedInAnnotation", "") or "").upper() == "YES" and not options.allow_burned_in:
        raise InvalidInputError(
            f"{path}: Burned In Annotation is YES (text such as names may be drawn into the pixels); "
            "pass --allow-burned-in only for images checked to be clean"
        )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{path}: Number of Frames is not a whole number") from None
    if frames > 1 and options.frames == Frames.REFUSE:
        raise InvalidInputError(f"{path}: a multi-frame file ({frames} frames); choose --frames first or all")
    return frames


def check_size(shape: tuple[int, ...], image_size: int, path: Path) -> None:
    """Refuse an image (height, width) the task would have to enlarge more than MAX_UPSCALE times."""
    height, width = shape
    least = math.ceil(image_size / MAX_UPSCALE)
    if min(height, width) < least:
        raise InvalidInputError(
            f"{path}: image of {height}x{width} pixels is too small for {image_size}x{image_size} "
            f"(the shorter side must be at least {least} pixels)"
        )


def check_hounsfield(volume: np.ndarray[Any, Any], path: Path) -> None:
    """Refuse a volume whose values cannot be the Hounsfield units of a chest CT (MR, dose grids, 0..1 images)."""
    if volume.size == 0:
        raise InvalidInputError(f"{path}: empty volume")
    air = float(np.mean(volume <= AIR_HU))
    bulk = float(np.percentile(volume, 99))
    if air < MIN_AIR_FRACTION or bulk > MAX_BULK_HU:
        low, high = float(volume.min()), float(volume.max())
        raise InvalidInputError(
            f"{path}: values {low:g}..{high:g} cannot be chest CT Hounsfield units ({air:.1%} of voxels at or "
            f"below {AIR_HU:g} HU, where a chest CT has at least {MIN_AIR_FRACTION:.0%}; 99th percentile "
            f"{bulk:g}, at most {MAX_BULK_HU:g})"
        )
