"""What a person following a job reads: a line per event of its stream, and the job's status as a block."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from fedmeki_core.records import (
    JobEvent,
    JobState,
    JobStatus,
    RoundKind,
    RoundState,
    RoundSummary,
    UpdateAccepted,
    UploadProgress,
)

_HEADLINE = ("accuracy", "bleu1", "dice", "train_loss", "injection_loss", "dp_epsilon")


def metrics_line(values: dict[str, float]) -> str:
    """Every metric; of a suite's many per-task ones only the headline of each (`job report` has the table)."""
    if len(values) > 8:
        values = {k: v for k, v in values.items() if k.rsplit(".", 1)[-1].removeprefix("eval_") in _HEADLINE}
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())) or "-"


def render_event(event: JobEvent, previous: JobStatus | None) -> str | None:
    """A line for a person following a job, or None when the event adds nothing worth a line."""
    if isinstance(event, JobStatus):
        if previous is not None and previous.state == event.state:
            return None
        line = f"job {event.id} ({event.spec.name}): {event.state.value}"
        return f"{line}: {event.reason}" if event.reason else line
    if isinstance(event, RoundSummary):
        if event.state == RoundState.TRAINING:
            return f"round {event.number} ({event.kind.value}): selected {', '.join(event.selected_silos)}"
        if event.state == RoundState.COMMITTED:
            return f"round {event.number} ({event.kind.value}) committed: {metrics_line(event.metrics)}"
        if event.state == RoundState.FAILED:
            return f"round {event.number} failed"
        return None
    if isinstance(event, UploadProgress):
        percent = 100 * event.received_bytes / max(event.total_bytes, 1)
        return f"round {event.round}: {event.silo} upload {event.received_bytes}/{event.total_bytes} B ({percent:.0f}%)"
    if isinstance(event, UpdateAccepted):
        return f"round {event.round}: {event.silo} reported ({event.num_samples} samples) {metrics_line(event.metrics)}"
    return None


def waiting_for_silos(job: JobStatus, at_least_seconds: float = 0.0) -> str | None:
    """What a job's open round waits for: how many silos are eligible now (enrolled, not revoked, polling, holding
    the job's data) and which, against min_silos, and when the round fails if too few are. None when no round
    waits, or when enough are eligible (the round is selected at the coordinator's next look) and it has waited
    less than `at_least_seconds`."""
    if job.state != JobState.RUNNING or not job.rounds or job.rounds[-1].state != RoundState.OPEN:
        return None
    waiting = job.rounds[-1]
    opened, eligible = waiting.opened_at, waiting.eligible_silos
    if opened is None:
        return None
    if len(eligible) >= job.spec.min_silos and datetime.now(UTC) - opened < timedelta(seconds=at_least_seconds):
        return None
    among = f" among {', '.join(job.spec.silos)}" if job.spec.silos else ""
    until = opened + timedelta(seconds=job.spec.round_deadline_seconds)
    return (
        f"round {waiting.number} is waiting for silos: {len(eligible)} eligible of the {job.spec.min_silos} it needs"
        f" ({', '.join(eligible) or 'none'}; eligible: enrolled, not revoked, polling, with data for "
        f"{job.spec.task}{among}); it fails at {until:%Y-%m-%d %H:%M:%S} UTC if too few are"
    )


def follow(events: Iterable[JobEvent]) -> JobStatus | None:
    """Print the events of a job until it ends; returns its final status. A snapshot after a reconnection
    (FedmekiClient.watch_job) prints the rounds committed while the stream was down; a committed round's summary
    that comes again (the evaluate round's, when the injections end) is not printed twice."""
    status: JobStatus | None = None
    committed: set[tuple[int, RoundKind]] = set()
    waited = ""  # the waiting line printed last; a snapshot comes each time the eligible silos change
    for event in events:
        missed: list[JobEvent] = []
        if isinstance(event, JobStatus) and status is not None:
            missed = [r for r in event.rounds if r.state == RoundState.COMMITTED]
        for item in [*missed, event]:
            if isinstance(item, RoundSummary) and item.state == RoundState.COMMITTED:
                if (item.number, item.kind) in committed:
                    continue
                committed.add((item.number, item.kind))
            line = render_event(item, status)
            if line:
                print(line, flush=True)
            if isinstance(item, JobStatus) and (waiting := waiting_for_silos(item, 5.0)) and waiting != waited:
                print(waiting, flush=True)  # a job that waits for silos says for which, not silence
                waited = waiting
        if isinstance(event, JobStatus):
            status = event
    return status


def print_job(job: JobStatus) -> None:
    print(f"job {job.id}  {job.spec.name}")
    print(f"  state: {job.state.value}{' (' + job.reason + ')' if job.reason else ''}")
    statistics = job.spec.statistics
    if statistics is None:
        work = f"algorithm: {job.spec.algorithm.name}"
    else:  # a statistics job trains nothing: say what it computes instead of the default algorithm
        dp = f", DP epsilon {statistics.dp.epsilon:g}" if statistics.dp is not None else ""
        work = f"statistics: {len(statistics.features)} features, minimum cell count {statistics.min_count}{dp}"
    print(f"  task: {job.spec.task}  {work}  rounds: {job.current_round}/{job.spec.rounds}")
    for r in job.rounds:
        print(
            f"  round {r.number:>3} {r.kind.value:<8} {r.state.value:<11} "
            f"silos {len(r.reported_silos)}/{len(r.selected_silos)}  {metrics_line(r.metrics)}"
        )
    if waiting := waiting_for_silos(job):
        print(f"  {waiting}")
    for r in job.injections:
        state = {RoundState.TRAINING: "pending", RoundState.COMMITTED: "done"}.get(r.state, r.state.value)
        print(f"  injection of checkpoint {r.number:>3} {state:<8} {metrics_line(r.metrics)}")
    if job.injections:
        print("  (headline metrics; `fedmeki job report` prints the per-task table)")
    for r in job.evaluations:  # the evaluator's held-out set, apart from the silos' own held-out scores above
        state = {RoundState.TRAINING: "pending", RoundState.COMMITTED: "scored", RoundState.FAILED: "missed"}[r.state]
        samples = f"n={r.silo_results[0].num_samples} " if r.silo_results else ""
        scores = f"{samples}{metrics_line(r.metrics)}"
        print(f"  evaluator {r.selected_silos[0]} on checkpoint {r.number:>3} {state:<7} {scores}")
    if job.latest_checkpoint:
        print(
            f"  latest checkpoint: round {job.latest_checkpoint.round}, {job.latest_checkpoint.size_bytes} B, "
            f"sha256 {job.latest_checkpoint.sha256[:16]}…"
        )
