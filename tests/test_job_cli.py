"""The researcher's `fedmeki job …` commands against a real coordinator."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from coordinator.server import Coordinator
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.app.job_view import follow
from fedmeki_core.client import FedmekiClient
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, JobStatus, RoundKind, RoundState, RoundSummary
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo


def test_submit_list_show_download_cancel_watch(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    RawSilo(address(sqlite_coordinator), enroll(sqlite_coordinator, "a")).poll()
    target = ["--coordinator", address(sqlite_coordinator)]
    spec = tmp_path / "job.yaml"
    spec.write_text("name: cli-job\ntask: synthetic-vitals\nrounds: 2\nmodel: {config: {hidden_size: 16}}\n")
    assert fedmeki_main(["job", "submit", str(spec), *target]) == 0
    match = re.search(r"submitted job (\w+) \(cli-job\)", capsys.readouterr().out)
    assert match
    job_id = match.group(1)

    assert fedmeki_main(["job", "list", *target]) == 0
    assert re.search(rf"{job_id}\s+cli-job\s+(pending|running)", capsys.readouterr().out)
    assert fedmeki_main(["job", "show", job_id, *target]) == 0
    shown = capsys.readouterr().out
    assert "task: synthetic-vitals" in shown and "latest checkpoint: round 0" in shown

    output = tmp_path / "initial.safetensors"
    assert fedmeki_main(["job", "download", job_id, "-o", str(output), *target]) == 0
    assert "checkpoint of round 0" in capsys.readouterr().out
    stored = sqlite_coordinator.artifacts.checkpoint_path(job_id, 0)
    assert sha256_file(output) == sha256_file(stored)
    assert load_file(str(output))["encoder.encoder.layer.0.attention.self.query.weight"].shape == (16, 16)

    assert fedmeki_main(["job", "cancel", job_id, "--reason", "typo in spec", *target]) == 0
    assert f"job {job_id}: cancelled" in capsys.readouterr().out
    assert fedmeki_main(["job", "watch", job_id, *target]) == 1  # ended, but not completed
    assert "cancelled: typo in spec" in capsys.readouterr().out
    assert fedmeki_main(["job", "list", "--state", "completed", *target]) == 0
    assert job_id not in capsys.readouterr().out


def test_errors_are_one_clear_line(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--coordinator", address(sqlite_coordinator)]
    assert fedmeki_main(["job", "show", "no-such-job", *target]) == 2
    assert capsys.readouterr().err.strip() == "fedmeki: no job 'no-such-job'"
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\ntask: synthetic-vitals\nrounds: 1\nmin_silos: 4\n")
    assert fedmeki_main(["job", "submit", str(spec), *target]) == 2
    assert "invalid job spec: min_silos: 4 is more than the 0 enrolled silos" in capsys.readouterr().err
    assert fedmeki_main(["job", "list", "--coordinator", "127.0.0.1:1"]) == 2
    assert "fedmeki: nothing answers at 127.0.0.1:1: check the address" in capsys.readouterr().err


def test_a_job_waiting_for_silos_says_how_many_are_eligible_which_and_until_when(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`job show` names the eligible silos of a waiting round; a watcher gets a snapshot each time they change."""
    target = address(sqlite_coordinator)
    a, b, c = (RawSilo(target, enroll(sqlite_coordinator, name)) for name in "abc")
    b.poll()  # a and c are enrolled but not polling yet
    RawSilo(target, enroll(sqlite_coordinator, "d")).poll()  # live, but the job does not name it
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: w\ntask: synthetic-vitals\nrounds: 1\nmin_silos: 3\nsilos: [a, b, c]\nround_deadline_seconds: 90\n"
    )
    assert fedmeki_main(["job", "submit", str(spec), "--coordinator", target]) == 0
    job_id = capsys.readouterr().out.split()[2]
    assert fedmeki_main(["job", "show", job_id, "--coordinator", target]) == 0
    shown = capsys.readouterr().out
    waiting = (
        "round 1 is waiting for silos: 1 eligible of the 3 it needs (b; eligible: enrolled, not revoked, polling, "
        "with data for synthetic-vitals among a, b, c); it fails at "
    )
    assert waiting in shown, shown
    with FedmekiClient(target) as client:
        events = client.watch_job(job_id)
        first = next(events)
        assert isinstance(first, JobStatus) and first.rounds[-1].eligible_silos == ("b",)
        a.poll()  # one more eligible silo, still one short: the open round and a snapshot that says so
        changed = [next(events) for _ in range(2)]
        assert isinstance(changed[1], JobStatus) and changed[1].rounds[-1].eligible_silos == ("a", "b"), changed
        c.poll()  # enough: the round selects them
        selected = next(events)
        events.close()
    assert isinstance(selected, RoundSummary) and selected.state == RoundState.TRAINING, selected
    assert selected.selected_silos == ("a", "b", "c")


