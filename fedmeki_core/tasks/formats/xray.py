"""Chest radiographs from DICOM (pydicom) or PNG/JPEG (Pillow) as [K, 1, S, S] float32 grey levels in [0, 1].

K is 1 but for a multi-frame DICOM file read with --frames all; rules.py decides what is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import XRAY_DICOM, DicomAcceptance
from fedmeki_core.tasks.formats.rules import Frames, ImportOptions, ReaderNoise, check_dicom, check_size, one_line

try:  # pydicom >= 3
    from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
except ImportError:  # pydicom 2.4
    from pydicom.pixel_data_handlers.util import (  # type: ignore[no-redef]
        apply_color_lut,
        apply_modality_lut,
        apply_voi_lut,
    )

FloatArray = np.ndarray[Any, np.dtype[np.float32]]

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# Pillow modes whose values are read as they are; every other mode is converted to 8-bit grey ("L").
_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I", "F"})


def is_dicom(path: Path) -> bool:
    """A .dcm/.dicom file, or a file without suffix that carries the DICOM magic at byte 128."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix or not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def read_xray(
    path: Path,
    image_size: int,
    options: ImportOptions | None = None,
    noise: ReaderNoise | None = None,
    accepts: DicomAcceptance = XRAY_DICOM,
) -> FloatArray:
    """A radiograph's frames as [K, 1, S, S] float32 in [0, 1]: centre-cropped, resized, scaled min..max each."""
    path, options, noise = Path(path), options or ImportOptions(), noise or ReaderNoise()
    if not path.is_file():
        raise InvalidInputError(f"X-ray file {path} does not exist")
    if is_dicom(path):
        frames = _read_dicom_frames(path, image_size, options, noise, accepts)
    elif path.suffix.lower() in PILLOW_SUFFIXES:
        frames = [_read_pillow_image(path)]
        check_size(frames[0].shape[:2], image_size, path)
    else:
        raise InvalidInputError(f"{path}: not an X-ray format we read (DICOM .dcm/.dicom, PNG, JPEG)")
    return np.stack([scale_to_unit(resize_square(frame, image_size))[np.newaxis] for frame in frames])


def read_dicom_dataset(path: Path) -> pydicom.Dataset:
    """Read a DICOM file, or raise InvalidInputError naming it."""
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidInputError(f"{path}: not a readable DICOM file ({one_line(exc)})") from None


def dicom_pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray[Any, Any]:
    """The stored pixel values of a DICOM dataset, or InvalidInputError when absent or undecodable."""
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InvalidInputError(f"{path}: DICOM file has no pixel data")
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types: missing plugin, truncated or corrupt data
        raise InvalidInputError(f"{path}: DICOM pixel data cannot be decoded ({one_line(exc)})") from None


def modality_values(pixels: np.ndarray[Any, Any], ds: pydicom.Dataset) -> np.ndarray[Any, Any]:
    """Stored pixel values in the modality's units (Hounsfield units for CT): rescale slope/intercept or LUT."""
    return np.asarray(apply_modality_lut(pixels, ds))


def _read_dicom_frames(
    path: Path, image_size: int, options: ImportOptions, noise: ReaderNoise, accepts: DicomAcceptance
) -> list[FloatArray]:
    ds = read_dicom_dataset(path)
    count = check_dicom(ds, path, accepts, options)
    check_size((int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)), image_size, path)
    pixels = dicom_pixels(ds, path)
    if count == 1:
        stack = pixels[np.newaxis]
    elif options.frames == Frames.FIRST:
        stack = pixels[:1]
        noise.notes.append(f"first of {count} frames kept")
    else:
        stack = pixels
        noise.notes.append(f"{count} frames, one sample each")
    return [_dicom_grey(frame, ds, path, noise) for frame in stack]


def _dicom_grey(pixels: np.ndarray[Any, Any], ds: pydicom.Dataset, path: Path, noise: ReaderNoise) -> FloatArray:
    """One frame as grey levels: palette colour through its lookup table, colour to luminance, LUTs applied."""
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        try:
            pixels = np.asarray(apply_color_lut(pixels, ds))
        except Exception as exc:  # a missing or malformed palette raises several types
            raise InvalidInputError(f"{path}: palette colour whose lookup table cannot be applied ({exc})") from None
        noise.notes.append("palette colour converted through its lookup table")
        return _luminance(pixels)
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return _luminance(pixels)
    values = apply_voi_lut(modality_values(pixels, ds), ds)
    image = np.asarray(values, dtype=np.float32)
    if image.ndim != 2:
        raise InvalidInputError(f"{path}: expected a 2-D image, got pixel data of shape {list(image.shape)}")
    if photometric == "MONOCHROME1":
        image = -image  # MONOCHROME1 stores white as the lowest value; negate so bone is bright after scaling
    return image


def _read_pillow_image(path: Path) -> FloatArray:
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # phones and some scanners store the rotation in EXIF
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable image ({exc})") from None
    if image.mode not in _DEEP_MODES:
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32)


def _luminance(rgb: np.ndarray[Any, Any]) -> FloatArray:
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
    return np.asarray(rgb[..., :3].astype(np.float32) @ weights, dtype=np.float32)


def centre_square(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The largest centred square of the last two axes."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[..., top : top + side, left : left + side]


def resize_square(image: FloatArray, size: int) -> FloatArray:
    """Centre-crop a 2-D image to a square and resize it to size x size with Pillow's bilinear filter."""
    if size < 1:
        raise InvalidInputError(f"image size must be positive, got {size}")
    square = np.ascontiguousarray(centre_square(image), dtype=np.float32)
    if square.shape == (size, size):
        return square
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def scale_to_unit(image: FloatArray) -> FloatArray:
    """Scale min..max to [0, 1]; a constant image becomes zeros."""
    low, high = float(image.min()), float(image.max())
    if not np.isfinite([low, high]).all():
        raise InvalidInputError("image holds NaN or infinite values")
    if high == low:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - low) / (high - low)).astype(np.float32)
