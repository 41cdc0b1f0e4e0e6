"""The real-format readers and the importer, on real files written to tmp_path (and pydicom's own test files)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from fedmeki_core.app.cli import build_parser
from fedmeki_core.commands import run_command
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import TASKS
from fedmeki_core.tasks.dataset import load_dataset, save_dataset
from fedmeki_core.tasks.formats import (
    Frames,
    ImportOptions,
    import_dataset,
    read_conversations,
    read_ct_slices,
    read_ct_volume,
    read_ecg,
    read_ehr,
    read_xray,
)

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path)


def _write_dicom(path: Path, pixels: np.ndarray[Any, Any], **attributes: Any) -> Path:
    """A minimal uncompressed DICOM image: int16 frames [F, H, W] or one frame [H, W]."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_wfdb(folder: Path, name: str, signal: np.ndarray[Any, Any], names: list[str], unit: str, rate: int) -> Path:
    with warnings.catch_warnings():  # wfdb 4.3 uses pandas' deprecated inplace=True
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"wfdb(\.|$)")
        import wfdb  # type: ignore[import-untyped]

        units, formats = [unit] * len(names), ["16"] * len(names)
        wfdb.wrsamp(name, rate, units, names, p_signal=signal.T, fmt=formats, write_dir=str(folder))
    return folder / name


def _ecg(rate: int, seconds: float = 10.0) -> np.ndarray[Any, Any]:
    """[12, n] mV: lead i is a sine of (i + 1) Hz and amplitude 0.1 (i + 1) mV."""
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.1 * (i + 1) * np.sin(2 * np.pi * (i + 1) * t) for i in range(12)])


def _write_nifti(path: Path, data: np.ndarray[Any, Any]) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)  # type: ignore[no-untyped-call]
    return path


def _error(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InvalidInputError) as info:
        call(*args, **kwargs)
    return info.value.message


# X-ray ----------------------------------------------------------------------------------------------------------


