"""A hospital's own table: the schema's rules at import, and a real clinical table federated across 3 silos."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from in_process import in_process_agents, run_job
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from coordinator.server import Coordinator
from fedmeki_core.app.cli import build_parser
from fedmeki_core.client import FedmekiClient
from fedmeki_core.commands import run_command
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_model, exchanged_tensors
from fedmeki_core.records import CheckpointInfo, JobState, RoundKind, RoundTask
from fedmeki_core.tasks.catalog import TASKS
from fedmeki_core.tasks.dataset import load_dataset
from fedmeki_core.tasks.formats import import_dataset
from fedmeki_core.tasks.formats.tabular import column_moments, combine_moments, import_table, read_schema
from fedmeki_core.wire import TensorSpec
from silo_agent.settings import SiloSettings
from silo_agent.trainer import LocalTrainer

_SCHEMA: dict[str, Any] = {
    "features": [
        {"name": "age", "type": "numeric", "missing": "mean"},
        {"name": "bmi", "type": "numeric", "missing": "drop-row"},
        {"name": "lactate", "type": "numeric", "missing": "constant", "value": 1.0, "mean": 2.0, "std": 0.5},
        {"name": "sex", "type": "categorical", "levels": ["F", "M"], "missing": "constant", "value": "F"},
        {"name": "ward", "type": "categorical", "levels": ["icu", "general"], "unseen": "drop-row"},
    ],
    "label": {"column": "died", "kind": "binary", "levels": ["no", "yes"]},
}
_ROWS = [
    ("patient_id", "age", "bmi", "lactate", "sex", "ward", "died"),
    ("P-0001", "70", "25", "3.0", "M", "icu", "yes"),
    ("P-0002", "", "30", "", "F", "general", "no"),  # age: the mean of the ages present (70, 40, 40, 50)
    ("P-0003", "40", "", "2.0", "M", "icu", "no"),  # bmi missing: dropped
    ("P-0004", "40", "20", "2.5", "NA", "general", "yes"),  # sex missing: F
    ("P-0005", "50", "22", "2.0", "F", "recovery", "no"),  # an unseen ward: dropped
]


def _write(tmp_path: Path, rows: list[tuple[str, ...]], schema: dict[str, Any]) -> tuple[Path, Path]:
    table, schema_file = tmp_path / "table.csv", tmp_path / "schema.yaml"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    schema_file.write_text(yaml.safe_dump(schema))
    return table, schema_file


def test_the_schema_rules_encode_fill_and_drop_rows_as_declared(tmp_path: Path) -> None:
    table, schema = _write(tmp_path, _ROWS, _SCHEMA)
    result = import_table(table, read_schema(schema))
    np.testing.assert_allclose(
        result.dataset.features,
        [
            [70, 25, 2.0, 0, 1, 1, 0],  # lactate (3.0 - 2.0) / 0.5; sex M; ward icu
            [50, 30, -2.0, 1, 0, 0, 1],
            [40, 20, 1.0, 1, 0, 0, 1],
        ],
    )
    assert result.dataset.labels.tolist() == [1, 0, 1]
    assert result.dropped == {"missing bmi": 1, "unseen ward": 1}
    assert result.filled == {"age": 1, "lactate": 1, "sex": 1}
    assert result.notes() == (
        "7 encoded features",
        "1 rows dropped (missing bmi)",
        "1 rows dropped (unseen ward)",
        "1 values of age filled",
        "1 values of lactate filled",
        "1 values of sex filled",
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s, r: s["features"][1].update(missing="refuse"), "data row 3: 'bmi' is missing (missing: refuse)"),
        (lambda s, r: s["features"][4].update(unseen="refuse"), "data row 5: 'ward' has the level 'recovery'"),
        (lambda s, r: r.__setitem__(1, (*r[1][:6], "maybe")), "data row 1: label 'maybe' is not one of"),
        (lambda s, r: r.__setitem__(1, (r[1][0], "old", *r[1][2:])), "data row 1: 'age' is 'old', not a number"),
        (lambda s, r: s["features"].append({"name": "sofa", "type": "numeric"}), "no column 'sofa'"),
        (lambda s, r: s["features"][2].pop("std"), "give both mean and std"),
        (lambda s, r: s["label"].update(kind="survival"), "label.kind: Input should be 'binary'"),
        (lambda s, r: s["features"][3].update(value="X"), "needs a value among the levels"),
        (lambda s, r: s["features"].append({"name": "died", "type": "numeric"}), "a column is named twice"),
    ],
)
def test_what_the_schema_does_not_allow_is_refused_with_the_row(tmp_path: Path, change: Any, expected: str) -> None:
    schema = yaml.safe_load(yaml.safe_dump(_SCHEMA))
    rows = list(_ROWS)
    change(schema, rows)
    table, schema_file = _write(tmp_path, rows, schema)
    with pytest.raises(InvalidInputError) as info:
        import_table(table, read_schema(schema_file))
    assert expected in info.value.message


def test_the_import_command_writes_only_the_declared_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table, schema = _write(tmp_path, _ROWS, _SCHEMA)
    out, report = tmp_path / "icu.safetensors", tmp_path / "report.csv"
    argv = ["data", "import", "--task", "tabular", "--schema", str(schema), "--source", str(table)]
    assert run_command(build_parser(), [*argv, "--out", str(out), "--report", str(report)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("imported 3 samples of shape [7], 2 positive / 1 negative") and "1 rows dropped" in line
    assert load_dataset(out, TASKS["tabular"]).features.shape == (3, 7)
    assert load_dataset(out, TASKS["tabular"], 7).labels.tolist() == [1, 0, 1]
    assert b"P-000" not in out.read_bytes() + report.read_bytes()  # the ID column is never read
    assert run_command(build_parser(), [*argv[:4], "--source", str(table), "--out", str(out)]) == 2
    assert "need one (--schema)" in capsys.readouterr().err
    strict = yaml.safe_load(yaml.safe_dump(_SCHEMA))
    strict["features"][1]["missing"] = "refuse"
    schema.write_text(yaml.safe_dump(strict))
    assert run_command(build_parser(), [*argv, "--out", str(tmp_path / "no.safetensors"), "--report", str(report)]) == 2
    assert "data row 3: 'bmi' is missing (missing: refuse)" in capsys.readouterr().err
    (row,) = csv.DictReader(report.read_text().splitlines())
    assert (row["source"], row["status"]) == ("table", "refused") and row["reason"].startswith("<source>: data row 3")
    assert not (tmp_path / "no.safetensors").exists()
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(InvalidInputError, match="Parquet is not read"):
        import_dataset(TASKS["tabular"], tmp_path / "t.parquet", out, schema=schema)


# A real clinical table federated -----------------------------------------------------------------------------------


def _breast_cancer_silos(tmp_path: Path) -> tuple[list[Path], Path, list[str]]:
    """scikit-learn's bundled Wisconsin breast cancer table (569 patients, 30 features) as CSVs: a stratified 25%
    held out, the rest split across 3 silos with label skew (shares of the malignant cases 60/30/10%, of the
    benign 15/35/50%). Returns the silo tables, the held-out table and the feature names."""
    data = load_breast_cancer()
    names = [str(n) for n in data.feature_names]
    diagnosis = np.where(data.target == 0, "malignant", "benign")
    rng = np.random.default_rng(7)
    held_out, silos = [], [[], [], []]
    for label, shares in (("malignant", (0.6, 0.3, 0.1)), ("benign", (0.15, 0.35, 0.5))):
        rows = rng.permutation(np.flatnonzero(diagnosis == label))
        cut = len(rows) // 4
        held_out += rows[:cut].tolist()
        for silo, part in enumerate(
            np.split(rows[cut:], np.cumsum(np.array(shares[:2]) * (len(rows) - cut)).astype(int))
        ):
            silos[silo] += part.tolist()

    def write(path: Path, index: list[int]) -> Path:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["record", *names, "diagnosis"])
            writer.writerows([f"R{i}", *map(repr, data.data[i].tolist()), diagnosis[i]] for i in sorted(index))
        return path

    tables = [write(tmp_path / f"silo-{k}.csv", index) for k, index in enumerate(silos)]
    return tables, write(tmp_path / "held-out.csv", held_out), names


def test_a_clinical_table_federated_across_3_silos_matches_a_centralised_logistic_regression(
    sqlite_coordinator: Coordinator, tmp_path: Path
) -> None:
    tables, held_out_table, names = _breast_cancer_silos(tmp_path)
    # Standardisation: each silo's count, sum and sum of squares per column, combined by hand and written into the
    # shared schema (tests/test_statistics.py runs the same comparison normalised through a statistics job).
    columns = []
    for name in names:
        moments = []
        for table in tables:
            with table.open() as f:
                moments.append(column_moments(float(row[name]) for row in csv.DictReader(f)))
        mean, std = combine_moments(moments)
        columns.append({"name": name, "type": "numeric", "mean": mean, "std": std})
    schema = tmp_path / "schema.yaml"
    label = {"column": "diagnosis", "kind": "binary", "levels": ["benign", "malignant"]}
    schema.write_text(yaml.safe_dump({"features": columns, "label": label}))
    data_files = []
    for k, table in enumerate(tables):
        out = tmp_path / f"silo-{k}" / "tabular.safetensors"
        argv = ["data", "import", "--task", "tabular", "--schema", str(schema), "--source", str(table)]
        assert run_command(build_parser(), [*argv, "--out", str(out)]) == 0
        data_files.append(out)
    test = import_table(held_out_table, read_schema(schema)).dataset

    agents = in_process_agents(sqlite_coordinator, tmp_path, "tabular", 0, data_files=data_files)
    spec = parse_job_spec(
        {
            "name": "breast-cancer-fedavg",
            "task": "tabular",
            "rounds": 20,
            "min_silos": 3,
            "model": {"architecture": "tabular-logistic", "config": {"num_features": len(names)}},
            "algorithm": {"local_epochs": 2, "batch_size": 16, "learning_rate": 0.1},
        }
    )
    status = run_job(sqlite_coordinator, agents, spec)
    assert status.state == JobState.COMPLETED, status.reason
    with FedmekiClient(f"127.0.0.1:{sqlite_coordinator.port}") as client:
        client.download_checkpoint(status.id, tmp_path / "final.safetensors")
    model = build_model(spec.model, "tabular")
    model.load_state_dict(load_file(str(tmp_path / "final.safetensors")), strict=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(test.features)).numpy()
    federated_probability = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    federated = ((logits.argmax(axis=1) == test.labels).mean(), roc_auc_score(test.labels, federated_probability))

    # The rows the silos trained on: each table less the 20% its agent holds out to evaluate.
    splits = [load_dataset(path, TASKS["tabular"]).split(0.2, seed=0)[0] for path in data_files]
    pooled = LogisticRegression(max_iter=5000).fit(
        np.concatenate([s.features for s in splits]), np.concatenate([s.labels for s in splits])
    )
    centralised = (
        pooled.score(test.features, test.labels),
        roc_auc_score(test.labels, pooled.predict_proba(test.features)[:, 1]),
    )
    alone = [
        LogisticRegression(max_iter=5000).fit(s.features, s.labels).score(test.features, test.labels) for s in splits
    ]
    print(
        f"held-out {len(test)}: federated accuracy {federated[0]:.4f} AUC {federated[1]:.4f}; centralised accuracy "
        f"{centralised[0]:.4f} AUC {centralised[1]:.4f}; each silo alone accuracy "
        + ", ".join(f"{a:.4f}" for a in alone)
        + f" (silo rows {[len(s) for s in splits]}, malignant {[int(s.labels.sum()) for s in splits]})"
    )
    assert federated[0] >= centralised[0] - 0.03 and federated[1] >= centralised[1] - 0.02


def test_the_table_models_and_what_a_job_on_a_table_may_name() -> None:
    mlp = build_model(
        parse_job_spec(
            {
                "name": "m",
                "rounds": 1,
                "task": "tabular",
                "model": {"architecture": "tabular-mlp", "config": {"num_features": 7, "num_layers": 2}},
            }
        ).model,
        "tabular",
    )
    shapes = [tuple(p.shape) for p in mlp.parameters()]
    assert shapes == [(32, 7), (32,), (32, 32), (32,), (2, 32), (2,)]
    assert mlp(torch.zeros(5, 7)).shape == (5, 2)
    with pytest.raises(InvalidJobSpecError, match="tiny-transformer cannot take table"):
        parse_job_spec({"name": "t", "task": "tabular", "rounds": 1})


def _wine_silos(tmp_path: Path) -> tuple[list[Path], Path, Path]:
    """scikit-learn's bundled wine table (178 wines, 13 features, 3 cultivars) as 3 silo CSVs with class skew
    (each silo holds most of one cultivar) and a stratified held-out third, and its multiclass schema."""
    data = load_wine()
    names = [str(n) for n in data.feature_names]
    cultivar = np.array(["barolo", "grignolino", "barbera"])[data.target]
    rng = np.random.default_rng(3)
    held_out, silos = [], [[], [], []]
    for label in range(3):
        rows = rng.permutation(np.flatnonzero(data.target == label))
        cut = len(rows) // 3
        held_out += rows[:cut].tolist()
        rest = rows[cut:]
        major = len(rest) * 2 // 3  # two thirds to "its" silo, the rest shared by the other two
        silos[label] += rest[:major].tolist()
        for other, part in zip([k for k in range(3) if k != label], np.array_split(rest[major:], 2), strict=True):
            silos[other] += part.tolist()

    def write(path: Path, index: list[int]) -> Path:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*names, "cultivar"])
            writer.writerows([*map(repr, data.data[i].tolist()), cultivar[i]] for i in sorted(index))
        return path

    tables = [write(tmp_path / f"wine-{k}.csv", index) for k, index in enumerate(silos)]
    columns = []
    for column, name in enumerate(names):
        moments = [column_moments(data.data[index, column]) for index in silos]
        mean, std = combine_moments(moments)
        columns.append({"name": name, "type": "numeric", "mean": mean, "std": std})
    label = {"column": "cultivar", "kind": "multiclass", "levels": ["barolo", "grignolino", "barbera"]}
    schema = tmp_path / "wine.yaml"
    schema.write_text(yaml.safe_dump({"features": columns, "label": label}))
    return tables, write(tmp_path / "wine-held-out.csv", held_out), schema


def test_a_multiclass_table_federates_and_its_model_must_have_a_class_for_every_label(
    sqlite_coordinator: Coordinator, tmp_path: Path
) -> None:
    tables, held_out_table, schema = _wine_silos(tmp_path)
    data_files = []
    for k, table in enumerate(tables):
        data_files.append(tmp_path / f"silo-{k}" / "wine.safetensors")
        import_dataset(TASKS["tabular-multiclass"], table, data_files[-1], schema=schema)
    with pytest.raises(InvalidInputError, match="a multiclass label, task tabular takes binary ones"):
        import_dataset(TASKS["tabular"], tables[0], tmp_path / "no.safetensors", schema=schema)
    test = import_table(held_out_table, read_schema(schema)).dataset

    def job(classes: int) -> dict[str, Any]:
        model = {"architecture": "tabular-mlp", "config": {"num_features": 13, "num_classes": classes}}
        algorithm = {"local_epochs": 2, "batch_size": 16, "learning_rate": 0.05}
        return {"name": "wine", "task": "tabular-multiclass", "rounds": 10, "min_silos": 3, "model": model,
                "algorithm": algorithm}  # fmt: skip

    with pytest.raises(InvalidJobSpecError, match="task tabular takes 2 to 2 classes, not 3"):
        build_model(parse_job_spec({**job(3), "task": "tabular"}).model, "tabular")
    two = parse_job_spec(job(2))  # a model with fewer classes than the table's levels: the silo says so
    trainer = LocalTrainer.from_settings(
        SiloSettings(
            coordinator="127.0.0.1:1", work_dir=tmp_path, device="cpu", data={"tabular-multiclass": data_files[0]}
        )
    )
    tensors = exchanged_tensors(build_model(two.model, two.task))
    save_file(tensors, str(tmp_path / "two.safetensors"))
    info = CheckpointInfo("j", 0, 1, "0" * 64)
    manifest = [TensorSpec(name, "F32", tuple(t.shape)) for name, t in sorted(tensors.items())]
    with pytest.raises(InvalidInputError, match="labels reach class 2, the job's model has 2 classes"):
        trainer.evaluate(RoundTask("j", 1, RoundKind.EVALUATE, two, info, manifest, 60), tmp_path / "two.safetensors")

    agents = in_process_agents(sqlite_coordinator, tmp_path, "tabular-multiclass", 0, data_files=data_files)
    spec = parse_job_spec(job(3))
    status = run_job(sqlite_coordinator, agents, spec)
    assert status.state == JobState.COMPLETED, status.reason
    with FedmekiClient(f"127.0.0.1:{sqlite_coordinator.port}") as client:
        client.download_checkpoint(status.id, tmp_path / "final.safetensors")
    model = build_model(spec.model, spec.task)
    model.load_state_dict(load_file(str(tmp_path / "final.safetensors")))
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(test.features)).argmax(dim=1).numpy() == test.labels).mean())
    splits = [load_dataset(path, TASKS["tabular-multiclass"]).split(0.2, seed=0)[0] for path in data_files]
    pooled = LogisticRegression(max_iter=5000).fit(
        np.concatenate([s.features for s in splits]), np.concatenate([s.labels for s in splits])
    )
    centralised = pooled.score(test.features, test.labels)
    print(f"wine, held-out {len(test)}: federated MLP {accuracy:.4f}, centralised logistic {centralised:.4f}")
    assert accuracy >= 0.9
