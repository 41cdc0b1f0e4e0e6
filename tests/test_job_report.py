"""`fedmeki job report` on a real job: each silo's results of each round as the coordinator recorded them, the
per-round table, its CSV and JSON exports and the learning-curve plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import address, coordinator_settings
from in_process import in_process_agents, run_job
from PIL import Image
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import Silo, Update
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.app.report_plot import plot_curves
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.pooling import reliability_bins
from fedmeki_core.records import JobState, JobStatus, RoundKind, RoundState, RoundSummary, SiloResult
from fedmeki_core.round_report import ALL, round_rows
from fedmeki_core.tasks.confidence import wilson_interval

SILOS = ("silo-0", "silo-1", "silo-2")
Recorded = dict[tuple[int, str], tuple[int, dict[str, float]]]  # (round, silo) -> (samples, metrics)
Finished = tuple[JobStatus, Recorded, str]  # the job, its stored updates, the coordinator's address


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """A synthetic-vitals job of 2 rounds on 3 silos, the updates its coordinator stored, its address."""
    root = tmp_path_factory.mktemp("report")
    coordinator = Coordinator(coordinator_settings(root / "coordinator"))
    coordinator.start()
    try:
        agents = in_process_agents(coordinator, root, "synthetic-vitals", 90)
        spec = {"name": "curves", "task": "synthetic-vitals", "rounds": 2, "min_silos": 3}
        status = run_job(coordinator, agents, parse_job_spec(spec))
        with coordinator.database.read() as session:
            rows = session.execute(
                select(Update.round_number, Silo.name, Update.num_samples, Update.metrics)
                .join(Silo, Silo.id == Update.silo_id)
                .where(Update.job_id == status.id)
            ).all()
        yield status, {(row[0], row[1]): (row[2], dict(row[3])) for row in rows}, address(coordinator)
    finally:
        coordinator.stop(grace=0)


def test_the_status_carries_each_silos_results(finished: Finished) -> None:
    status, recorded, _ = finished
    assert status.state == JobState.COMPLETED, status.reason
    assert len(status.rounds) == 3  # 2 training rounds, then the final evaluation
    for summary in status.rounds:
        assert tuple(r.silo for r in summary.silo_results) == SILOS == summary.reported_silos
        for result in summary.silo_results:
            assert (result.num_samples, result.metrics) == recorded[(summary.number, result.silo)]
            assert "eval_accuracy" in result.metrics


def _report(status: JobStatus, coordinator_address: str, *options: str) -> int:
    return fedmeki_main(["job", "report", status.id, "--coordinator", coordinator_address, *options])


def _expected(status: JobStatus, recorded: Recorded) -> dict[tuple[int, str], float]:
    """(round, silo or "all") -> eval_accuracy, from the updates the coordinator stored and its round summaries."""
    expected = {(number, silo): metrics["eval_accuracy"] for (number, silo), (_, metrics) in recorded.items()}
    expected.update({(r.number, "all"): r.metrics["eval_accuracy"] for r in status.rounds})
    return expected


def test_the_rows_hold_every_round_and_silo(finished: Finished) -> None:
    status, recorded, _ = finished
    rows = round_rows(status)
    assert [(row.round, row.silo) for row in rows] == [(n, s) for n in (1, 2, 3) for s in ("all", *SILOS)]
    assert {row.task for row in rows} == {"synthetic-vitals"}
    assert [row.kind for row in rows[::4]] == ["train", "train", "evaluate"]
    assert [row.checkpoint for row in rows[::4]] == [0, 1, 2]
    assert {(row.round, row.silo): row.value for row in rows} == _expected(status, recorded)
    for row in rows:
        if row.silo != "all":
            samples, metrics = recorded[(row.round, row.silo)]
            assert (row.samples, row.metrics) == (samples, metrics)
    assert [row.samples for row in rows if row.silo == "all"] == [
        sum(recorded[(n, s)][0] for s in SILOS) for n in (1, 2, 3)
    ]


def test_csv_and_json_exports(finished: Finished, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, recorded, coordinator_address = finished
    assert _report(status, coordinator_address, "--format", "csv", "--output", str(tmp_path / "r.csv")) == 0
    written = f"(csv, {len(round_rows(status))} rows) written to {tmp_path / 'r.csv'}\n"
    assert capsys.readouterr().out == f"report of job {status.id} {written}"
    lines = list(csv.DictReader((tmp_path / "r.csv").read_text().splitlines()))
    assert {(int(r["round"]), r["silo"]): float(r["value"]) for r in lines} == _expected(status, recorded)
    assert all(float(r["eval_accuracy"]) == float(r["value"]) and r["metric"] == "accuracy" for r in lines)
    assert {float(r["train_loss"]) for r in lines if r["kind"] == "train"}  # every metric has its column

    assert _report(status, coordinator_address, "--format", "json", "--output", str(tmp_path / "r.json")) == 0
    document = json.loads((tmp_path / "r.json").read_text())
    assert (document["job"], document["state"]) == (status.id, "completed")
    assert {(r["round"], r["silo"]): r["value"] for r in document["rows"]} == _expected(status, recorded)
    for r in document["rows"]:
        if r["silo"] != "all":
            assert (r["samples"], r["metrics"]) == recorded[(r["round"], r["silo"])]


def test_the_table_and_the_plot(finished: Finished, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, recorded, coordinator_address = finished
    assert _report(status, coordinator_address) == 0
    table = capsys.readouterr().out
    assert "federated r0 -> last" in table  # the per-task summary stays on top
    assert "samples: what the silos trained on in a train round" in table
    round_lines = [line for line in table.splitlines() if line[:5].strip().isdigit()]
    assert not any("silo-0" in line for line in round_lines)  # the aggregate only (AUC per silo stays on top)
    assert f"{status.rounds[-1].metrics['eval_accuracy']:.4f}" in table
    plot = tmp_path / "curves.png"
    assert _report(status, coordinator_address, "--per-silo", "--plot", str(plot)) == 0
    table = capsys.readouterr().out
    assert table.endswith(f"learning curves of job {status.id} written to {plot}\n")
    for silo in SILOS:
        assert f"{recorded[(3, silo)][1]['eval_accuracy']:.4f}" in table and silo in table
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and plot.stat().st_size > 10_000
    with Image.open(plot) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_each_figure_shows_its_held_out_count_and_interval(
    finished: Finished, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every silo row carries the held-out count its figure was computed on and its Wilson interval; the "all" row
    pools the silos' successes and counts; the CSV, the table and the per-task summary show them."""
    status, recorded, coordinator_address = finished
    held_out = {silo: recorded[(3, silo)][0] for silo in SILOS}  # the final evaluation reports held-out counts
    rows = round_rows(status)
    for row in rows:
        if row.silo != ALL:
            assert row.held_out == held_out[row.silo]  # training rounds too: `samples` there counts training rows
            successes = round(row.metrics["eval_accuracy"] * held_out[row.silo])
            assert (row.ci_low, row.ci_high) == wilson_interval(successes, held_out[row.silo])
            assert row.metrics["eval_auc.lo"] <= row.metrics["eval_auc"] <= row.metrics["eval_auc.hi"]
            continue
        silos = [r for r in rows if r.round == row.round and r.silo != ALL]
        successes = sum(round(r.metrics["eval_accuracy"] * held_out[r.silo]) for r in silos)
        assert (row.held_out, row.value) == (sum(held_out.values()), successes / sum(held_out.values()))
        assert (row.ci_low, row.ci_high) == wilson_interval(successes, sum(held_out.values()))
        assert row.held_out != row.samples or row.kind == "evaluate"
        assert "eval_auc" not in row.metrics  # AUC is shown per silo only
    final = rows[-4]
    assert final.kind == "evaluate" and sum(n for _, n, _, _ in reliability_bins(final.metrics)) == final.held_out

    assert _report(status, coordinator_address, "--format", "csv", "--output", str(tmp_path / "r.csv")) == 0
    lines = list(csv.DictReader((tmp_path / "r.csv").read_text().splitlines()))
    assert [(int(r["held_out"]), float(r["ci_low"]), float(r["ci_high"])) for r in lines] == [
        (row.held_out, row.ci_low, row.ci_high) for row in rows
    ]
    assert _report(status, coordinator_address, "--per-silo") == 0
    table = capsys.readouterr().out
    assert "held-out" in table and "95% interval" in table
    assert f"{final.held_out:>8} [{final.ci_low:.3f}, {final.ci_high:.3f}]" in table
    assert (
        f"n={final.held_out} [{final.ci_low:.3f}, {final.ci_high:.3f}]" in table
    )  # the per-task summary's last figure
    assert "reliability of the final model on synthetic-vitals" in table
    sensitivity = (final.metrics[f"eval_sensitivity{s}"] for s in ("", ".n", ".lo", ".hi"))
    assert "sensitivity {:.3f} n={:.0f} [{:.3f}, {:.3f}]".format(*sensitivity) in table
    for silo in SILOS:
        auc = (recorded[(3, silo)][1][f"eval_auc{s}"] for s in ("", ".n", ".lo", ".hi"))
        assert "{} {:.3f} n={:.0f} [{:.3f}, {:.3f}]".format(silo, *auc) in table  # AUC per silo