def test_a_real_chest_radiograph_from_dicom() -> None:
    # RG1_UNCI.dcm (pydicom-data): a real CR chest film, MONOCHROME1, with a window centre/width.
    path = _testdata("RG1_UNCI.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).BodyPartExamined == "CHEST"
    image = read_xray(path, 64)[0]
    assert image.shape == (1, 64, 64) and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    # MONOCHROME1 inverted: the spine and mediastinum are brighter than the lungs either side.
    mediastinum, right_lung, left_lung = image[0, 16:36, 29:35], image[0, 16:36, 12:20], image[0, 16:36, 44:52]
    assert mediastinum.mean() > right_lung.mean() + 0.15 and mediastinum.mean() > left_lung.mean() + 0.15


def test_dicom_first_frame_rescale_monochrome1_and_no_suffix(tmp_path: Path) -> None:
    gradient = np.tile(np.arange(40, dtype=np.int16) * 10, (30, 1))  # rises to the right; cropped to 30 x 30
    frames = np.stack([gradient, gradient[:, ::-1]])
    first = ImportOptions(frames=Frames.FIRST)
    dx = {"Modality": "DX", "SOPClassUID": DigitalXRayImageStorageForPresentation}
    plain = read_xray(_write_dicom(tmp_path / "a.dcm", frames, RescaleSlope=2, RescaleIntercept=-1024, **dx), 16, first)
    assert plain.shape == (1, 1, 16, 16)
    plain = plain[0]
    assert np.all(np.diff(plain[0], axis=1) > 0) and plain[0, :, 0].max() == 0.0 and plain[0, :, -1].min() == 1.0
    inverted = read_xray(_write_dicom(tmp_path / "b", frames, PhotometricInterpretation="MONOCHROME1", **dx), 16, first)
    np.testing.assert_allclose(inverted[0], 1.0 - plain, atol=1e-6)


def test_png_and_jpeg_keep_orientation(tmp_path: Path) -> None:
    rows = np.repeat(np.linspace(0, 255, 60).astype(np.uint8)[:, None], 90, axis=1)  # dark top, bright bottom
    Image.fromarray(rows).save(tmp_path / "grey.png")
    image = read_xray(tmp_path / "grey.png", 32)[0]
    assert image.shape == (1, 32, 32)
    assert np.all(np.diff(image[0], axis=0) > 0) and np.ptp(image[0], axis=1).max() < 1e-6
    deep = (np.linspace(0, 60000, 60)[:, None] * np.ones((1, 60))).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_allclose(read_xray(tmp_path / "deep.png", 32)[0], image, atol=0.02)
    Image.fromarray(np.stack([rows] * 3, axis=-1)).save(tmp_path / "colour.jpg", quality=95)
    np.testing.assert_allclose(read_xray(tmp_path / "colour.jpg", 32)[0], image, atol=0.05)


def test_constant_image_becomes_zeros(tmp_path: Path) -> None:
    Image.new("L", (20, 20), 128).save(tmp_path / "flat.png")
    assert not read_xray(tmp_path / "flat.png", 8).any()


def test_bad_xray_files(tmp_path: Path) -> None:
    assert "does not exist" in _error(read_xray, tmp_path / "absent.png", 32)
    (tmp_path / "image.gif").write_bytes(b"GIF89a")
    assert "not an X-ray format" in _error(read_xray, tmp_path / "image.gif", 32)
    assert "12-lead ECG Waveform Storage (modality ECG) is not a chest X-ray" in _error(
        read_xray, _testdata("waveform_ecg.dcm"), 32
    )
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "not a readable image" in _error(read_xray, tmp_path / "broken.png", 32)
    (tmp_path / "text.dcm").write_text("hello")
    assert "not a readable DICOM" in _error(read_xray, tmp_path / "text.dcm", 32)
    dx = {"Modality": "DX", "SOPClassUID": DigitalXRayImageStorageForPresentation}
    truncated = _write_dicom(tmp_path / "short.dcm", np.zeros((32, 32), np.int16), **dx)
    ds = pydicom.dcmread(truncated)
    ds.Rows = 64  # the pixel data now holds fewer bytes than the header promises
    ds.save_as(truncated)
    assert "cannot be decoded" in _error(read_xray, truncated, 32)


# ECG ------------------------------------------------------------------------------------------------------------


def test_a_real_dicom_ecg() -> None:
    # waveform_ecg.dcm (pydicom): a real 12-lead ECG, 10 s at 1000 Hz, in microvolts.
    path = _testdata("waveform_ecg.dcm")
    ecg = read_ecg(path)
    assert ecg.shape == (12, 1000) and ecg.dtype == np.float32
    assert np.abs(ecg).max() < 10 and np.abs(ecg).max() > 0.5  # millivolts, not microvolts
    raw = pydicom.dcmread(path).waveform_array(0)
    np.testing.assert_allclose(ecg, raw[::10].T / 1000, atol=1e-5)
    lead = dict(zip(LEADS, ecg, strict=True))
    np.testing.assert_allclose(lead["II"], lead["I"] + lead["III"], atol=1e-3)  # Einthoven's law
    np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=1e-3)
    np.testing.assert_allclose(lead["aVF"], (lead["II"] + lead["III"]) / 2, atol=1e-3)


def test_wfdb_at_500_hz_with_shuffled_leads(tmp_path: Path) -> None:
    signal = _ecg(500)
    order = [3, 0, 11, 7, 1, 2, 10, 4, 5, 9, 6, 8]
    names = [LEADS[i].lower() if i % 2 else LEADS[i].upper() for i in order]
    record = _write_wfdb(tmp_path, "rec", signal[order], names, "mV", 500)
    for path in (record, record.with_suffix(".hea")):
        np.testing.assert_allclose(read_ecg(path), signal[:, ::5], atol=1e-3)
    microvolts = _write_wfdb(tmp_path, "uv", signal * 1000, LEADS, "uV", 500)
    np.testing.assert_allclose(read_ecg(microvolts), signal[:, ::5], atol=1e-3)


