"""Raw files -> one dataset file: `import_dataset` (the `fedmeki data import` command is fedmeki_core.app).

Sources: a FedMEKI JSON file of records; a folder of modality files plus a labels CSV (`file,label`, label 0/1 or
yes/no) for binary tasks; for ct-infection-segmentation a folder of NIfTI volumes with same-named NIfTI masks.
Every source file is read, accepted or refused (rules.py); one refusal fails the import unless `skip_refused`.
A tabular task reads one CSV through its schema.yaml (tabular.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import LabelType, Modality, TaskInfo
from fedmeki_core.tasks.dataset import ArrayDataset, save_dataset
from fedmeki_core.tasks.formats.conversations import binary_label, read_conversation_sources
from fedmeki_core.tasks.formats.ct import FloatArray, MaskArray, is_nifti, read_ct_slices
from fedmeki_core.tasks.formats.ecg import read_csv_rows
from fedmeki_core.tasks.formats.rules import ImportOptions, ReaderNoise
from fedmeki_core.tasks.formats.sources import (
    SourceOutcome,
    read_samples,
    read_source,
    refusal_summary,
    write_report,
)
from fedmeki_core.tasks.formats.tabular import TableSchema, import_table, read_schema

_BINARY_VALUES = {"0": 0, "1": 1}


def import_dataset(
    task: TaskInfo,
    source: Path,
    out: Path,
    *,
    labels_csv: Path | None = None,
    image_size: int | None = None,
    mask_dir: Path | None = None,
    options: ImportOptions | None = None,
    report: Path | None = None,
    skip_refused: bool = False,
    schema: Path | None = None,
) -> tuple[ArrayDataset, tuple[SourceOutcome, ...]]:
    """Read `source` for `task`, write it to `out` as a safetensors dataset file; return it and every source
    file's outcome. A refused file fails the import (nothing written but the report) unless `skip_refused`."""
    source = Path(source)
    if not source.exists():
        raise InvalidInputError(f"source {source} does not exist")
    if image_size is not None and image_size < 1:
        raise InvalidInputError(f"image size must be positive, got {image_size}")
    if mask_dir is not None and task.label_type != LabelType.MASK:
        raise InvalidInputError(f"task {task.name} has no masks; a mask folder is only for segmentation tasks")
    if (schema is not None) != (task.modality == Modality.TABLE):
        raise InvalidInputError(f"task {task.name}: a schema.yaml is for tabular tasks, and they need one (--schema)")
    options = options or ImportOptions()
    outcomes: tuple[SourceOutcome, ...]
    if schema is not None:
        table_schema = read_schema(schema)
        kind = {LabelType.BINARY: "binary", LabelType.REGRESSION: "regression"}.get(task.label_type, "multiclass")
        if table_schema.label.kind != kind:
            raise InvalidInputError(f"{schema}: a {table_schema.label.kind} label, task {task.name} takes {kind} ones")
        dataset, outcomes = _import_table(source, table_schema)
    elif source.is_file() and source.suffix.lower() == ".json":
        if labels_csv is not None:
            raise InvalidInputError(f"{source}: a JSON source carries its labels in its answers; drop the labels CSV")
        dataset, outcomes = read_conversation_sources(source, task, image_size, options)
    elif task.label_type == LabelType.MASK:
        dataset, outcomes = _import_segmentation(task, source, mask_dir, image_size)
    else:
        dataset, outcomes = _import_labelled_folder(task, source, labels_csv, image_size, options)
    if report is not None:
        write_report(Path(report), outcomes)
    if (summary := refusal_summary(outcomes)) and not skip_refused:
        raise InvalidInputError(f"{summary} (nothing imported; --skip-refused imports the rest)")
    if len(dataset) == 0:
        raise InvalidInputError(f"{source}: no samples to import")
    save_dataset(dataset, Path(out))
    return dataset, outcomes


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
    task: TaskInfo, folder: Path, labels_csv: Path | None, image_size: int | None, options: ImportOptions
) -> tuple[ArrayDataset, tuple[SourceOutcome, ...]]:
    if task.label_type != LabelType.BINARY:
        raise InvalidInputError(f"task {task.name} has {task.label_type.value} labels: import it from a FedMEKI JSON")
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: expected a folder of modality files or a FedMEKI .json file")
    if labels_csv is None:
        raise InvalidInputError(f"task {task.name}: importing the folder {folder} needs a labels CSV (file,label)")
    rows = read_labels_csv(Path(labels_csv))
    if not rows:
        raise InvalidInputError(f"{labels_csv}: lists no files")
    paths = [folder / name for name, _ in rows]
    read = read_samples(task, paths, image_size, label="data row", first=1, options=options)
    labels = np.array(read.repeat([label for _, label in rows]), dtype=np.int64)
    return ArrayDataset(features=read.features, labels=labels), read.outcomes


def _import_table(source: Path, schema: TableSchema) -> tuple[ArrayDataset, tuple[SourceOutcome, ...]]:
    table, reason, warnings = read_source(str(source), lambda _: import_table(source, schema))
    if table is None:
        empty = ArrayDataset(np.empty((0, schema.width), np.float32), np.empty(0, np.int64))
        return empty, (SourceOutcome(str(source), "table", 0, reason, warnings),)
    return table.dataset, (SourceOutcome(str(source), "table", len(table.dataset), "", table.notes() + warnings),)


def _import_segmentation(
    task: TaskInfo, folder: Path, mask_dir: Path | None, image_size: int | None
) -> tuple[ArrayDataset, tuple[SourceOutcome, ...]]:
    if mask_dir is None or not Path(mask_dir).is_dir():
        raise InvalidInputError(f"task {task.name} needs a folder of masks named like the volumes in {folder}")
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: task {task.name} imports a folder of NIfTI volumes")
    volumes = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))
    if not volumes:
        raise InvalidInputError(f"{folder}: no NIfTI volumes (.nii, .nii.gz)")
    size = task.sample_shape(image_size)[1]
    images, masks, outcomes = [], [], []
    for number, volume in enumerate(volumes, start=1):
        mask, where = Path(mask_dir) / volume.name, f"volume {number} (by name)"
        if not mask.is_file():
            outcomes.append(SourceOutcome(str(volume), where, 0, f"{volume}: no mask {mask}"))
            continue

        def read(_: ReaderNoise, volume: Path = volume, mask: Path = mask) -> tuple[FloatArray, MaskArray]:
            return read_ct_slices(volume, mask, size)

        pair, reason, warnings = read_source(str(volume), read)
        if pair is not None:
            images.append(pair[0])
            masks.append(pair[1])
        outcomes.append(SourceOutcome(str(volume), where, 0 if pair is None else len(pair[0]), reason, warnings))
    features = np.concatenate([np.empty((0, 1, size, size), np.float32), *images])
    dataset = ArrayDataset(
        features=features,
        labels=np.full(len(features), -1, dtype=np.int64),
        masks=np.concatenate([np.empty((0, size, size), np.uint8), *masks]),
    )
    return dataset, tuple(outcomes)


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