def test_a_suites_rows_split_by_task_with_the_injected_model(tmp_path: Path) -> None:
    """Of a suite, each task's row holds its own `<task>.` metrics; a silo without a task has no row for it."""
    spec = parse_job_spec(
        {"name": "s", "task": "fedmeki", "rounds": 1, "model": {"architecture": "fedmeki-encoders-tiny"}}
        | {"injection": {"epochs": 1}}
    )
    now = datetime.now(UTC)
    train = RoundSummary(
        1,
        RoundKind.TRAIN,
        RoundState.COMMITTED,
        metrics={"mortality.eval_accuracy": 0.6, "sepsis.eval_accuracy": 0.7, "eval_accuracy": 0.65},
        silo_results=(
            SiloResult("a", 10, {"mortality.eval_accuracy": 0.5, "sepsis.eval_accuracy": 0.7}),
            SiloResult("b", 30, {"mortality.eval_accuracy": 0.633, "mortality.train_loss": 0.4}),
        ),
    )
    injection = RoundSummary(
        0, RoundKind.INJECT, RoundState.COMMITTED, ("injector",), ("injector",), {"sepsis.accuracy": 0.8}
    )
    status = JobStatus("j", spec, JobState.RUNNING, "", 1, (train,), now, now, None, (injection,))
    rows = [(r.round, r.kind, r.checkpoint, r.task, r.silo, r.samples, r.value) for r in round_rows(status)]
    assert rows == [
        (0, "inject", 0, "sepsis", "injector", None, 0.8),
        (1, "train", 0, "mortality", "all", 40, 0.6),
        (1, "train", 0, "mortality", "a", 10, 0.5),
        (1, "train", 0, "mortality", "b", 30, 0.633),
        (1, "train", 0, "sepsis", "all", 40, 0.7),
        (1, "train", 0, "sepsis", "a", 10, 0.7),
    ]
    assert round_rows(status)[3].metrics == {"eval_accuracy": 0.633, "train_loss": 0.4}
    plot_curves(round_rows(status), tmp_path / "suite.png", "suite")
    assert (tmp_path / "suite.png").stat().st_size > 10_000
