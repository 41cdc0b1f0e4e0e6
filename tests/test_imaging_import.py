"""Modality-correct imaging import over the real DICOM and NIfTI files pydicom and nibabel ship (nothing downloaded).

A test builds a variant of a shipped file in tmp_path only where no shipped file fits; it says which and why.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import ComputedRadiographyImageStorage

from fedmeki_core.app.cli import build_parser
from fedmeki_core.commands import run_command
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import TASKS
from fedmeki_core.tasks.dataset import load_dataset
from fedmeki_core.tasks.formats import Frames, ImportOptions, read_ct_volume, read_xray
from fedmeki_core.tasks.formats.ct import HU_MAX, HU_MIN, MAX_VOXELS
from fedmeki_core.tasks.formats.xray import resize_square, scale_to_unit

NIFTI = Path(data_path)


def _shipped(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path)


def _variant(name: str, out: Path, **changes: Any) -> Path:
    """A copy of a shipped file with some attributes set (None deletes one)."""
    ds = pydicom.dcmread(_shipped(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(out)
    return out


def _error(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InvalidInputError) as info:
        call(*args, **kwargs)
    return info.value.message


def _series(name: str) -> Path:
    """A folder of one CT series in pydicom's dicomdirtests: CT5N (5 axial slices, 2.5 mm apart), CT2 (4 slices,
    the first 202 mm from the next), CT2N (2 slices in different orientations)."""
    folder = _shipped("DICOMDIR").parent
    return next(p for p in folder.rglob(name) if p.is_dir())


# X-ray: what a file is, and what the task takes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("rtdose_1frame.dcm", "RT Dose Storage (modality RTDOSE)"),
        ("liver_1frame.dcm", "Segmentation Storage (modality SEG)"),
        ("MR_small.dcm", "MR Image Storage (modality MR)"),
        ("US1_UNCR.dcm", "Ultrasound Image Storage (modality US)"),
        ("OBXXXX1A.dcm", "Ultrasound Image Storage (modality US)"),  # palette-colour ultrasound
        ("CT_small.dcm", "CT Image Storage (modality CT)"),
        ("SC_rgb_small_odd.dcm", "Secondary Capture Image Storage (modality OT)"),
        ("JPEG-lossy.dcm", "Secondary Capture Image Storage (modality NM)"),
    ],
)
def test_an_xray_task_refuses_what_is_not_a_radiograph(name: str, what: str) -> None:
    message = _error(read_xray, _shipped(name), 64)
    assert message == f"{_shipped(name)}: {what} is not a chest X-ray (modality CR or DX)"


def test_a_cr_radiograph_is_accepted_and_a_tiny_one_refused() -> None:
    assert read_xray(_shipped("RG3_UNCI.dcm"), 64).shape == (1, 1, 64, 64)
    # 6154: a real 16 x 16 CR image; at 64 pixels it would be enlarged four times.
    message = _error(read_xray, _shipped("6154"), 64)
    assert "image of 16x16 pixels is too small for 64x64 (the shorter side must be at least 32 pixels)" in message
    assert read_xray(_shipped("6154"), 32).shape == (1, 1, 32, 32)


def test_palette_colour_goes_through_its_lookup_table(tmp_path: Path) -> None:
    # No shipped CR/DX file is palette colour: OBXXXX1A.dcm (palette ultrasound) relabelled as CR.
    path = _variant(
        "OBXXXX1A.dcm", tmp_path / "palette.dcm", Modality="CR", SOPClassUID=ComputedRadiographyImageStorage
    )
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    expected = scale_to_unit(resize_square(grey, 64))
    image = read_xray(path, 64)
    np.testing.assert_allclose(image[0, 0], expected, atol=1e-5)
    indices_as_grey = scale_to_unit(resize_square(ds.pixel_array.astype(np.float32), 64))
    assert np.abs(image[0, 0] - indices_as_grey).mean() > 0.05  # the palette indices are not grey levels
    broken = _variant("OBXXXX1A.dcm", tmp_path / "nolut.dcm", Modality="CR", RedPaletteColorLookupTableData=None)
    ds = pydicom.dcmread(broken)
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.save_as(broken)
    assert "palette colour whose lookup table cannot be applied" in _error(read_xray, broken, 64)


def test_multi_frame_files_are_refused_unless_the_user_chooses(tmp_path: Path) -> None:
    # No shipped CR/DX file has several frames: SC_rgb_2frame.dcm (a two-frame secondary capture) marked DX.
    path = _variant("SC_rgb_2frame.dcm", tmp_path / "two.dcm", Modality="DX")
    assert "a multi-frame file (2 frames); choose --frames first or all" in _error(read_xray, path, 64)
    first = read_xray(path, 64, ImportOptions(frames=Frames.FIRST))
    both = read_xray(path, 64, ImportOptions(frames=Frames.ALL))
    assert first.shape == (1, 1, 64, 64) and both.shape == (2, 1, 64, 64)
    np.testing.assert_array_equal(first[0], both[0])
    assert not np.array_equal(both[0], both[1])


def test_burned_in_annotation_is_refused_unless_allowed(tmp_path: Path) -> None:
    # No shipped radiograph says YES: RG3_UNCI.dcm with Burned In Annotation set.
    path = _variant("RG3_UNCI.dcm", tmp_path / "burned.dcm", BurnedInAnnotation="YES")
    assert "Burned In Annotation is YES" in _error(read_xray, path, 64)
    np.testing.assert_array_equal(
        read_xray(path, 64, ImportOptions(allow_burned_in=True)), read_xray(_shipped("RG3_UNCI.dcm"), 64)
    )


def test_a_12_bit_jpeg_prints_no_traceback(tmp_path: Path) -> None:
    # JPEG-lossy.dcm (12-bit JPEG Extended, which Pillow cannot decode) relabelled CR so that decoding is tried.
    # The command runs in its own process, as a person runs it: pytest's log capture would hide pydicom's traceback.
    path = _variant(
        "JPEG-lossy.dcm", tmp_path / "jpeg12.dcm", Modality="CR", SOPClassUID=ComputedRadiographyImageStorage
    )
    (tmp_path / "labels.csv").write_text(f"file,label\n{path.name},1\n")
    report = tmp_path / "report.csv"
    argv = ["data", "import", "--task", "lung-opacity", "--source", str(tmp_path), "--out", str(tmp_path / "x.st")]
    argv += ["--labels", str(tmp_path / "labels.csv"), "--report", str(report), "--frames", "first"]
    command = [sys.executable, "-c", "from fedmeki_core.app.cli import main; raise SystemExit(main())", *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "DICOM pixel data cannot be decoded" in done.stderr and "12-bit" in done.stderr
    (row,) = _rows(report)
    assert row["status"] == "refused" and "reader warnings (pydicom/nibabel) not shown" in row["warnings"]
    assert not (tmp_path / "x.st").exists()


# CT: series, Hounsfield units, NIfTI headers ----------------------------------------------------------------------


def test_a_real_ct_series_in_hounsfield_units_sorted_by_position() -> None:
    folder = _series("CT5N")
    volume = read_ct_volume(folder, 5, 16)
    slices = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2]))
    hounsfield = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    expected = np.clip((hounsfield - HU_MIN) / (HU_MAX - HU_MIN), 0, 1)
    np.testing.assert_allclose(volume[0], expected, atol=1e-6)
    assert "5 slices, fewer than the task's depth of 8" in _error(read_ct_volume, folder, 8, 16)
    assert read_ct_volume(folder, 8, 16, ImportOptions(resample_slices=True)).shape == (1, 8, 16, 16)


def test_gaps_duplicates_and_mixed_orientations_are_refused(tmp_path: Path) -> None:
    assert "a gap of 202.50 mm after slice 1 of 4 where the series steps 1.25 mm" in _error(
        read_ct_volume, _series("CT2"), 4, 16
    )
    assert "slices differ in orientation" in _error(read_ct_volume, _series("CT2N"), 2, 16)
    for copy in range(3):  # one real slice three times: the same position
        shutil.copy(_shipped("CT_small.dcm"), tmp_path / f"copy{copy}.dcm")
    assert "2 slices repeat the position of another slice" in _error(read_ct_volume, tmp_path, 3, 64)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(_shipped("CT_small.dcm"), single / "a.dcm")
    assert "1 slices, fewer than the task's depth of 32" in _error(read_ct_volume, single, 32, 128)


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("rtdose_1frame.dcm", "RT Dose Storage (modality RTDOSE) is not a CT slice"),
        ("MR_small.dcm", "MR Image Storage (modality MR) is not a CT slice"),
        ("eCT_Supplemental.dcm", "Enhanced CT Image Storage (modality CT) is not a CT slice"),
    ],
)
def test_a_ct_task_refuses_other_series(tmp_path: Path, name: str, what: str) -> None:
    shutil.copy(_shipped(name), tmp_path / name)
    assert what in _error(read_ct_volume, tmp_path, 1, 16)


def test_a_slice_without_rescale_has_no_hounsfield_units(tmp_path: Path) -> None:
    # Every shipped CT slice carries its rescale: CT_small.dcm with Rescale Slope removed.
    _variant("CT_small.dcm", tmp_path / "a.dcm", RescaleSlope=None)
    assert "without Rescale Slope/Intercept" in _error(read_ct_volume, tmp_path, 1, 64)


def test_nifti_that_cannot_be_a_ct_volume() -> None:
    message = _error(read_ct_volume, NIFTI / "anatomical.nii", 8, 16)  # a T1 MR volume
    assert "cannot be chest CT Hounsfield units" in message and "0.0% of voxels at or below -500 HU" in message
    assert "a CIFTI-2 file" in _error(read_ct_volume, NIFTI / "row_major.dconn.nii", 8, 16)
    assert "holds 2 volumes" in _error(read_ct_volume, NIFTI / "example4d.nii.gz", 8, 16)


def test_a_nifti_header_over_the_voxel_cap_is_refused_before_any_read(tmp_path: Path) -> None:
    # No shipped file claims a huge shape: a 352-byte header declaring 30000^3 voxels and no data at all.
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\x00" * 4)
    assert f"30000 x 30000 x 30000 = 27,000,000,000,000 voxels, over the cap of {MAX_VOXELS:,}" in _error(
        read_ct_volume, path, 8, 16
    )


# The import: every shipped file, one report row each, no identifier in any output --------------------------------


def _identifiers(paths: list[Path]) -> set[str]:
    """Names, IDs, instance UIDs and dates of the DICOM files among `paths` (standard class UIDs excluded)."""
    found: set[str] = set()
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some shipped files hold malformed values, on purpose
            try:
                elements = list(pydicom.dcmread(path, stop_before_pixels=True).iterall())
            except Exception:  # noqa: S112 -- not DICOM: no identifiers
                continue
        for element in elements:
            if element.VR in ("PN", "UI", "DA", "DT") or element.keyword in ("PatientID", "OtherPatientIDs"):
                values = element.value if element.VM > 1 else [element.value]
                found |= {str(v) for v in values if len(str(v)) >= 4 and not str(v).startswith("1.2.840.10008.")}
    return found


def _rows(report: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(report.read_text().splitlines()))


def _import(tmp_path: Path, task: str, rows: list[tuple[Path, int]], *extra: str) -> tuple[int, Path, Path]:
    labels, report, out = tmp_path / "labels.csv", tmp_path / f"{task}.csv", tmp_path / f"{task}.safetensors"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *((str(path), label) for path, label in rows)])
    argv = ["data", "import", "--task", task, "--source", str(tmp_path), "--labels", str(labels)]
    code = run_command(build_parser(), [*argv, "--out", str(out), "--report", str(report), *extra])
    return code, report, out


def test_every_shipped_file_is_accepted_or_refused_quietly_and_no_identifier_leaks(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    files = sorted(Path(p) for p in get_testdata_files() if Path(p).is_file())
    xray_rows = [(path, i % 2) for i, path in enumerate(files)]
    code, xray_report, xray_out = _import(tmp_path, "lung-opacity", xray_rows, "--image-size", "32", "--skip-refused")
    assert code == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Warning" not in err
    report = _rows(xray_report)
    assert [row["source"] for row in report] == [f"data row {n}" for n in range(1, len(files) + 1)]
    accepted = {files[n].name for n, row in enumerate(report) if row["status"] == "accepted"}
    assert {"RG1_UNCI.dcm", "RG3_UNCI.dcm", "RG1_J2KR.dcm", "6154"} <= accepted
    assert not accepted & {"rtdose_1frame.dcm", "liver_1frame.dcm", "MR_small.dcm", "OBXXXX1A.dcm", "badVR.dcm"}
    assert all(row["reason"] for row in report if row["status"] == "refused")
    assert len(err.strip().splitlines()) == len(report) - len(accepted)  # one line per refused file
    dataset = load_dataset(xray_out, TASKS["lung-opacity"], 32)
    assert len(dataset) == sum(int(row["samples"]) for row in report) == len(accepted)

    series = [(_series("CT5N"), 1), (_series("CT2"), 0), (_series("CT2N"), 0), (NIFTI / "anatomical.nii", 1)]
    ct_rows = [*series, (NIFTI / "row_major.dconn.nii", 0), (NIFTI / "example4d.nii.gz", 1)]
    code, ct_report, ct_out = _import(tmp_path, "ct-covid", ct_rows, "--image-size", "16", "--skip-refused")
    assert code == 2 and "no samples to import" in capfd.readouterr().err
    statuses = [row["status"] for row in _rows(ct_report)]
    assert statuses == ["refused"] * 6  # CT5N has 5 slices for a depth of 32, and no --resample-slices
    code, ct_report, ct_out = _import(tmp_path, "ct-covid", ct_rows, "--image-size", "16", "--resample-slices")
    assert code == 2  # one file refused fails the import: nothing written but the report
    statuses = [row["status"] for row in _rows(ct_report)]
    assert statuses == ["accepted"] + ["refused"] * 5 and not ct_out.exists()
    code, ct_report, ct_out = _import(
        tmp_path, "ct-covid", ct_rows, "--image-size", "16", "--resample-slices", "--skip-refused"
    )
    assert code == 0 and load_dataset(ct_out, TASKS["ct-covid"], 16).labels.tolist() == [1]

    identifiers = _identifiers(files + [p for folder, _ in series[:3] for p in folder.iterdir()])
    assert {"CompressedSamples^RG1", "9RG1", "19400305"} <= identifiers  # the scan looks for real values
    outputs = {path.name: path.read_bytes() for path in (xray_report, xray_out, ct_report, ct_out)}
    leaks = sorted((value, name) for value in identifiers for name, blob in outputs.items() if value.encode() in blob)
    assert leaks == []
