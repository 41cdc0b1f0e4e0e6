"""`fedmeki demo`, the README's first command, in both workloads: real processes on loopback, to the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmeki_core.app.cli import main as fedmeki_main


def test_the_vitals_demo_runs_to_a_better_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fedmeki_main(["demo", "--data-dir", str(tmp_path / "demo"), "--rounds", "2", "--silos", "2"]) == 0
    out = capsys.readouterr().out
    assert "the final global model is better than round 0" in out
    assert (tmp_path / "demo" / "final-model.safetensors").is_file()


def test_the_fedmeki_demo_prints_the_per_task_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "demo"
    assert fedmeki_main(["demo", "--workload", "fedmeki", "--data-dir", str(data_dir), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for task in ("lung-opacity", "covid-19", "ecg-abnormal", "mortality", "sepsis", "medvqa", "ecg-noise"):
        assert task in out.split("federated r0 -> last")[1]
    assert "(injected: checkpoints 0 and 1;" in out
    assert (data_dir / "silos" / "injector" / "injector").is_dir()  # the injector kept its adapters


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        pytest.param("ckks", "the coordinator holds only keys/public.ckks", id="ckks"),
        pytest.param(
            "cyclic", "which holds only keys/public.ckks and relays ciphertexts", id="cyclic", marks=pytest.mark.slow
        ),
    ],
)
def test_the_demo_runs_under_ckks_secure_aggregation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, says: str
) -> None:
    data_dir = tmp_path / "demo"
    arguments = ["demo", "--data-dir", str(data_dir), "--rounds", "1", "--secure-aggregation", mode]
    assert fedmeki_main(arguments) == 0
    out = capsys.readouterr().out
    assert "secure aggregation: CKKS" in out and says in out
    assert "the final global model is better than round 0" in out
    (job_dir,) = (data_dir / "coordinator" / "checkpoints").iterdir()
    assert sorted(p.name for p in job_dir.iterdir()) == ["public.ckks", "round-00000.safetensors", "round-00001.ckks"]
    assert (data_dir / "final-model.safetensors").is_file()  # rebuilt with keys/secret.ckks, as a hospital would
