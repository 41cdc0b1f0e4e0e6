"""Raw files -> one dataset file: `import_dataset` and the `fedmeki data import` command that runs it.

Sources: a FedMEKI JSON file of records; a folder of modality files plus a labels CSV (`file,label`, label 0/1 or
yes/no) for binary tasks; for ct-infection-segmentation a folder of NIfTI volumes with same-named NIfTI masks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import TASKS, LabelType, TaskInfo, get_task
from fedmeki_core.tasks.dataset import ArrayDataset, save_dataset
from fedmeki_core.tasks.formats.conversations import binary_label, read_conversations, read_samples
from fedmeki_core.tasks.formats.ct import is_nifti, read_ct_slices
from fedmeki_core.tasks.formats.ecg import read_csv_rows

_BINARY_VALUES = {"0": 0, "1": 1}


def import_dataset(
    task: TaskInfo,
    source: Path,
    out: Path,
    *,
    labels_csv: Path | None = None,
    image_size: int | None = None,
    mask_dir: Path | None = None,
) -> ArrayDataset:
    """Read `source` for `task`, write it to `out` as a safetensors dataset file and return it."""
    source = Path(source)
    if not source.exists():
        raise InvalidInputError(f"source {source} does not exist")
    if image_size is not None and image_size < 1:
        raise InvalidInputError(f"image size must be positive, got {image_size}")
    if mask_dir is not None and task.label_type != LabelType.MASK:
        raise InvalidInputError(f"task {task.name} has no masks; a mask folder is only for segmentation tasks")
    if source.is_file() and source.suffix.lower() == ".json":
        if labels_csv is not None:
            raise InvalidInputError(f"{source}: a JSON source carries its labels in its answers; drop the labels CSV")
        dataset = read_conversations(source, task, image_size)
    elif task.label_type == LabelType.MASK:
        dataset = _import_segmentation(task, source, mask_dir, image_size)
    else:
        dataset = _import_labelled_folder(task, source, labels_csv, image_size)
    if len(dataset) == 0:
        raise InvalidInputError(f"{source}: no samples to import")
    save_dataset(dataset, Path(out))
    return dataset


def read_labels_csv(path: Path) -> list[tuple[str, int]]:
    """(file, label) rows of a CSV with a header naming the columns `file` and `label` (0/1 or yes/no)."""
    if not path.is_file():
        raise InvalidInputError(f"labels CSV {path} does not exist")
    rows = read_csv_rows(path)
    header = [name.lower() for name in rows[0]] if rows else []
    if "file" not in header or "label" not in header:
        raise InvalidInputError(f"{path}: needs a header row with the columns 'file' and 'label'")
    file_column, label_column = header.index("file"), header.index("label")
    labels = []
    for number, row in enumerate(rows[1:], start=1):
        if len(row) != len(header):
            raise InvalidInputError(f"{path}: data row {number} has {len(row)} values, the header {len(header)}")
        value = row[label_column]
        label = _BINARY_VALUES[value] if value in _BINARY_VALUES else binary_label(value)
        if label is None:
            raise InvalidInputError(f"{path}: data row {number}: label {value!r} is not 0, 1, yes or no")
        if not row[file_column]:
            raise InvalidInputError(f"{path}: data row {number}: empty file name")
        labels.append((row[file_column], label))
    return labels


def _import_labelled_folder(
    task: TaskInfo, folder: Path, labels_csv: Path | None, image_size: int | None
) -> ArrayDataset:
    if task.label_type != LabelType.BINARY:
        raise InvalidInputError(f"task {task.name} has {task.label_type.value} labels: import it from a FedMEKI JSON")
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: expected a folder of modality files or a FedMEKI .json file")
    if labels_csv is None:
        raise InvalidInputError(f"task {task.name}: importing the folder {folder} needs a labels CSV (file,label)")
    rows = read_labels_csv(Path(labels_csv))
    if not rows:
        raise InvalidInputError(f"{labels_csv}: lists no files")
    features = read_samples(
        task, [folder / name for name, _ in rows], image_size, label=f"{labels_csv}: data row", first=1
    )
    return ArrayDataset(features=features, labels=np.array([label for _, label in rows], dtype=np.int64))


def _import_segmentation(task: TaskInfo, folder: Path, mask_dir: Path | None, image_size: int | None) -> ArrayDataset:
    if mask_dir is None or not Path(mask_dir).is_dir():
        raise InvalidInputError(f"task {task.name} needs a folder of masks named like the volumes in {folder}")
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: task {task.name} imports a folder of NIfTI volumes")
    volumes = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))
    if not volumes:
        raise InvalidInputError(f"{folder}: no NIfTI volumes (.nii, .nii.gz)")
    size = task.sample_shape(image_size)[1]
    images, masks = [], []
    for volume in volumes:
        mask = Path(mask_dir) / volume.name
        if not mask.is_file():
            raise InvalidInputError(f"{volume}: no mask {mask}")
        slices, slice_masks = read_ct_slices(volume, mask, size)
        images.append(slices)
        masks.append(slice_masks)
    features = np.concatenate(images)
    return ArrayDataset(
        features=features, labels=np.full(len(features), -1, dtype=np.int64), masks=np.concatenate(masks)
    )


def describe_import(dataset: ArrayDataset, out: Path) -> str:
    """One line for a person: samples, sample shape, label balance, output path."""
    count = len(dataset)
    shape = ", ".join(map(str, dataset.features.shape[1:]))
    if dataset.masks is not None:
        balance = f"{float(dataset.masks.mean()):.2%} of mask pixels positive"
    elif dataset.answers:
        balance = "question/answer pairs, no class labels"
    else:
        positive = int((dataset.labels == 1).sum())
        balance = f"{positive} positive / {count - positive} negative ({positive / max(count, 1):.0%} positive)"
    return f"imported {count} samples of shape [{shape}], {balance}, to {out}"


def _import_command(args: argparse.Namespace) -> int:
    dataset = import_dataset(
        get_task(args.task),
        args.source,
        args.out,
        labels_csv=args.labels,
        image_size=args.image_size,
        mask_dir=args.masks,
    )
    print(describe_import(dataset, args.out))
    return 0


def add_import_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `import` to the sub-commands of `fedmeki data`."""
    importer = commands.add_parser(
        "import", help="turn raw files (DICOM, PNG/JPEG, WFDB, CSV, NumPy, NIfTI, FedMEKI JSON) into a dataset file"
    )
    importer.add_argument("--task", required=True, choices=sorted(TASKS))
    importer.add_argument("--source", type=Path, required=True, help="a FedMEKI .json file, or a folder of files")
    importer.add_argument("--out", type=Path, required=True, help="the dataset file to write (.safetensors)")
    importer.add_argument("--labels", type=Path, help="CSV with the columns file,label for a folder source")
    importer.add_argument("--image-size", type=int, help="image side in pixels (default: the task's)")
    importer.add_argument("--masks", type=Path, help="folder of NIfTI masks named like the volumes")
    importer.set_defaults(handler=_import_command)
