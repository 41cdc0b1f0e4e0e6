"""12-lead ECGs from WFDB, DICOM waveform, NumPy or CSV files as [12, 1000] float32 millivolts (10 s at 100 Hz)."""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.formats.xray import is_dicom, read_dicom_dataset

FloatArray = np.ndarray[Any, np.dtype[np.float32]]

LEADS = ("i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6")
DISPLAY_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
SAMPLING_RATE = 100.0
SECONDS = 10
NUM_SAMPLES = int(SAMPLING_RATE) * SECONDS
_MICROVOLTS = frozenset({"uv", "µv", "μv", "microvolt", "microvolts"})
_MILLIVOLTS = frozenset({"mv", "millivolt", "millivolts", ""})
_VOLTS = frozenset({"v", "volt", "volts"})


def lead_key(name: str) -> str:
    """A lead name reduced to its key in LEADS: 'Lead I (Einthoven)' -> 'i', 'MDC_ECG_LEAD_aVR' -> 'avr'."""
    key = re.sub(r"\(.*?\)", "", name.lower())
    key = re.sub(r"^(mdc_ecg_lead_|lead)", "", key.strip())
    return re.sub(r"[^a-z0-9]", "", key)


def read_ecg(path: Path, *, sampling_rate: float = SAMPLING_RATE) -> FloatArray:
    """A 12-lead ECG as [12, 1000] float32 mV: resampled to 100 Hz, cut or zero-padded to 10 s.

    WFDB and DICOM files carry their sampling rate and units; .npy and .csv files carry neither, so they are
    taken to be millivolts at `sampling_rate` Hz.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".hea", ".dat") or (not suffix and path.with_suffix(".hea").is_file()):
        signal, rate = _read_wfdb(path)
    elif not path.is_file():
        raise InvalidInputError(f"ECG file {path} does not exist")
    elif is_dicom(path):
        signal, rate = _read_dicom_waveform(path)
    elif suffix == ".npy":
        signal, rate = _read_npy(path), sampling_rate
    elif suffix == ".csv":
        signal, rate = _read_csv(path), sampling_rate
    else:
        raise InvalidInputError(f"{path}: not an ECG format we read (WFDB .hea, DICOM, .npy, .csv)")
    if not np.isfinite(signal).all():
        raise InvalidInputError(f"{path}: ECG holds NaN or infinite values")
    return resample_ecg(signal, rate)


def resample_ecg(signal: np.ndarray[Any, Any], rate: float) -> FloatArray:
    """[12, n] at `rate` Hz -> [12, 1000] at 100 Hz by linear interpolation; the first 10 s, zero-padded."""
    if rate <= 0 or not math.isfinite(rate):
        raise InvalidInputError(f"ECG sampling rate must be positive, got {rate}")
    length = signal.shape[1]
    out = np.zeros((len(LEADS), NUM_SAMPLES), dtype=np.float32)
    if length == 0:
        return out
    # Target sample k lies at k / 100 s; keep those inside the recording, which ends at (length - 1) / rate s.
    count = min(NUM_SAMPLES, math.floor((length - 1) * SAMPLING_RATE / rate + 1e-9) + 1)
    target = np.arange(count) * (rate / SAMPLING_RATE)
    source = np.arange(length)
    for lead in range(len(LEADS)):
        out[lead, :count] = np.interp(target, source, signal[lead])
    return out


def order_leads(signal: np.ndarray[Any, Any], names: Sequence[str], path: Path) -> np.ndarray[Any, Any]:
    """Rows of [channels, n] reordered to the standard lead order by name; InvalidInputError names missing leads."""
    rows: dict[str, int] = {}
    for index, name in enumerate(names):
        rows.setdefault(lead_key(name), index)
    missing = [display for key, display in zip(LEADS, DISPLAY_LEADS, strict=True) if key not in rows]
    if missing:
        raise InvalidInputError(f"{path}: ECG lacks lead(s) {', '.join(missing)} (has {', '.join(names)})")
    return signal[[rows[key] for key in LEADS]]


def millivolt_factor(unit: str, path: Path) -> float:
    """The factor that turns values in `unit` into millivolts."""
    key = unit.strip().lower()
    if key in _MICROVOLTS:
        return 1e-3
    if key in _MILLIVOLTS:
        return 1.0
    if key in _VOLTS:
        return 1e3
    raise InvalidInputError(f"{path}: unknown ECG unit {unit!r} (expected mV, uV or V)")


def _read_wfdb(path: Path) -> tuple[np.ndarray[Any, Any], float]:
    record_name = path.with_suffix("") if path.suffix.lower() in (".hea", ".dat") else path
    if not record_name.with_suffix(".hea").is_file():
        raise InvalidInputError(f"WFDB header {record_name.with_suffix('.hea')} does not exist")
    try:
        record = _rdrecord(record_name)
    except Exception as exc:  # wfdb raises bare ValueError, OSError and IndexError on malformed records
        raise InvalidInputError(f"{record_name}: not a readable WFDB record ({exc})") from None
    if record.p_signal is None:
        raise InvalidInputError(f"{record_name}: WFDB record has no signal")
    signal = np.asarray(record.p_signal, dtype=np.float64).T
    units = list(record.units or [""] * signal.shape[0])
    factors = np.array([millivolt_factor(unit or "", path) for unit in units])
    return order_leads(signal * factors[:, np.newaxis], list(record.sig_name), path), float(record.fs)


def _rdrecord(record_name: Path) -> Any:
    with warnings.catch_warnings():
        # wfdb 4.3 passes inplace=True to pandas, deprecated since pandas 3.1: silence wfdb's own deprecations only.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"wfdb(\.|$)")
        import wfdb  # type: ignore[import-untyped]

        return wfdb.rdrecord(str(record_name))


def _read_dicom_waveform(path: Path) -> tuple[np.ndarray[Any, Any], float]:
    ds = read_dicom_dataset(path)
    if not ds.get("WaveformSequence"):
        raise InvalidInputError(f"{path}: DICOM file has no waveform (WaveformSequence)")
    group = ds.WaveformSequence[0]
    try:
        # waveform_array applies ChannelSensitivity, its correction factor and baseline: values in the units below.
        samples = np.asarray(ds.waveform_array(0), dtype=np.float64).T
        channels = list(group.ChannelDefinitionSequence)
        names = [str(channel.ChannelSourceSequence[0].CodeMeaning) for channel in channels]
        units = [_dicom_unit(channel) for channel in channels]
        rate = float(group.SamplingFrequency)
    except (AttributeError, IndexError, KeyError, ValueError) as exc:
        raise InvalidInputError(f"{path}: malformed DICOM waveform ({exc})") from None
    factors = np.array([millivolt_factor(unit, path) for unit in units])
    return order_leads(samples * factors[:, np.newaxis], names, path), rate


def _dicom_unit(channel: Any) -> str:
    units = channel.get("ChannelSensitivityUnitsSequence")
    return str(units[0].CodeValue) if units else "uV"  # DICOM ECG IODs default to microvolts


def _read_npy(path: Path) -> np.ndarray[Any, Any]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim == 2 and array.shape[0] == len(LEADS):
        return np.asarray(array, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == len(LEADS):
        return np.asarray(array, dtype=np.float64).T
    raise InvalidInputError(f"{path}: ECG array has shape {list(array.shape)}, expected [12, n] or [n, 12]")


def _read_csv(path: Path) -> np.ndarray[Any, Any]:
    rows = read_csv_rows(path)
    if not rows:
        raise InvalidInputError(f"{path}: ECG CSV is empty")
    header = rows[0] if not is_numeric_row(rows[0]) else None
    body = rows[1:] if header else rows
    if len(rows[0]) != len(LEADS):
        raise InvalidInputError(f"{path}: ECG CSV has {len(rows[0])} columns, expected 12 (one per lead)")
    signal = parse_float_rows(body, len(LEADS), path).T
    if header is None:
        return signal
    unknown = [name for name in header if lead_key(name) not in LEADS]
    if unknown:
        raise InvalidInputError(f"{path}: CSV column(s) {', '.join(map(repr, unknown))} are not ECG leads")
    return order_leads(signal, header, path)


def read_csv_rows(path: Path) -> list[list[str]]:
    """The non-blank rows of a CSV file, cells stripped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [[cell.strip() for cell in row] for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{path}: not a readable CSV file ({exc})") from None


def is_numeric_row(row: Sequence[str]) -> bool:
    """True when every non-empty cell parses as a number (a data row, not a header)."""
    for cell in row:
        try:
            float(cell or "nan")
        except ValueError:
            return False
    return True


def parse_float_rows(rows: Sequence[Sequence[str]], width: int, path: Path) -> np.ndarray[Any, Any]:
    """CSV rows as a float64 [len(rows), width] array; empty cells and 'nan' become NaN."""
    out = np.full((len(rows), width), np.nan)
    for number, row in enumerate(rows):
        if len(row) != width:
            raise InvalidInputError(f"{path}: data row {number + 1} has {len(row)} values, expected {width}")
        for column, cell in enumerate(row):
            if cell:
                try:
                    out[number, column] = float(cell)
                except ValueError:
                    raise InvalidInputError(
                        f"{path}: data row {number + 1}, column {column + 1}: {cell!r} is not a number"
                    ) from None
    return out
