"""Chest CT from NIfTI (nibabel) or a DICOM series folder: volumes [1, D, S, S] and slices [K, 1, S, S] in [0, 1].

Arrays are (D, H, W) axial-first in the radiological view: slices from feet to head, rows from anterior to
posterior, columns from the patient's right to left, whichever format the volume came in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.formats.xray import centre_square, dicom_pixels, is_dicom, modality_values, read_dicom_dataset

FloatArray = np.ndarray[Any, np.dtype[np.float32]]
MaskArray = np.ndarray[Any, np.dtype[np.uint8]]

HU_MIN, HU_MAX = -1000.0, 400.0  # the lung-and-mediastinum window


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def read_ct_volume(path: Path, depth: int, image_size: int) -> FloatArray:
    """A CT volume as [1, depth, S, S] float32: resampled by linear index sampling, windowed to [0, 1]."""
    path = Path(path)
    if path.is_dir():
        hounsfield = _read_dicom_series(path)
    elif not path.exists():
        raise InvalidInputError(f"CT volume {path} does not exist")
    elif is_nifti(path):
        hounsfield = read_nifti_volume(path)
    else:
        raise InvalidInputError(f"{path}: not a CT format we read (NIfTI .nii/.nii.gz, or a DICOM series folder)")
    if depth < 1 or image_size < 1:
        raise InvalidInputError(f"CT depth and image size must be positive, got {depth} and {image_size}")
    square = centre_square(hounsfield)
    resampled = resample_axis(square, 1, image_size)
    resampled = resample_axis(resample_axis(resampled, 2, image_size), 0, depth)
    return window(resampled)[np.newaxis]


def read_ct_slices(image_path: Path, mask_path: Path, image_size: int) -> tuple[FloatArray, MaskArray]:
    """Every axial slice of a NIfTI volume and its NIfTI mask: images [K, 1, S, S] in [0, 1], masks [K, S, S] 0/1."""
    image_path, mask_path = Path(image_path), Path(mask_path)
    volume, mask = read_nifti_volume(image_path), read_nifti_volume(mask_path)
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


def read_nifti_volume(path: Path) -> np.ndarray[Any, Any]:
    """A NIfTI volume in its stored units (scl_slope/scl_inter applied) as float32 (D, H, W)."""
    if not path.is_file():
        raise InvalidInputError(f"NIfTI file {path} does not exist")
    if not is_nifti(path):
        raise InvalidInputError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.as_closest_canonical(nib.load(path))  # type: ignore[no-untyped-call]  # axes to RAS+
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (ImageFileError, OSError, ValueError, EOFError) as exc:
        raise InvalidInputError(f"{path}: not a readable NIfTI file ({exc})") from None
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and all(n == 1 for n in data.shape[3:]) else data
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim != 3 or 0 in data.shape:
        raise InvalidInputError(f"{path}: expected a 3-D volume, got shape {list(data.shape)}")
    if not np.isfinite(data).all():
        raise InvalidInputError(f"{path}: volume holds NaN or infinite values")
    # RAS+ (x, y, z) -> (z, y, x), then flip y and x: rows run anterior to posterior, columns right to left.
    return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


def _read_dicom_series(folder: Path) -> np.ndarray[Any, Any]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom(p))
    datasets = [(p, read_dicom_dataset(p)) for p in files]
    datasets = [(p, ds) for p, ds in datasets if "PixelData" in ds]
    if not datasets:
        raise InvalidInputError(f"{folder}: no DICOM image files in the folder")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise InvalidInputError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
    ordered = sorted(datasets, key=lambda item: _slice_position(*item))
    slices = [modality_values(dicom_pixels(ds, path), ds).astype(np.float32) for path, ds in ordered]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InvalidInputError(f"{folder}: slices differ in shape or are not 2-D: {sorted(map(list, shapes))}")
    return np.stack(slices)


def _slice_position(path: Path, ds: Any) -> float:
    """The slice's position along its normal; z for axial slices."""
    try:
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        orientation = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    except (AttributeError, TypeError, ValueError):
        raise InvalidInputError(f"{path}: DICOM slice has no valid ImagePositionPatient") from None
    normal = np.cross(orientation[:3], orientation[3:])
    return float(position @ normal)
