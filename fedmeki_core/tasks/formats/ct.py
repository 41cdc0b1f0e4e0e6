"""Chest CT from NIfTI (nibabel) or a DICOM series folder: volumes [1, D, S, S] and slices [K, 1, S, S] in [0, 1].

Arrays are (D, H, W) axial-first in the radiological view: slices from feet to head, rows from anterior to
posterior, columns from the patient's right to left, whichever format the volume came in. A series is refused when
its slices repeat a position, leave a gap, change orientation or lack a rescale to Hounsfield units; a NIfTI file
when its header promises more than MAX_VOXELS or is CIFTI; either when its values cannot be chest CT.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import CT_DICOM, DicomAcceptance
from fedmeki_core.tasks.formats.rules import ImportOptions, check_dicom, check_hounsfield, check_size, one_line
from fedmeki_core.tasks.formats.xray import centre_square, dicom_pixels, is_dicom, modality_values, read_dicom_dataset

FloatArray = np.ndarray[Any, np.dtype[np.float32]]
MaskArray = np.ndarray[Any, np.dtype[np.uint8]]

HU_MIN, HU_MAX = -1000.0, 400.0  # the lung-and-mediastinum window
MAX_VOXELS = 512 * 512 * 1024  # 1 GiB as float32: a thin-slice chest CT fits, a forged header does not
# Slices closer than this (mm) share a position; a spacing this many times the median is a gap.
SAME_POSITION_MM, GAP_FACTOR = 1e-3, 1.5
_CIFTI_INTENTS = range(3000, 3100)  # NIFTI_INTENT_CONNECTIVITY_* codes carried by CIFTI-2 files


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def read_ct_volume(
    path: Path,
    depth: int,
    image_size: int,
    options: ImportOptions | None = None,
    accepts: DicomAcceptance = CT_DICOM,
) -> FloatArray:
    """A CT volume as [1, depth, S, S] float32: resampled by linear index sampling, windowed to [0, 1]."""
    path, options = Path(path), options or ImportOptions()
    if depth < 1 or image_size < 1:
        raise InvalidInputError(f"CT depth and image size must be positive, got {depth} and {image_size}")
    if path.is_dir():
        hounsfield = _read_dicom_series(path, accepts, options)
    elif not path.exists():
        raise InvalidInputError(f"CT volume {path} does not exist")
    elif is_nifti(path):
        hounsfield = read_nifti_volume(path, hounsfield=True)
    else:
        raise InvalidInputError(f"{path}: not a CT format we read (NIfTI .nii/.nii.gz, or a DICOM series folder)")
    if hounsfield.shape[0] < depth and not options.resample_slices:
        raise InvalidInputError(
            f"{path}: {hounsfield.shape[0]} slices, fewer than the task's depth of {depth}; "
            "pass --resample-slices to interpolate between them"
        )
    check_size(hounsfield.shape[1:], image_size, path)
    square = centre_square(hounsfield)
    resampled = resample_axis(square, 1, image_size)
    resampled = resample_axis(resample_axis(resampled, 2, image_size), 0, depth)
    return window(resampled)[np.newaxis]


def read_ct_slices(image_path: Path, mask_path: Path, image_size: int) -> tuple[FloatArray, MaskArray]:
    """Every axial slice of a NIfTI volume and its NIfTI mask: images [K, 1, S, S] in [0, 1], masks [K, S, S] 0/1."""
    image_path, mask_path = Path(image_path), Path(mask_path)
    volume, mask = read_nifti_volume(image_path, hounsfield=True), read_nifti_volume(mask_path)
    if volume.shape != mask.shape:
        raise InvalidInputError(
            f"{mask_path}: mask shape {list(mask.shape)} differs from the shape {list(volume.shape)} of {image_path}"
        )
    if image_size < 1:
        raise InvalidInputError(f"image size must be positive, got {image_size}")
    images = resample_axis(resample_axis(centre_square(volume), 1, image_size), 2, image_size)
    binary = (centre_square(mask) > 0).astype(np.uint8)
    masks = resample_axis(resample_axis(binary, 1, image_size, linear=False), 2, image_size, linear=False)
    return window(images)[:, np.newaxis], masks.astype(np.uint8)


def window(hounsfield: np.ndarray[Any, Any]) -> FloatArray:
    """Hounsfield units -1000..400 mapped linearly to [0, 1], clipped outside."""
    return np.clip((hounsfield - HU_MIN) / (HU_MAX - HU_MIN), 0.0, 1.0).astype(np.float32)


def resample_axis(volume: np.ndarray[Any, Any], axis: int, size: int, *, linear: bool = True) -> np.ndarray[Any, Any]:
    """`volume` resampled to `size` samples along `axis`, the end samples kept in place (linear or nearest)."""
    length = volume.shape[axis]
    if length == size:
        return volume
    positions = np.linspace(0.0, length - 1, size) if size > 1 else np.array([(length - 1) / 2])
    if not linear:
        return np.take(volume, np.rint(positions).astype(np.int64), axis=axis)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, length - 1)
    shape = [1] * volume.ndim
    shape[axis] = size
    fraction = (positions - low).reshape(shape)
    return np.asarray(np.take(volume, low, axis=axis) * (1 - fraction) + np.take(volume, high, axis=axis) * fraction)


def read_nifti_volume(path: Path, *, hounsfield: bool = False) -> np.ndarray[Any, Any]:
    """A NIfTI volume in its stored units (scl_slope/scl_inter applied) as float32 (D, H, W); with `hounsfield`,
    refused unless its values can be chest CT. The header is checked before any voxel is read."""
    if not path.is_file():
        raise InvalidInputError(f"NIfTI file {path} does not exist")
    if not is_nifti(path):
        raise InvalidInputError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.load(path)  # reads the header only
        _check_nifti_header(image, path)
        image = nib.as_closest_canonical(image)  # type: ignore[no-untyped-call]  # axes to RAS+
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (ImageFileError, OSError, ValueError, EOFError, TypeError) as exc:
        raise InvalidInputError(f"{path}: not a readable NIfTI file ({one_line(exc)})") from None
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and all(n == 1 for n in data.shape[3:]) else data
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim != 3 or 0 in data.shape:
        raise InvalidInputError(f"{path}: expected a 3-D volume, got shape {list(data.shape)}")
    if not np.isfinite(data).all():
        raise InvalidInputError(f"{path}: volume holds NaN or infinite values")
    if hounsfield:
        check_hounsfield(data, path)
    # RAS+ (x, y, z) -> (z, y, x), then flip y and x: rows run anterior to posterior, columns right to left.
    return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


def _check_nifti_header(image: Any, path: Path) -> None:
    """Refuse CIFTI, and any shape beyond MAX_VOXELS or with more than one volume, before reading voxels."""
    intent = int(np.asarray(image.header.get("intent_code", 0))) if hasattr(image.header, "get") else 0
    if isinstance(image, nib.Cifti2Image) or intent in _CIFTI_INTENTS:
        raise InvalidInputError(f"{path}: a CIFTI-2 file (brain surface/grayordinate data), not a CT volume")
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InvalidInputError(f"{path}: a {type(image).__name__}, not a NIfTI-1/NIfTI-2 volume")
    shape = tuple(int(n) for n in image.shape)
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise InvalidInputError(
            f"{path}: header declares {' x '.join(map(str, shape))} = {voxels:,} voxels, over the cap of {MAX_VOXELS:,}"
        )
    if len(shape) > 3 and math.prod(shape[3:]) > 1:
        raise InvalidInputError(f"{path}: holds {math.prod(shape[3:])} volumes (shape {list(shape)}); import one")


def _read_dicom_series(folder: Path, accepts: DicomAcceptance, options: ImportOptions) -> np.ndarray[Any, Any]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom(p))
    if not files:
        raise InvalidInputError(f"{folder}: no DICOM image files in the folder")
    datasets = [(p, read_dicom_dataset(p)) for p in files]
    for path, ds in datasets:
        if check_dicom(ds, path, accepts, options) > 1:
            raise InvalidInputError(f"{path}: a multi-frame file in a CT series; export the series as single slices")
        if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
            raise InvalidInputError(f"{path}: CT slice without Rescale Slope/Intercept: no Hounsfield units")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise InvalidInputError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
    orientations = {tuple(round(v, 4) for v in _orientation(path, ds)) for path, ds in datasets}
    if len(orientations) > 1:
        raise InvalidInputError(f"{folder}: slices differ in orientation ({len(orientations)} orientations)")
    positioned = sorted(((_slice_position(path, ds), path, ds) for path, ds in datasets), key=lambda item: item[0])
    _check_spacing(folder, np.array([position for position, _, _ in positioned]))
    slices = [modality_values(dicom_pixels(ds, path), ds).astype(np.float32) for _, path, ds in positioned]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InvalidInputError(f"{folder}: slices differ in shape or are not 2-D: {sorted(map(list, shapes))}")
    volume = np.stack(slices)
    check_hounsfield(volume, folder)
    return volume


def _check_spacing(folder: Path, positions: np.ndarray[Any, Any]) -> None:
    """Refuse slices that share a position, and a spacing over GAP_FACTOR times the median (a missing slice)."""
    steps = np.diff(positions)
    repeated = int(np.sum(steps < SAME_POSITION_MM))
    if repeated:
        raise InvalidInputError(f"{folder}: {repeated} slices repeat the position of another slice (duplicates)")
    if steps.size < 2:
        return
    median = float(np.median(steps))
    widest = int(np.argmax(steps))
    if steps[widest] > GAP_FACTOR * median:
        raise InvalidInputError(
            f"{folder}: a gap of {steps[widest]:.2f} mm after slice {widest + 1} of {positions.size} where the "
            f"series steps {median:.2f} mm (a missing slice?)"
        )


def _orientation(path: Path, ds: Any) -> list[float]:
    try:
        return [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{path}: DICOM slice has no valid ImageOrientationPatient") from None


def _slice_position(path: Path, ds: Any) -> float:
    """The slice's position along its normal; z for axial slices."""
    try:
        position = np.array([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        raise InvalidInputError(f"{path}: DICOM slice has no valid ImagePositionPatient") from None
    orientation = _orientation(path, ds)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(position @ normal)