def test_npy_and_csv_ecg(tmp_path: Path) -> None:
    signal = _ecg(100)
    np.save(tmp_path / "leads_first.npy", signal)
    np.save(tmp_path / "samples_first.npy", signal.T)
    np.save(tmp_path / "fast.npy", _ecg(250))
    for name in ("leads_first.npy", "samples_first.npy"):
        np.testing.assert_allclose(read_ecg(tmp_path / name), signal, atol=1e-6)
    fast = read_ecg(tmp_path / "fast.npy", sampling_rate=250)
    np.testing.assert_allclose(fast[:, ::2], signal[:, ::2], atol=1e-6)  # every 2nd lands on a 250 Hz sample
    np.testing.assert_allclose(fast, signal, atol=0.02)  # the others are interpolated between two
    short = read_ecg(_save_npy(tmp_path / "short.npy", _ecg(100, seconds=4)))
    assert not short[:, 400:].any() and np.allclose(short[:, :400], signal[:, :400], atol=1e-6)
    shuffled = LEADS[::-1]
    lines = [",".join(shuffled)] + [",".join(f"{v:.6f}" for v in row) for row in signal[::-1].T]
    (tmp_path / "header.csv").write_text("\n".join(lines) + "\n")
    np.testing.assert_allclose(read_ecg(tmp_path / "header.csv"), signal, atol=1e-5)
    (tmp_path / "plain.csv").write_text("\n".join(",".join(f"{v:.6f}" for v in row) for row in signal.T))
    np.testing.assert_allclose(read_ecg(tmp_path / "plain.csv"), signal, atol=1e-5)


def _save_npy(path: Path, array: np.ndarray[Any, Any]) -> Path:
    np.save(path, array)
    return path


def test_bad_ecg_files(tmp_path: Path) -> None:
    assert "does not exist" in _error(read_ecg, tmp_path / "absent.npy")
    assert "does not exist" in _error(read_ecg, tmp_path / "absent.hea")
    eleven = _write_wfdb(tmp_path, "eleven", _ecg(500)[:11], LEADS[:11], "mV", 500)
    assert "lacks lead(s) V6" in _error(read_ecg, eleven)
    assert "shape [8, 1000]" in _error(read_ecg, _save_npy(tmp_path / "eight.npy", np.zeros((8, 1000))))
    nan = _ecg(100)
    nan[2, 5] = np.nan
    assert "NaN" in _error(read_ecg, _save_npy(tmp_path / "nan.npy", nan))
    (tmp_path / "extra.csv").write_text(",".join([*LEADS[:11], "time"]) + "\n" + ",".join(["0"] * 12) + "\n")
    assert "'time' are not ECG leads" in _error(read_ecg, tmp_path / "extra.csv")
    (tmp_path / "word.csv").write_text(",".join(LEADS) + "\n" + ",".join(["0"] * 11 + ["x"]) + "\n")
    assert "row 1, column 12: 'x' is not a number" in _error(read_ecg, tmp_path / "word.csv")
    (tmp_path / "ecg.txt").write_text("0")
    assert "not an ECG format" in _error(read_ecg, tmp_path / "ecg.txt")
    assert "no waveform" in _error(read_ecg, _write_dicom(tmp_path / "image.dcm", np.zeros((4, 4), np.int16)))


# EHR ------------------------------------------------------------------------------------------------------------