def test_watch_prints_what_a_waiting_round_waits_for_each_time_it_changes(capsys: pytest.CaptureFixture[str]) -> None:
    spec = parse_job_spec({"name": "w", "task": "synthetic-vitals", "rounds": 1, "min_silos": 2})
    opened = datetime.now(UTC)

    def waiting(*eligible: str) -> JobStatus:
        open_round = RoundSummary(1, RoundKind.TRAIN, RoundState.OPEN, opened_at=opened, eligible_silos=eligible)
        return JobStatus("j", spec, JobState.RUNNING, "", 1, (open_round,), opened, opened, None)

    follow([waiting(), waiting("b"), waiting("b"), waiting("a", "b")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "waiting" in line]
    assert [line.split(" (")[0] for line in lines] == [
        "round 1 is waiting for silos: 0 eligible of the 2 it needs",
        "round 1 is waiting for silos: 1 eligible of the 2 it needs",
    ]  # two eligible: the round is selected at once, nothing to wait for


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ("{hidden_size: 1000000}", "invalid job spec: model.config.hidden_size: must lie in [1, 8192]"),
        ("{dropout: 2.0}", "invalid job spec: model.config.dropout: must lie in [0, 1)"),
        ("{num_heads: 3}", "invalid job spec: model.config.num_heads: 3 does not divide hidden_size 32"),
        (  # within the spec's bounds (1.34e9 parameters), over what the client builds: counted on the meta device
            "{hidden_size: 8192, num_layers: 1, num_heads: 64, intermediate_size: 65536}",
            "model: its 1,342,570,498 parameters (5.0 GiB of float32) are over the 250,000,000 this client builds",
        ),
    ],
)
def test_a_model_no_one_could_build_is_one_clear_line(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, text: str
) -> None:
    """Refused before the client builds anything (1,000,000 wide would be 4 TB), in one line, nothing sent."""
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: x\ntask: synthetic-vitals\nrounds: 1\nmodel: {{config: {config}}}\n")
    assert fedmeki_main(["job", "submit", str(spec), "--coordinator", address(sqlite_coordinator)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmeki: ") and text in err and len(err.strip().splitlines()) == 1, err


def test_initial_weights_must_match_the_specs_model(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from fedmeki_core.jobspec import parse_job_spec
    from fedmeki_core.models.build import build_job_model, initial_tensors

    RawSilo(address(sqlite_coordinator), enroll(sqlite_coordinator, "a")).poll()
    spec = tmp_path / "job.yaml"
    spec.write_text("name: w\ntask: synthetic-vitals\nrounds: 1\n")
    parsed = parse_job_spec({"name": "w", "task": "synthetic-vitals", "rounds": 1})
    good = {name: tensor.numpy() for name, tensor in initial_tensors(parsed, build_job_model(parsed)).items()}
    renamed = {("renamed" if name == "head.bias" else name): value for name, value in good.items()}
    reshaped = {**good, "head.bias": np.zeros(7, np.float32)}
    extra = {**good, "extra": np.zeros(2, np.float32)}
    integers = {**good, "head.bias": np.zeros(2, np.int32)}
    target = ["--coordinator", address(sqlite_coordinator)]
    for tensors, text in [
        (renamed, "tensor 'head.bias' of tiny-transformer is missing"),
        (reshaped, "tensor 'head.bias' has shape [7], the spec's model has [2]"),
        (extra, "tensor 'extra' is not one tiny-transformer exchanges"),
        (integers, "tensor 'head.bias' is I32, the model's is F32"),
    ]:
        path = tmp_path / "weights.safetensors"
        save_file(tensors, str(path))
        assert fedmeki_main(["job", "submit", str(spec), "--weights", str(path), *target]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedmeki: invalid job spec: model: ") and text in err and "\n" not in err, err
    assert fedmeki_main(["job", "list", *target]) == 0 and " w " not in capsys.readouterr().out  # nothing sent
    save_file(good, str(tmp_path / "good.safetensors"))
    assert fedmeki_main(["job", "submit", str(spec), "--weights", str(tmp_path / "good.safetensors"), *target]) == 0


def test_a_submission_sent_again_with_its_request_id_is_the_same_job(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A researcher whose first `job submit` lost its answer runs it again with the same --request-id.
    RawSilo(address(sqlite_coordinator), enroll(sqlite_coordinator, "a")).poll()
    target = ["--coordinator", address(sqlite_coordinator), "--request-id", "nightly-2026-12-06"]
    spec = tmp_path / "job.yaml"
    spec.write_text("name: again\ntask: synthetic-vitals\nrounds: 1\nmodel: {config: {hidden_size: 16}}\n")
    assert fedmeki_main(["job", "submit", str(spec), *target]) == 0
    assert fedmeki_main(["job", "submit", str(spec), *target]) == 0
    first, second = re.findall(r"submitted job (\w+) \(again\)", capsys.readouterr().out)
    assert first == second
    spec.write_text("name: other\ntask: synthetic-vitals\nrounds: 1\nmodel: {config: {hidden_size: 16}}\n")
    assert fedmeki_main(["job", "submit", str(spec), *target]) == 2
    assert f"request id 'nightly-2026-12-06' was already used for job {first}" in capsys.readouterr().err
