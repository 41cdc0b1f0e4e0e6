"""An evaluator silo: registered with the role evaluator and named by a job, it never trains, scores every committed
checkpoint on its own held-out data, and the rounds never wait for it (coordinator/evaluations.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from agents import TASK, running_agents, wait_until
from conftest import address, enroll
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import Silo, Update
from fedmeki_core.app.cli import build_parser
from fedmeki_core.client import FedmekiClient
from fedmeki_core.commands import run_command
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.proto.v1 import common_pb2, silo_pb2
from fedmeki_core.proto.v1.common_pb2 import ROUND_KIND_EVALUATE
from fedmeki_core.records import JobState, JobStatus, RoundKind, RoundState, SiloResult
from tests.silo_wire import RawSilo

_MODEL = {"config": {"hidden_size": 16}}


def _job(name: str, rounds: int, **evaluation: object) -> dict[str, object]:
    return {"name": name, "task": TASK, "rounds": rounds, "min_silos": 2, "model": _MODEL, "evaluation": evaluation}


def _scored(status: JobStatus) -> bool:
    return status.state.finished and all(e.state == RoundState.COMMITTED for e in status.evaluations)


def test_an_evaluator_scores_every_committed_round_and_never_trains(
    coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roles = ("trainer", "trainer", "evaluator")
    with (
        running_agents(coordinator, tmp_path, (120, 120, 150), roles=roles),
        FedmekiClient(address(coordinator)) as client,
    ):
        job = client.submit_job(parse_job_spec(_job("scored", 3, evaluator="silo-2")))
        wait_until(lambda: _scored(client.get_job(job.id)), 600, lambda: client.get_job(job.id))
        status = client.get_job(job.id)
    assert status.state == JobState.COMPLETED, status.reason
    assert [(e.number, e.kind, e.state) for e in status.evaluations] == [
        (n, RoundKind.EVALUATE, RoundState.COMMITTED) for n in (1, 2, 3)
    ]
    for evaluation in status.evaluations:
        (result,) = evaluation.silo_results
        assert (result.silo, result.num_samples) == ("silo-2", 30)  # its held-out fifth of 150 rows
        assert result.metrics["eval_accuracy.n"] == 30
        assert (
            result.metrics["eval_accuracy.lo"] <= result.metrics["eval_accuracy"] <= result.metrics["eval_accuracy.hi"]
        )
    for summary in status.rounds:  # the silos' own held-out scores, the evaluator never among them
        assert "silo-2" not in summary.selected_silos and "silo-2" not in summary.reported_silos
    with coordinator.database.read() as session:
        evaluator = session.scalars(select(Silo.id).where(Silo.name == "silo-2")).one()
        assert session.scalars(select(Update).where(Update.silo_id == evaluator)).first() is None  # no update

    target = ["--coordinator", address(coordinator)]
    assert run_command(build_parser(), ["job", "show", job.id, *target]) == 0
    shown = capsys.readouterr().out
    for number in (1, 2, 3):
        assert f"evaluator silo-2 on checkpoint   {number} scored  n=30 " in shown
    assert run_command(build_parser(), ["job", "report", job.id, *target]) == 0
    report = capsys.readouterr().out
    assert sum(" evaluator " in line and " silo-2 " in line for line in report.splitlines()) == 3


def test_the_rounds_do_not_wait_for_an_evaluator_that_is_away(coordinator: Coordinator, tmp_path: Path) -> None:
    raw = RawSilo(address(coordinator), enroll(coordinator, "raw", "evaluator"))  # an evaluator by its calls
    with FedmekiClient(address(coordinator)) as client:
        with running_agents(coordinator, tmp_path, (120, 120)):  # two trainers; the evaluator "away" never starts
            coordinator.registry.add("away", "evaluator")
            job = client.submit_job(parse_job_spec(_job("unscored", 2, evaluator="away", deadline_seconds=0.5)))
            declined = client.submit_job(parse_job_spec(_job("declined", 2, evaluator="raw")))
            ids = (job.id, declined.id)
            wait_until(lambda: all(client.get_job(i).state.finished for i in ids), 600, lambda: client.list_jobs([]))
        wait_until(
            lambda: all(e.state == RoundState.FAILED for e in client.get_job(job.id).evaluations),
            60,
            lambda: client.get_job(job.id).evaluations,
        )
        status = client.get_job(job.id)
        assert status.state == JobState.COMPLETED and [e.number for e in status.evaluations] == [1, 2]
        assert all(not e.silo_results for e in status.evaluations)  # missed: past its deadline, never scored

        # The evaluator is handed each committed checkpoint in order, after the job completed; one it cannot score
        # (its decline) is missed at once, not offered again until the deadline; a score is taken once.
        first = raw.poll()
        assert first is not None and (first.job_id, first.round, first.kind) == (declined.id, 1, ROUND_KIND_EVALUATE)
        download = silo_pb2.DownloadModelRequest(job_id=declined.id, round=first.checkpoint.round)
        assert first.checkpoint.round == 1 and raw.call("DownloadModel", download)
        raw.call("AbortRound", silo_pb2.AbortRoundRequest(job_id=declined.id, round=1, reason="no data for it"))
        second = raw.poll()
        assert second is not None and (second.job_id, second.round) == (declined.id, 2)
        score = silo_pb2.ReportEvaluationRequest(
            job_id=declined.id, round=2, num_samples=7, metrics=common_pb2.Metrics(values={"eval_accuracy": 0.5})
        )
        raw.call("ReportEvaluation", score)
        with pytest.raises(grpc.RpcError) as again:
            raw.call("ReportEvaluation", score)
        assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert raw.poll() is None
        scored = client.get_job(declined.id)
        assert [e.state for e in scored.evaluations] == [RoundState.FAILED, RoundState.COMMITTED]
        assert scored.evaluations[1].silo_results[0] == SiloResult("raw", 7, {"eval_accuracy": 0.5})
        assert scored.state == JobState.COMPLETED

        with pytest.raises(InvalidInputError, match="evaluation: silo 'silo-0' is a trainer; an evaluator is regist"):
            client.submit_job(parse_job_spec(_job("wrong", 1, evaluator="silo-0")))
        with pytest.raises(InvalidInputError, match="invalid job spec: evaluation: no silo named 'nobody'"):
            client.submit_job(parse_job_spec(_job("unknown", 1, evaluator="nobody")))
    with pytest.raises(InvalidJobSpecError, match="an evaluator scores plaintext checkpoints; ckks encrypts them"):
        parse_job_spec({**_job("he", 1, evaluator="away"), "min_silos": 3, "privacy": {"secure_aggregation": "ckks"}})