def test_ehr_csv_with_gaps_and_hours(tmp_path: Path) -> None:
    header = ["hour"] + [f"f{i}" for i in range(48)]
    rows = [[str(hour)] + [str(hour * 100 + i) for i in range(48)] for hour in range(3)]
    rows[0][1] = ""  # f0 missing in hour 0: nothing to carry forward, so 0
    rows[1][2] = "nan"  # f1 missing in hour 1: carried forward from hour 0
    rows[2][2] = ""  # and still missing in hour 2
    (tmp_path / "stay.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    ehr = read_ehr(tmp_path / "stay.csv", 24)
    assert ehr.shape == (24, 48) and ehr.dtype == np.float32
    assert ehr[0, 0] == 0 and ehr[1, 0] == 100 and ehr[1, 1] == 1 and ehr[2, 1] == 1 and ehr[2, 2] == 202
    assert not ehr[3:].any()
    np.testing.assert_array_equal(read_ehr(tmp_path / "stay.csv", 2), ehr[:2])
    table = np.arange(30 * 48, dtype=np.float64).reshape(30, 48)
    np.testing.assert_array_equal(read_ehr(_save_npy(tmp_path / "stay.npy", table), 24), table[:24])


def test_bad_ehr_files(tmp_path: Path) -> None:
    assert "does not exist" in _error(read_ehr, tmp_path / "absent.csv", 24)
    (tmp_path / "narrow.csv").write_text("hour,a,b\n0,1,2\n")
    assert "2 feature columns, expected 48" in _error(read_ehr, tmp_path / "narrow.csv", 24)
    (tmp_path / "headless.csv").write_text(",".join(["1"] * 48) + "\n")
    assert "header row" in _error(read_ehr, tmp_path / "headless.csv", 24)
    assert "expected [T, 48]" in _error(read_ehr, _save_npy(tmp_path / "wide.npy", np.zeros((24, 49))), 24)
    infinite = np.zeros((24, 48))
    infinite[3, 3] = np.inf
    assert "infinite" in _error(read_ehr, _save_npy(tmp_path / "inf.npy", infinite), 24)


# CT -------------------------------------------------------------------------------------------------------------


def test_nifti_volume_orientation_and_window(tmp_path: Path) -> None:
    data = np.full((20, 20, 10), -1000.0, dtype=np.float32)  # (x: to the right, y: to the front, z: up) in RAS+
    data[15:, :5, 8:] = 400.0  # a block at the patient's right, back and top
    data[:, :, 0] = -300.0  # the lowest slice: half way through the window
    volume = read_ct_volume(_write_nifti(tmp_path / "ct.nii.gz", data), 10, 20)
    assert volume.shape == (1, 10, 20, 20) and volume.dtype == np.float32
    np.testing.assert_allclose(volume[0, 0], 0.5, atol=1e-6)
    # Radiological view: the top slice last, the back at the bottom rows, the patient's right in the left columns.
    assert volume[0, 9, 15:, :5].min() == 1.0 and volume[0, 9, :15].max() == 0.0 and volume[0, 9, :, 5:].max() == 0.0
    small = read_ct_volume(tmp_path / "ct.nii.gz", 4, 8)
    assert small.shape == (1, 4, 8, 8) and small.min() >= 0 and small.max() <= 1


def test_dicom_series_sorted_by_position(tmp_path: Path) -> None:
    series = generate_uid()
    for z in (3, 1, 0, 2):  # written out of order; each slice holds 100 z - 1000 HU after the rescale
        pixels = np.full((6, 6), 100 * z + 24, dtype=np.int16)
        position = {"ImagePositionPatient": [0, 0, 2.5 * z], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0]}
        rescale = {"RescaleIntercept": -1024, "RescaleSlope": 1}
        _write_dicom(tmp_path / f"slice{z * 7 % 4}.dcm", pixels, SeriesInstanceUID=series, **position, **rescale)
    volume = read_ct_volume(tmp_path, 4, 6)
    np.testing.assert_allclose(volume[0, :, 0, 0], [0, 100 / 1400, 200 / 1400, 300 / 1400], atol=1e-6)
    _write_dicom(tmp_path / "other.dcm", np.zeros((6, 6), np.int16), ImagePositionPatient=[0, 0, 9], **rescale)
    assert "2 DICOM series" in _error(read_ct_volume, tmp_path, 4, 6)


def test_nifti_slices_and_masks(tmp_path: Path) -> None:
    data = np.random.default_rng(0).uniform(-1200, 600, (24, 24, 5)).astype(np.float32)
    mask = np.zeros((24, 24, 5), dtype=np.uint8)
    mask[2:10, 14:22, 1] = 2  # labels above 1 are binarised
    images, masks = read_ct_slices(_write_nifti(tmp_path / "v.nii", data), _write_nifti(tmp_path / "m.nii", mask), 12)
    assert images.shape == (5, 1, 12, 12) and masks.shape == (5, 12, 12) and masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1} and masks[1].sum() == 16 and masks[[0, 2, 3, 4]].sum() == 0
    assert images.min() >= 0 and images.max() <= 1
    _write_nifti(tmp_path / "small.nii", mask[:20])
    assert "differs from the shape" in _error(read_ct_slices, tmp_path / "v.nii", tmp_path / "small.nii", 12)
    assert "does not exist" in _error(read_ct_volume, tmp_path / "absent.nii", 4, 8)
    assert "not a CT format" in _error(read_ct_volume, _save_npy(tmp_path / "ct.npy", data), 4, 8)


