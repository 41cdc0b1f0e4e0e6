"""`fedmeki bench scale` runs its machinery end to end, tiny, and writes every figure (no timing is asserted)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from bench_cli import bench_output

from benchmarks.round import write_model
from benchmarks.scale_report import COLUMNS
from benchmarks.upload_cpu import fold_ms, validate_ms

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(460)
def test_scale_benchmark_writes_each_point_and_skips_what_cannot_fit(tmp_path: Path) -> None:
    arguments = ["--silos", "3,1000000", "--params", "0.01M", "--rounds", "1", "--tensors", "4", "--processes", "2"]
    arguments += ["--coordinator-setting", "max_concurrent_polls=40", "--trace-memory"]
    stdout = bench_output("scale", *arguments, "--out", str(tmp_path), timeout=400)
    with (tmp_path / "scale.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        ran, skipped = list(reader)
    assert ran["status"] == "ok", ran["status"]
    assert (int(ran["silos"]), int(ran["processes"]), int(ran["rounds"])) == (3, 2, 1)
    model_bytes = int(ran["model_bytes"])
    assert model_bytes > 10_000 * 4
    assert int(ran["bytes_per_round"]) == 2 * 3 * model_bytes
    figures = {key: float(ran[key]) for key in COLUMNS if key not in ("status",)}
    assert figures["round_s"] >= figures["commit_s"] >= 0
    assert figures["grpc_bound_s"] == figures["raw_upload_s"] + figures["raw_download_s"] > 0
    assert abs(figures["ratio"] - figures["round_s"] / figures["grpc_bound_s"]) < 1e-9
    assert figures["threads_peak"] >= figures["threads_idle"] >= 1
    assert figures["fds_peak"] >= figures["fds_idle"] > 0
    # each silo holds its own connection to the coordinator, not one shared by the silos of its process
    assert figures["sockets_per_waiting_silo"] >= 1
    assert figures["rss_idle_mib"] > 0 and figures["cpu_s_per_silo_round"] > 0
    assert figures["silo_cpu_s_per_silo_round"] > 0 and figures["raw_cpu_s_per_silo"] > 0
    cores = len(os.sched_getaffinity(0))
    silo_rounds_per_core = figures["silos"] / cores  # the floor: every party's CPU per round over the cores
    floor = (figures["cpu_s_per_silo_round"] + figures["silo_cpu_s_per_silo_round"]) * silo_rounds_per_core
    assert figures["cpu_floor_s"] == pytest.approx(floor, rel=1e-6)
    assert abs(figures["cpu_floor_ratio"] - figures["cpu_floor_s"] / figures["grpc_bound_s"]) < 1e-9
    assert figures["upload_fairness"] >= 1
    # each round (training and evaluation) writes at least an update or evaluation row per silo
    assert figures["db_rows_per_round"] >= 3
    assert skipped["silos"] == "1000000" and skipped["status"].startswith("skipped: needs about")
    assert skipped["round_s"] == ""
    rows = json.loads((tmp_path / "scale.json").read_text())
    assert rows[0]["db_rows_by_table"]["updates"] == 3 * 2  # one round's updates and the evaluation's reports
    assert (tmp_path / "scale.png").read_bytes().startswith(b"\x89PNG")
    table = (tmp_path / "scale.md").read_text()
    assert table.startswith("| silos | params | round s |") and "| 1000000 | 0.01M | skipped:" in table
    assert table in stdout
    # --trace-memory: where the coordinator's memory above idle went, by source line and by file
    trace = json.loads((tmp_path / "memory-trace-3-10000.json").read_text())
    assert trace["traced_idle_mib"] > 0 and trace["rss_hwm_above_idle_mib"] >= 0
    assert trace["by_lineno"] and trace["by_filename"] and {"where", "mib", "blocks"} <= set(trace["by_lineno"][0])


def test_upload_cpu_validates_and_folds_the_model_it_wrote(tmp_path: Path) -> None:
    model = tmp_path / "update.safetensors"
    write_model(model, 1000, 10)
    assert validate_ms(model, 3, 1024) > 0  # a stream the validator refused would raise
    assert fold_ms(model, 3) > 0
