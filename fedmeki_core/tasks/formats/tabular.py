"""A hospital's own table (CSV) read through a declared schema (schema.yaml) into [N, F] float32 features.

The schema names the feature columns (numeric, or categorical with their levels, one-hot encoded in the declared
order), the label column and its kind, and what to do with a missing value or an unseen category: `refuse` (the
default: the import fails naming the row), `drop-row`, `mean` or `constant` (numeric), `constant` (categorical).
Nothing is filled in silently, and columns the schema does not name (IDs, names, dates) are never read into the
dataset. A numeric column may declare `mean` and `std`: it is standardised as (x - mean) / std, the same way at
every silo; `column_moments` and `combine_moments` compute them from each silo's count, sum and sum of squares.
A regression label (kind `regression`: a real number, the dataset's `targets`) may declare `mean` and `std` too,
and is then learnt and scored standardised.
Parquet is not read: pyarrow is not a dependency.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.dataset import ArrayDataset

MAX_TABLE_BYTES = 1 << 30  # a CSV over 1 GiB is refused before it is read
MAX_COLUMNS = 4096  # encoded feature columns
MAX_CLASSES = 32  # the label levels of tabular-multiclass


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericColumn(_Rules):
    name: str = Field(min_length=1)
    type: Literal["numeric"]
    missing: Literal["refuse", "drop-row", "mean", "constant"] = "refuse"
    value: float | None = None  # for missing: constant
    mean: float | None = None  # standardisation, and what missing: mean fills in when given
    std: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _rules_complete(self) -> NumericColumn:
        if self.missing == "constant" and self.value is None:
            raise ValueError(f"column {self.name!r}: missing: constant needs a value")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"column {self.name!r}: give both mean and std to standardise, or neither")
        return self


class CategoricalColumn(_Rules):
    name: str = Field(min_length=1)
    type: Literal["categorical"]
    levels: list[str] = Field(min_length=1)
    missing: Literal["refuse", "drop-row", "constant"] = "refuse"
    value: str | None = None  # for missing: constant, one of the levels
    unseen: Literal["refuse", "drop-row"] = "refuse"

    @model_validator(mode="after")
    def _rules_complete(self) -> CategoricalColumn:
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"column {self.name!r}: levels repeat")
        if self.missing == "constant" and self.value not in self.levels:
            raise ValueError(f"column {self.name!r}: missing: constant needs a value among the levels")
        return self


class LabelColumn(_Rules):
    column: str = Field(min_length=1)
    kind: Literal["binary", "multiclass", "regression"]  # tasks tabular, tabular-multiclass, tabular-regression
    levels: list[str] = Field(default_factory=list, max_length=MAX_CLASSES)  # class 0, 1, ...: binary [neg, pos]
    missing: Literal["refuse", "drop-row"] = "refuse"
    mean: float | None = None  # a regression label's standardisation, as a numeric column's
    std: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _levels_fit_kind(self) -> LabelColumn:
        if self.kind == "regression":
            if self.levels:
                raise ValueError("a regression label is a number: it has no levels")
            if (self.mean is None) != (self.std is None):
                raise ValueError("give the label both mean and std to standardise it, or neither")
            return self
        if self.mean is not None or self.std is not None:
            raise ValueError(f"a {self.kind} label has levels, not a mean and std")
        if len(self.levels) < 2:
            raise ValueError(f"a {self.kind} label lists at least two levels")
        if self.kind == "binary" and len(self.levels) != 2:
            raise ValueError("a binary label has exactly two levels: [negative, positive]")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError("label levels repeat")
        return self


class TableSchema(_Rules):
    features: list[Annotated[NumericColumn | CategoricalColumn, Field(discriminator="type")]] = Field(min_length=1)
    label: LabelColumn
    missing_values: list[str] = Field(default_factory=lambda: ["", "NA", "NaN", "null"])

    @model_validator(mode="after")
    def _columns_distinct(self) -> TableSchema:
        names = [f.name for f in self.features] + [self.label.column]
        if len(set(names)) != len(names):
            raise ValueError("a column is named twice (features and label must be distinct)")
        if self.width > MAX_COLUMNS:
            raise ValueError(f"{self.width} encoded feature columns, over {MAX_COLUMNS}")
        return self

    @property
    def width(self) -> int:
        """The number of encoded feature columns: one per numeric column, one per level of a categorical one."""
        return sum(1 if isinstance(f, NumericColumn) else len(f.levels) for f in self.features)


def read_schema(path: Path) -> TableSchema:
    """A schema.yaml, validated; a bad one is an InvalidInputError naming the field."""
    if not Path(path).is_file():
        raise InvalidInputError(f"schema {path} does not exist")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return TableSchema.model_validate(data)
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "schema"
        raise InvalidInputError(f"{path}: {where}: {error['msg']}") from None


@dataclass(frozen=True)
class TableImport:
    dataset: ArrayDataset
    dropped: dict[str, int]  # rows dropped, by the rule that dropped them ("missing age": 3)
    filled: dict[str, int]  # values filled in, by column

    def notes(self) -> tuple[str, ...]:
        """What the schema's rules did, for the report and the console: rows dropped, values filled."""
        drops = [f"{count} rows dropped ({rule})" for rule, count in sorted(self.dropped.items())]
        fills = [f"{count} values of {column} filled" for column, count in sorted(self.filled.items())]
        return (f"{self.dataset.features.shape[1]} encoded features", *drops, *fills)


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV file, each row as long as the header."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"table {path} does not exist")
    if path.suffix.lower() == ".parquet":
        raise InvalidInputError(f"{path}: Parquet is not read (pyarrow is not installed); export the table as CSV")
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise InvalidInputError(f"{path}: {path.stat().st_size:,} bytes, over the {MAX_TABLE_BYTES:,}-byte cap")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{path}: not a readable UTF-8 CSV ({exc})") from None
    if not rows:
        raise InvalidInputError(f"{path}: empty table")
    header = [name.strip() for name in rows[0]]
    for number, row in enumerate(rows[1:], start=1):
        if len(row) != len(header):
            raise InvalidInputError(f"{path}: data row {number} has {len(row)} values, the header {len(header)}")
    return header, rows[1:]