# FedMEKI JSON records and the importer ----------------------------------------------------------------------------


def _xray_records(folder: Path) -> list[dict[str, Any]]:
    for i in range(4):
        Image.fromarray((np.arange(400).reshape(20, 20) * (i + 1) % 256).astype(np.uint8)).save(folder / f"{i}.png")
    qa = [{"question": "Is there lung opacity?", "answer": answer} for answer in ("Yes.", "no, clear")]
    llava = [
        [{"from": "human", "value": "<image>\nIs there lung opacity?"}, {"from": "gpt", "value": answer}]
        for answer in ("YES, in the left lower lobe", "No")
    ]
    paths = [str(folder / "0.png"), "1.png", "2.png", "3.png"]  # one absolute, the others relative to the JSON
    conversations = [[qa[0]], [qa[1]], llava[0], llava[1]]
    return [
        {"modality_path": path, "conversations": turns, "task_type": "classification", "modalities": ["image"]}
        for path, turns in zip(paths, conversations, strict=True)
    ]


def test_fedmeki_json_for_binary_and_text_tasks(tmp_path: Path) -> None:
    records = _xray_records(tmp_path)
    (tmp_path / "records.json").write_text(json.dumps(records))
    binary = read_conversations(tmp_path / "records.json", TASKS["lung-opacity"], 32)
    assert binary.features.shape == (4, 1, 32, 32) and binary.labels.tolist() == [1, 0, 1, 0]
    text = read_conversations(tmp_path / "records.json", TASKS["medvqa"], 32)
    assert text.labels.tolist() == [-1] * 4
    assert text.questions == ("Is there lung opacity?",) * 4
    assert text.answers == ("Yes.", "no, clear", "YES, in the left lower lobe", "No")
    out = tmp_path / "medvqa.safetensors"
    save_dataset(text, out)
    loaded = load_dataset(out, TASKS["medvqa"], 32)
    np.testing.assert_array_equal(loaded.features, text.features)
    assert loaded.questions == text.questions and loaded.answers == text.answers


def test_fedmeki_json_for_ecg_text(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", _ecg(100))
    record = {"modality_path": "a.npy", "conversations": [{"question": "Any noise?", "answer": "baseline drift"}]}
    (tmp_path / "ecg.json").write_text(json.dumps([record, record]))
    dataset, _ = import_dataset(TASKS["ecg-noise"], tmp_path / "ecg.json", tmp_path / "out" / "ecg.safetensors")
    loaded = load_dataset(tmp_path / "out" / "ecg.safetensors", TASKS["ecg-noise"])
    assert loaded.features.shape == (2, 12, 1000) and loaded.answers == ("baseline drift",) * 2 == dataset.answers


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r[1].pop("conversations"), "record 1: missing key 'conversations'"),
        (lambda r: r[2].pop("modality_path"), "record 2: missing key 'modality_path'"),
        (lambda r: r[0].update(conversations=[{"question": "q"}]), "record 0: conversations[0]: missing key 'answer'"),
        (lambda r: r[3].update(conversations=[{"from": "gpt", "value": "yes"}]), "record 3: 'conversations' has no"),
        (lambda r: r[2].update(conversations=[{"question": "q", "answer": "Maybe"}]), "record 2: answer 'Maybe'"),
        (lambda r: r[1].update(conversations=[{"question": "q", "answer": "Normal"}]), "neither 'yes' nor 'no'"),
        (lambda r: r[1].update(modality_path="gone.png"), "record 1: X-ray file"),
        (lambda r: r[0].update(modalities="image"), "record 0: 'modalities' must be a list"),
        (lambda r: r.append(7), "record 4: expected an object, got int"),
    ],
)
def test_bad_fedmeki_json(tmp_path: Path, change: Any, expected: str) -> None:
    records = _xray_records(tmp_path)
    change(records)
    (tmp_path / "records.json").write_text(json.dumps(records))
    assert expected in _error(read_conversations, tmp_path / "records.json", TASKS["lung-opacity"], 32)


