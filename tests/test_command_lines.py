"""What the three command lines share: `--log-level`/`--log-format` anywhere on the line, no traceback when the
reader of their output leaves, gRPC's C-core log lines kept off stderr, and `job watch` surviving a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.cli import main as coordinator_main
from coordinator.settings import default_sqlite_url
from coordinator.silos import SiloRegistry
from coordinator.store.database import Database
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.app.job_view import follow
from fedmeki_core.app.provision import provision
from fedmeki_core.client import FedmekiClient
from fedmeki_core.commands import global_options_first
from fedmeki_core.grpc_logs import quiet_grpc_core
from fedmeki_core.records import RoundKind, RoundState, RoundSummary
from silo_agent.cli import main as silo_main
from tests.agents import wait_until
from tests.silo_wire import job_spec, submit_raw, weights_bytes
from tests.topology import coordinator_process


def _command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def test_global_options_move_to_the_front_from_anywhere_before_a_double_dash() -> None:
    line = ["job", "list", "--log-level", "DEBUG", "--log-format=json", "--", "--log-level", "X"]
    assert global_options_first(line) == ["--log-level", "DEBUG", "--log-format=json", "job", "list", "--", *line[-2:]]


def test_every_command_line_takes_the_logging_options_after_its_subcommand(tmp_path: Path) -> None:
    logging_options = ["--log-format", "json", "--log-level", "DEBUG"]
    assert fedmeki_main(["algorithms", *logging_options]) == 0
    assert coordinator_main(["silo", "list", "--data-dir", str(tmp_path / "co"), *logging_options]) == 0
    assert silo_main(["status", "--work-dir", str(tmp_path / "silo"), "--log-level=WARNING"]) == 0


def test_a_reader_that_leaves_gets_no_traceback(tmp_path: Path) -> None:
    with (tmp_path / "err").open("wb") as stderr:
        process = subprocess.Popen(_command("fedmeki_core", "tasks"), stdout=subprocess.PIPE, stderr=stderr)
    assert process.stdout is not None
    process.stdout.close()  # as `| head` does, before the command writes its first line
    assert process.wait(timeout=120) == 141
    assert (tmp_path / "err").read_text() == ""


def test_grpc_core_lines_stay_off_json_logs_and_the_researchers_output(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(kits, "127.0.0.1", silos=["a"], researchers=["alice"])
    env = {key: value for key, value in os.environ.items() if not key.startswith("GRPC_")}
    serve = ["--data-dir", str(tmp_path / "co"), "--kit", str(kits / "coordinator"), "--log-format", "json"]
    with coordinator_process(tmp_path / "co", serve, env=env) as coordinator:
        plaintext = subprocess.run(  # a plaintext call to an mTLS coordinator: a failed handshake on both sides
            _command("fedmeki_core", "job", "list", "--coordinator", coordinator.address),
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert plaintext.returncode == 2
        assert "Handshake" not in plaintext.stderr and "ssl_transport_security" not in plaintext.stderr
    lines = coordinator.stderr.read_text().splitlines()
    assert lines, "the coordinator logged nothing"
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_job_watch_reconnects_after_a_coordinator_restart_and_ends_with_the_job(tmp_path: Path) -> None:
    serve = ["--data-dir", str(tmp_path / "co")]
    out, err = tmp_path / "watch.out", tmp_path / "watch.err"
    with coordinator_process(tmp_path / "co", serve) as first:
        address = first.address
        database = Database(default_sqlite_url(tmp_path / "co"))
        registry = SiloRegistry(database)
        registry.enroll(registry.add("a")[1])  # a job needs an enrolled silo; none polls, so it waits
        database.dispose()
        job_id = submit_raw(address, job_spec(), weights_bytes()).id
        with out.open("wb") as stdout, err.open("wb") as stderr:
            watch = subprocess.Popen(
                _command("fedmeki_core", "job", "watch", job_id, "--coordinator", address),
                stdout=stdout,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wait_until(lambda: "running" in out.read_text(), 60, lambda: out.read_text() + err.read_text())
    try:
        time.sleep(1.0)  # the watch is now retrying against a closed port
        assert watch.poll() is None, out.read_text() + err.read_text()
        with coordinator_process(tmp_path / "co", [*serve, "--address", address]):
            wait_until(lambda: "reconnecting" in err.read_text(), 30, err.read_text)
            with FedmekiClient(address) as client:
                client.cancel_job(job_id, "the test is done")
            assert watch.wait(timeout=60) == 1  # the job ended, cancelled: not completed
    finally:
        if watch.poll() is None:
            watch.kill()
    lines = out.read_text().splitlines()
    assert lines[0] == f"job {job_id} (test): running", lines
    assert lines[-1] == f"job {job_id} (test): cancelled: the test is done", lines


@pytest.mark.parametrize(
    ("argv", "silent", "environment", "verbosity"),
    [
        (["serve"], False, {}, "ERROR"),
        (["serve", "--log-format", "json"], False, {}, "NONE"),
        (["serve"], False, {"FEDMEKI_LOG_FORMAT": "json"}, "NONE"),
        (["job", "list"], True, {}, "NONE"),
        (["job", "list"], True, {"GRPC_VERBOSITY": "DEBUG"}, "DEBUG"),  # an operator debugging the transport
        (["serve"], False, {"GRPC_TRACE": "tcp"}, None),
    ],
)
def test_grpc_core_verbosity_follows_the_log_format_unless_set(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], silent: bool, environment: dict[str, str], verbosity: str | None
) -> None:
    for name in ("GRPC_VERBOSITY", "GRPC_TRACE", "FEDMEKI_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    quiet_grpc_core(argv, silent=silent)
    assert os.environ.get("GRPC_VERBOSITY") == verbosity


def test_a_committed_round_that_comes_again_is_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    evaluate = RoundSummary(4, RoundKind.EVALUATE, RoundState.COMMITTED, metrics={"eval_accuracy": 0.7})
    train = RoundSummary(4, RoundKind.TRAIN, RoundState.COMMITTED, metrics={"eval_accuracy": 0.6})
    follow([train, evaluate, evaluate])  # the evaluate round's summary comes again when the injections end
    assert capsys.readouterr().out.splitlines() == [
        "round 4 (train) committed: eval_accuracy=0.6000",
        "round 4 (evaluate) committed: eval_accuracy=0.7000",
    ]