def import_table(path: Path, schema: TableSchema) -> TableImport:
    """The table's rows encoded by the schema's rules: features [N, width] float32, labels [N] int64 (a class), or
    of a regression label -1 and targets [N] float32."""
    header, rows = read_table(path)
    absent = [name for name in [*(f.name for f in schema.features), schema.label.column] if name not in header]
    if absent:
        raise InvalidInputError(f"{path}: no column {absent[0]!r} (the schema declares it)")
    index = {name: header.index(name) for name in header}
    missing = set(schema.missing_values)
    means = _local_means(path, rows, schema, index, missing)
    dropped: dict[str, int] = {}
    filled: dict[str, int] = {}
    features: list[list[float]] = []
    labels: list[float] = []
    for number, row in enumerate(rows, start=1):
        encoded = _encode_row(row, number, path, schema, index, missing, means, filled)
        if isinstance(encoded, str):
            dropped[encoded] = dropped.get(encoded, 0) + 1
            continue
        features.append(encoded[0])
        labels.append(encoded[1])
    if not features:
        raise InvalidInputError(f"{path}: no row left to import ({_counts(dropped)} dropped)")
    matrix = np.array(features, dtype=np.float32).reshape(len(features), schema.width)
    if schema.label.kind == "regression":
        targets = np.array(labels, dtype=np.float32)
        dataset = ArrayDataset(matrix, np.full(len(labels), -1, dtype=np.int64), targets=targets)
    else:
        dataset = ArrayDataset(matrix, np.array(labels, dtype=np.int64))
    return TableImport(dataset, dropped, filled)