def test_bad_fedmeki_json_files(tmp_path: Path) -> None:
    task = TASKS["lung-opacity"]
    assert "does not exist" in _error(read_conversations, tmp_path / "absent.json", task)
    (tmp_path / "broken.json").write_text("[{")
    assert "not valid JSON" in _error(read_conversations, tmp_path / "broken.json", task)
    (tmp_path / "object.json").write_text("{}")
    assert "expected a JSON list of records, got dict" in _error(read_conversations, tmp_path / "object.json", task)
    (tmp_path / "empty.json").write_text("[]")
    assert "holds no records" in _error(read_conversations, tmp_path / "empty.json", task)


def test_import_a_labelled_folder(tmp_path: Path) -> None:
    source = tmp_path / "stays"
    source.mkdir()
    header = ",".join(["hour"] + [f"f{i}" for i in range(48)])
    for i in range(3):
        (source / f"{i}.csv").write_text(header + "\n" + ",".join([str(i)] * 49) + "\n")
    (tmp_path / "labels.csv").write_text("file,label\n0.csv,1\n1.csv,no\n2.csv,Yes\n")
    out = tmp_path / "mortality.safetensors"
    dataset, _ = import_dataset(TASKS["mortality"], source, out, labels_csv=tmp_path / "labels.csv")
    loaded = load_dataset(out, TASKS["mortality"])
    assert loaded.features.shape == (3, 24, 48) and loaded.labels.tolist() == [1, 0, 1] == dataset.labels.tolist()
    (tmp_path / "bad.csv").write_text("file,label\n0.csv,perhaps\n")
    message = _error(import_dataset, TASKS["mortality"], source, out, labels_csv=tmp_path / "bad.csv")
    assert "data row 1: label 'perhaps' is not 0, 1, yes or no" in message
    (tmp_path / "gone.csv").write_text("file,label\n0.csv,1\ngone.csv,0\n")
    message = _error(import_dataset, TASKS["mortality"], source, out, labels_csv=tmp_path / "gone.csv")
    assert "data row 2: EHR file" in message and "gone.csv does not exist" in message
    assert "needs a labels CSV" in _error(import_dataset, TASKS["mortality"], source, out)
    assert "only for segmentation" in _error(import_dataset, TASKS["mortality"], source, out, mask_dir=source)
    assert "import it from a FedMEKI JSON" in _error(import_dataset, TASKS["medvqa"], source, out)
    assert "does not exist" in _error(import_dataset, TASKS["mortality"], tmp_path / "absent", out)


def test_import_segmentation_volumes_and_masks(tmp_path: Path) -> None:
    (tmp_path / "volumes").mkdir()
    (tmp_path / "masks").mkdir()
    for name, depth in (("a.nii.gz", 3), ("b.nii.gz", 2)):
        _write_nifti(tmp_path / "volumes" / name, np.full((16, 16, depth), -1000.0, np.float32))
        _write_nifti(tmp_path / "masks" / name, np.ones((16, 16, depth), np.uint8))
    task, out = TASKS["ct-infection-segmentation"], tmp_path / "seg.safetensors"
    import_dataset(task, tmp_path / "volumes", out, image_size=8, mask_dir=tmp_path / "masks")
    loaded = load_dataset(out, task, 8)
    assert loaded.features.shape == (5, 1, 8, 8) and loaded.masks is not None and loaded.masks.all()
    (tmp_path / "masks" / "b.nii.gz").unlink()
    assert "no mask" in _error(import_dataset, task, tmp_path / "volumes", out, mask_dir=tmp_path / "masks")
    assert "needs a folder of masks" in _error(import_dataset, task, tmp_path / "volumes", out)


def test_the_data_import_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "records.json").write_text(json.dumps(_xray_records(tmp_path)))
    parser = build_parser()
    out = tmp_path / "lung.safetensors"
    common = ["data", "import", "--task", "lung-opacity", "--out", str(out), "--image-size", "16"]
    assert run_command(parser, [*common, "--source", str(tmp_path / "records.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"imported 4 samples of shape [1, 16, 16], 2 positive / 2 negative (50% positive), to {out}"
    assert load_dataset(out, TASKS["lung-opacity"], 16).labels.tolist() == [1, 0, 1, 0]
    assert run_command(parser, [*common, "--source", str(tmp_path / "absent.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
