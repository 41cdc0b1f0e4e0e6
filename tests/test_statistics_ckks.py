"""A statistics job summed under CKKS through a real coordinator and 3 real silo agents: the decrypted global
figures equal the plaintext job's on the same table, the coordinator keeps only ciphertexts, the minimum cell
count holds after decryption, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from in_process import in_process_agents, run_job
from safetensors.numpy import load_file as load_arrays
from test_statistics import _raw_silos

from coordinator.server import Coordinator
from fedmeki_core.app.cli import build_parser
from fedmeki_core.app.statistics_command import statistics_table
from fedmeki_core.client import FedmekiClient
from fedmeki_core.commands import run_command
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError
from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.jobspec_statistics import StatisticsSpec
from fedmeki_core.privacy.he import read_ciphertext_header, read_secret_context, write_key_files
from fedmeki_core.records import JobState
from fedmeki_core.statistics import initial, layout
from fedmeki_core.statistics_ckks import MAX_ROWS, encrypt_release, suppress_small_cells
from fedmeki_core.wire import write_safetensors


def _job(names: list[str], rows: list[np.ndarray[Any, Any]], ckks: bool, **options: Any) -> JobSpec:
    """Both jobs bin on the same declared edges, a unit beyond the pooled extremes (the CKKS job clips to them)."""
    pooled = np.concatenate(rows)
    edges = {name: list(np.linspace(pooled[:, i].min() - 1, pooled[:, i].max() + 1, 9)) for i, name in enumerate(names)}
    statistics = {"features": names, "edges": edges, **options}
    privacy = {"privacy": {"secure_aggregation": "ckks"}} if ckks else {}
    return parse_job_spec({"name": "stats", "task": "tabular", "min_silos": 3, "statistics": statistics, **privacy})


def test_the_decrypted_sums_equal_the_plaintext_job_and_the_coordinator_keeps_only_ciphertexts(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    write_key_files(keys)
    secret = read_secret_context(keys / "secret.ckks")
    files, _, names, rows = _raw_silos(tmp_path)
    settings: dict[str, object] = {"ckks_secret_context": str(keys / "secret.ckks")}
    agents = in_process_agents(sqlite_coordinator, tmp_path, "tabular", 0, data_files=files, settings=settings)
    plain = run_job(sqlite_coordinator, agents, _job(names, rows, ckks=False))
    encrypted = run_job(
        sqlite_coordinator, agents, _job(names, rows, ckks=True), ckks_public_context=keys / "public.ckks"
    )
    assert (plain.state, encrypted.state) == (JobState.COMPLETED, JobState.COMPLETED), encrypted.reason
    with FedmekiClient(f"127.0.0.1:{sqlite_coordinator.port}") as client:
        expected = statistics_table(client, plain.id)
        actual = statistics_table(client, encrypted.id, secret)
        with pytest.raises(InvalidInputError, match="decrypt them with --ckks-secret-context"):
            statistics_table(client, encrypted.id)
        training = {
            "name": "normalised",
            "task": "tabular",
            "rounds": 1,
            "min_silos": 3,
            "model": {"architecture": "tabular-logistic", "config": {"num_features": len(names)}},
        }
        with pytest.raises(InvalidInputError, match="summed its figures under CKKS: the coordinator cannot read"):
            client.submit_job(parse_job_spec({**training, "normalise": {"from_job": encrypted.id}}))
    assert [(r.scope, r.feature) for r in actual] == [(r.scope, r.feature) for r in expected]
    assert sum(r.suppressed_bins or 0 for r in expected) > 0  # the silos' own cell rule held back sparse tails
    for want, got in zip(expected, actual, strict=True):
        assert (got.count, got.silos_released, got.suppressed_bins) == (want.count, 3, want.suppressed_bins)
        assert got.histogram == want.histogram and got.edges == want.edges
        figures = [got.mean, want.mean, got.variance, want.variance]
        assert all(figure is not None for figure in figures)
        np.testing.assert_allclose(figures[0], figures[1], rtol=1e-6, err_msg=got.feature)  # type: ignore[arg-type]
        np.testing.assert_allclose(figures[2], figures[3], rtol=1e-5, err_msg=got.feature)  # type: ignore[arg-type]
        assert (got.minimum, got.maximum) == (None, None)  # extremes cannot be summed: never released
        assert want.minimum is not None

    # The coordinator's files: checkpoint 0 is the job's zeros; every later one is ciphertexts (the silos'
    # uploads are checked as ciphertexts on arrival and removed once added).
    directory = sqlite_coordinator.artifacts.root / "checkpoints" / encrypted.id
    kept = sorted(p.name for p in directory.iterdir())
    assert kept == ["public.ckks", "round-00000.safetensors", "round-00001.ckks", "round-00002.ckks"], kept
    assert read_ciphertext_header(directory / "round-00001.ckks").updates == 3
    assert read_ciphertext_header(directory / "round-00002.ckks").updates == 4  # round 1's sums and 3 releases
    for name in kept[2:]:  # safetensors of serialised ciphertexts (uint8 blobs), no float figure
        blobs = load_arrays(str(directory / name))
        assert blobs and all(blob.dtype == np.uint8 for blob in blobs.values())
        assert read_ciphertext_header(directory / name).fingerprint == secret.fingerprint

    capsys.readouterr()
    show = ["stats", "show", encrypted.id, "--coordinator", f"127.0.0.1:{sqlite_coordinator.port}", "--format", "json"]
    assert run_command(build_parser(), [*show, "--ckks-secret-context", str(keys / "secret.ckks")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["count"] == expected[0].count
    assert run_command(build_parser(), ["job", *show[1:5]]) == 0  # `job show`: no table, the way to decrypt it
    assert f"fedmeki stats show {encrypted.id} --ckks-secret-context secret.ckks" in capsys.readouterr().out


def test_the_minimum_cell_count_holds_on_the_decrypted_sums() -> None:
    spec = StatisticsSpec(features=("a", "b"), edges={"a": (0.0, 1.0, 2.0), "b": (0.0, 1.0)}, min_count=10)
    sums = initial(spec)
    sums["count"][:] = [25.0, 4.0]  # feature b: fewer rows than the minimum in all
    sums["total"][:] = [30.0, 2.0]
    sums["histogram"][:] = [[18.0, 7.0], [4.0, 0.0]]
    released = suppress_small_cells(spec, sums)
    assert released["histogram"].tolist() == [[18.0, 0.0], [0.0, 0.0]]
    assert released["suppressed_bins"].tolist() == [1.0, 0.0]
    assert released["count"].tolist() == [25.0, 0.0] and released["total"].tolist() == [30.0, 0.0]
    assert sums["histogram"][0, 1] == 7.0  # the decrypted figures are left as they were


def test_a_silo_with_more_rows_than_ckks_holds_declines(tmp_path: Path) -> None:
    write_key_files(tmp_path / "keys")
    secret = read_secret_context(tmp_path / "keys" / "secret.ckks")
    spec = StatisticsSpec(features=("a",), edges={"a": (0.0, 1.0)})
    figures = initial(spec)
    figures["count"][:] = MAX_ROWS + 1
    order = layout(spec)
    with (tmp_path / "release.safetensors").open("wb") as f:
        write_safetensors(f, order, (figures[tensor.name] for tensor in order))
    with pytest.raises(InvalidInputError, match=f"{MAX_ROWS + 1} rows; a CKKS statistics job takes at most"):
        encrypt_release(secret, spec, tmp_path / "release.safetensors", tmp_path / "release.ckks")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"edges": {}}, "statistics.edges"),
        ({"per_silo": True}, "statistics.per_silo"),
        ({"dp": {"epsilon": 1.0, "bounds": {"a": [0, 1]}}}, "statistics.dp"),
    ],
)
def test_a_ckks_statistics_job_is_refused_without_edges_per_silo_or_with_dp(
    options: dict[str, Any], field: str
) -> None:
    statistics = {"features": ["a"], "edges": {"a": [0, 1]}, **options}
    spec = {"name": "s", "task": "tabular", "min_silos": 3, "statistics": statistics}
    with pytest.raises(InvalidJobSpecError, match=field):
        parse_job_spec({**spec, "privacy": {"secure_aggregation": "ckks"}})
    with pytest.raises(InvalidJobSpecError, match="privacy"):
        parse_job_spec({**spec, "statistics": {"features": ["a"]}, "privacy": {"secure_aggregation": "cyclic"}})