def _encode_row(
    row: Sequence[str],
    number: int,
    path: Path,
    schema: TableSchema,
    index: dict[str, int],
    missing: set[str],
    means: dict[str, float],
    filled: dict[str, int],
) -> tuple[list[float], float] | str:
    """A row's (features, label), or the rule that dropped it."""
    where = f"{path}: data row {number}"
    label_text = row[index[schema.label.column]].strip()
    if label_text in missing:
        if schema.label.missing == "drop-row":
            return f"missing {schema.label.column}"
        raise InvalidInputError(f"{where}: label {schema.label.column!r} is missing (label missing: refuse)")
    label = _label(label_text, schema.label, where)
    values: list[float] = []
    for column in schema.features:
        text = row[index[column.name]].strip()
        if isinstance(column, NumericColumn):
            number_value = _numeric(text, column, where, missing, means, filled)
            if number_value is None:
                return f"missing {column.name}"
            if column.mean is not None and column.std is not None:
                number_value = (number_value - column.mean) / column.std
            values.append(number_value)
            continue
        if text in missing:
            if column.missing == "refuse":
                raise InvalidInputError(f"{where}: {column.name!r} is missing (missing: refuse)")
            if column.missing == "drop-row":
                return f"missing {column.name}"
            text = str(column.value)
            filled[column.name] = filled.get(column.name, 0) + 1
        if text not in column.levels:
            if column.unseen == "drop-row":
                return f"unseen {column.name}"
            raise InvalidInputError(
                f"{where}: {column.name!r} has the level {text!r}, not among {column.levels} (unseen: refuse)"
            )
        values.extend(float(level == text) for level in column.levels)
    return values, label


def _label(text: str, label: LabelColumn, where: str) -> float:
    """A class label's index, or a regression label's number (standardised where the schema says so)."""
    if label.kind != "regression":
        if text not in label.levels:
            raise InvalidInputError(f"{where}: label {text!r} is not one of {label.levels}")
        return label.levels.index(text)
    try:
        value = float(text)
    except ValueError:
        raise InvalidInputError(f"{where}: label {label.column!r} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise InvalidInputError(f"{where}: label {label.column!r} is {text!r}, not a finite number")
    if label.mean is not None and label.std is not None:
        value = (value - label.mean) / label.std
    return value


def _numeric(
    text: str, column: NumericColumn, where: str, missing: set[str], means: dict[str, float], filled: dict[str, int]
) -> float | None:
    if text in missing:
        if column.missing == "refuse":
            raise InvalidInputError(f"{where}: {column.name!r} is missing (missing: refuse)")
        if column.missing == "drop-row":
            return None
        filled[column.name] = filled.get(column.name, 0) + 1
        return float(column.value) if column.missing == "constant" and column.value is not None else means[column.name]
    try:
        value = float(text)
    except ValueError:
        raise InvalidInputError(f"{where}: {column.name!r} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise InvalidInputError(f"{where}: {column.name!r} is {text!r}, not a finite number")
    return value


def _local_means(
    path: Path, rows: Sequence[Sequence[str]], schema: TableSchema, index: dict[str, int], missing: set[str]
) -> dict[str, float]:
    """What `missing: mean` fills in: the declared mean, else the mean of the column's present values here."""
    means = {}
    for column in schema.features:
        if not isinstance(column, NumericColumn) or column.missing != "mean":
            continue
        if column.mean is not None:
            means[column.name] = column.mean
            continue
        present = [row[index[column.name]].strip() for row in rows]
        numbers = [float(text) for text in present if text not in missing and _is_number(text)]
        if not numbers:
            raise InvalidInputError(f"{path}: {column.name!r} has no value to take the mean of (missing: mean)")
        means[column.name] = float(np.mean(numbers))
    return means


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} for {rule}" for rule, count in sorted(counts.items())) or "none"


@dataclass(frozen=True)
class Moments:
    """A column's sufficient statistics at one silo: what `combine_moments` adds across silos."""

    count: int
    total: float
    squares: float


def column_moments(values: Iterable[float]) -> Moments:
    array = np.asarray(list(values), dtype=np.float64)
    return Moments(int(array.size), float(array.sum()), float((array**2).sum()))


def combine_moments(parts: Iterable[Moments]) -> tuple[float, float]:
    """(mean, standard deviation) of the pooled values from each silo's count, sum and sum of squares."""
    count = total = squares = 0.0
    for part in parts:
        count, total, squares = count + part.count, total + part.total, squares + part.squares
    if count < 2:
        raise InvalidInputError("standardising needs at least two values")
    mean = total / count
    variance = max(squares / count - mean**2, 0.0)
    return mean, math.sqrt(variance) or 1.0
