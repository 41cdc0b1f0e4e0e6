"""Hourly ICU records from .npy or .csv files as [hours, 48] float32, gaps forward-filled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.formats.ecg import is_numeric_row, parse_float_rows, read_csv_rows

FloatArray = np.ndarray[Any, np.dtype[np.float32]]

NUM_FEATURES = 48
HOUR_COLUMN = "hour"


def read_ehr(path: Path, hours: int) -> FloatArray:
    """A record as [hours, 48] float32: missing values forward-filled then 0; cut or zero-padded at the end."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"EHR file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        table = _read_npy(path)
    elif suffix == ".csv":
        table = _read_csv(path)
    else:
        raise InvalidInputError(f"{path}: not an EHR format we read (.npy, .csv)")
    if np.isinf(table).any():
        raise InvalidInputError(f"{path}: EHR holds infinite values")
    return fit_hours(forward_fill(table), hours)


def forward_fill(table: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Each NaN replaced by the last value above it in its column; NaNs before any value become 0."""
    rows = np.arange(table.shape[0])[:, np.newaxis]
    last_seen = np.where(np.isnan(table), 0, rows)
    np.maximum.accumulate(last_seen, axis=0, out=last_seen)
    filled = table[last_seen, np.arange(table.shape[1])]
    return np.asarray(np.nan_to_num(filled, nan=0.0))


def fit_hours(table: np.ndarray[Any, Any], hours: int) -> FloatArray:
    """The first `hours` rows, zero-padded at the end when there are fewer."""
    out = np.zeros((hours, table.shape[1]), dtype=np.float32)
    kept = min(hours, table.shape[0])
    out[:kept] = table[:kept]
    return out


def _read_npy(path: Path) -> np.ndarray[Any, Any]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim != 2 or array.shape[1] != NUM_FEATURES:
        raise InvalidInputError(f"{path}: EHR array has shape {list(array.shape)}, expected [T, {NUM_FEATURES}]")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InvalidInputError(f"{path}: EHR array has dtype {array.dtype}, expected real numbers")
    return np.asarray(array, dtype=np.float64)


def _read_csv(path: Path) -> np.ndarray[Any, Any]:
    rows = read_csv_rows(path)
    if not rows or is_numeric_row(rows[0]):
        raise InvalidInputError(f"{path}: EHR CSV needs a header row naming its {NUM_FEATURES} feature columns")
    header, body = rows[0], rows[1:]
    keep = [i for i, name in enumerate(header) if name.lower() != HOUR_COLUMN]
    if len(keep) != NUM_FEATURES:
        raise InvalidInputError(
            f"{path}: EHR CSV has {len(keep)} feature columns, expected {NUM_FEATURES} (plus an optional 'hour')"
        )
    return parse_float_rows(body, len(header), path)[:, keep]
