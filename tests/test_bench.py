"""`fedmeki bench round` runs end to end and reports its figures (no timing is asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from bench_cli import bench_figures, bench_output

ROOT = Path(__file__).resolve().parent.parent


def test_round_benchmark_reports_the_figures_and_its_bound() -> None:
    stdout = bench_output("round", "--params", "0.05M", "--silos", "2", "--rounds", "2", "--tensors", "4", timeout=240)
    figures = json.loads(stdout.strip().splitlines()[-1])
    assert {
        "round_s",
        "grpc_bound_s",
        "ratio",
        "model_bytes",
        "coordinator_peak_rss_above_idle_bytes",
    } <= figures.keys()
    assert figures["model_bytes"] > 50_000 * 4
    assert figures["round_s"] > 0 and figures["grpc_bound_s"] > 0
    assert abs(figures["ratio"] - figures["round_s"] / figures["grpc_bound_s"]) < 1e-9
    assert "x the raw-gRPC bound" in stdout
    # round 2's CPU (the coordinator and both silos spend some) over the cores, against the same bound
    cpu = figures["cpu_s_per_round"]
    assert cpu["coordinator"] > 0 and cpu["silos"] > 0
    assert figures["cpu_floor_s"] == pytest.approx((cpu["coordinator"] + cpu["silos"]) / len(os.sched_getaffinity(0)))
    assert abs(figures["cpu_floor_ratio"] - figures["cpu_floor_s"] / figures["grpc_bound_s"]) < 1e-9


def test_sweep_writes_its_table_csv_and_plot(tmp_path: Path) -> None:
    arguments = ["--params-list", "0.02M", "--size-sweep-silos", "1", "--silos-list", "2", "--silo-sweep-params"]
    arguments += ["0.02M", "--rounds", "2", "--tensors", "2", "--out", str(tmp_path)]
    bench_output("sweep", *arguments, timeout=240)
    table = (tmp_path / "round-sweep.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| 0.02M | 1 |") and table[3].startswith("| 0.02M | 2 |")
    assert (tmp_path / "round-sweep.csv").read_text().startswith("params,silos,model_bytes,round_s")
    assert (tmp_path / "round-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(660)  # minutes on a loaded 2-core machine: the bench's own limit ends it first
def test_fedmeki_grid_writes_its_table_csv_and_curves(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    arguments = ["--quick", "--algorithms", "ditto", "--baselines", "centralised", "--partitions", "dirichlet"]
    arguments += ["--single-task", "ditto", "--round-deadline", "600"]  # a busy machine is no failure here
    arguments += ["--rounds", "1"]
    bench_output("fedmeki", *arguments, "--samples", "200", "--out", str(out), timeout=600)
    table = (out / "fedmeki-grid.md").read_text()
    models = ("federated", "injected", "single-task / federated", "single-task / injected")
    for row in ("centralised / dirichlet (baseline)", *(f"ditto / dirichlet / {m}" for m in models)):
        assert f"| {row} |" in table
    personalised = next(line for line in table.splitlines() if line.startswith("| ditto / dirichlet / personalised"))
    assert personalised.count(" - ") == 4  # the 4 training tasks have scores, the zero-shot ones none
    rows = (out / "fedmeki-grid.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == [
        "lung-opacity",
        "covid-19",
        "ecg-abnormal",
        "mortality",
        "sepsis",
        "enlarged-cardiomediastinum",
        "medvqa",
        "ecg-noise",
    ]
    assert len(rows) == 7
    assert (out / "fedmeki-grid.png").stat().st_size > 0


def test_he_cost_reports_time_bytes_and_error() -> None:
    stdout = bench_output("he", "--params-list", "0.01M,demo", "--silos", "3", timeout=240)
    small, demo = json.loads(stdout.strip().splitlines()[-1])
    assert small["params"] == 10_000 and demo["label"] == "demo" and demo["params"] > 0
    for row in (small, demo):
        assert row["encrypt_s_per_silo"] > 0 and row["aggregate_s"] > 0 and row["decrypt_s"] > 0
        assert row["expansion"] == row["upload_bytes"] / row["plaintext_bytes"] > 4
        assert row["max_abs_error"] < 1e-6
        # the ring: K+1 hops up and K down besides the aggregate's K downloads, the same sum as the star's
        assert (row["star_transfers"], row["ring_transfers"], row["ring_sequential_transfers"]) == (6, 10, 7)
        assert row["ring_wire_bytes"] > row["star_wire_bytes"] and row["ring_wall_s"] > 0
        assert row["ring_silo_cpu_s"] >= row["star_silo_cpu_s"] - row["decrypt_s"] and row["ring_max_abs_error"] < 1e-6


def test_chunk_benchmark_runs_each_size_forward_then_backward() -> None:
    # One silo: the order of the sizes is what this test adds to the round benchmark's (which runs two).
    arguments = ["--params", "0.05M", "--silos", "1", "--tensors", "4", "--rounds", "2", "--chunks", "64K,256K"]
    runs = bench_figures("chunks", *arguments, timeout=300)
    assert [run["chunk_bytes"] for run in runs] == [64 << 10, 256 << 10, 256 << 10, 64 << 10]
    assert all(float(run["round_s"]) > 0 and float(run["grpc_bound_s"]) > 0 for run in runs)


@pytest.mark.slow  # installs flwr into .venv-flower on first use (a package index is needed)
def test_flower_runs_the_same_model_through_its_deployment_runtime() -> None:
    (result,) = bench_figures("flower", "--params", "0.01M", "--tensors", "4", "--rounds", "2", timeout=900)
    assert result["flower"] == "flwr==1.41.0" and result["params"] == 10_000
    assert len(result["round_times_s"]) == 2
    assert float(result["round_s"]) > 0 and int(result["serverapp_peak_rss_bytes"]) > 0


@pytest.mark.timeout(660)
def test_wan_benchmark_runs_each_silo_through_its_link(tmp_path: Path) -> None:
    arguments = ["--profiles", "40ms-200M,shared-40ms-200M", "--params", "0.05M", "--tensors", "4", "--rounds", "2"]
    arguments += ["--silos", "2", "--shared-silos", "2", "--windows", "both", "--out", str(tmp_path)]
    rows = bench_figures("wan", *arguments, timeout=600)
    assert [(row["profile"], row["windows"], row["silos"]) for row in rows] == [
        ("40ms-200M", "before", 2),
        ("40ms-200M", "after", 2),
        ("shared-40ms-200M", "before", 2),
        ("shared-40ms-200M", "after", 2),
    ]
    for row in rows:
        model = int(str(row["model_bytes"]))
        assert float(row["round_s"]) > 0 and float(row["link_bound_s"]) >= 3 * 0.04
        assert row["ratio"] == float(row["round_s"]) / float(row["link_bound_s"])
        assert 0 < float(row["share_min"]) <= float(row["share_max"])
        carried = row["carried"]
        assert isinstance(carried, list) and len(carried) == row["silos"]
        for link in carried:  # every silo's bytes crossed its own link: 2 deltas up, 2 models + the evaluated one down
            assert link["up"] > 2 * model and link["down"] > 3 * model
    assert (tmp_path / "wan.csv").read_text().splitlines()[0].startswith("profile,windows,params,silos")
    assert len((tmp_path / "wan.csv").read_text().splitlines()) == 5
    assert (tmp_path / "wan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(660)
def test_wan_benchmark_with_int8_moves_deltas_both_ways(tmp_path: Path) -> None:
    arguments = ["--profiles", "40ms-200M", "--params", "0.05M", "--silos", "1", "--tensors", "4", "--rounds", "2"]
    rows = bench_figures("wan", *arguments, "--encodings", "float32,int8", "--out", str(tmp_path), timeout=600)
    assert [row["encoding"] for row in rows] == ["float32", "int8"]
    plain, int8 = ({key: sum(link[key] for link in row["carried"]) for key in ("up", "down")} for row in rows)
    assert all(row["ratio"] == float(row["round_s"]) / float(row["link_bound_s"]) for row in rows)
    assert rows[0]["link_bound_s"] == rows[1]["link_bound_s"]  # int8 is measured against float32's bound
    # Bytes, not time: 2 int8 deltas up instead of 2 float32 ones (a quarter), and the first model down whole, then
    # the second and the evaluated one as int8 deltas (1 + 2 x 0.26 models instead of 3).
    assert int8["up"] < 0.3 * plain["up"]
    assert int8["down"] < 0.6 * plain["down"]


def test_encoding_bytes_reports_each_encodings_upload_against_float32(tmp_path: Path) -> None:
    from benchmarks.encoding_bytes import measure, model_manifest
    from fedmeki_core.encodings import DeltaEncoding

    manifest = model_manifest(100_000)
    assert sum(int(np.prod(spec.shape)) for spec in manifest) == 100_000
    sizes = {e.name: measure(manifest, e, tmp_path, seed=0) for e in [DeltaEncoding("float32"), DeltaEncoding("int8")]}
    topk = measure(manifest, DeltaEncoding("topk", topk_fraction=0.01), tmp_path, seed=0)
    assert sizes["float32"]["error"] == 0 and 0 < sizes["int8"]["error"] < 0.01
    assert 0.25 < sizes["int8"]["bytes"] / sizes["float32"]["bytes"] < 0.27  # 1 byte + 4 per 128 values, of 4
    assert topk["bytes"] / sizes["float32"]["bytes"] < 0.03  # 8 bytes per kept entry, of 400 per 100 values
