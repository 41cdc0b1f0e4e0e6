"""A job's per-task table: the federated model and the injected foundation model, first round against last.

"federated": the job's own model (the encoders with their heads, or in the federated-injection mode the
injection model answering in text), scored by the silos on their held-out data (round 1's silos evaluate
checkpoint 0 before training; the final evaluation round scores the last checkpoint). Injected-model scores come
from the injector's test data (injection 0 is the untrained baseline on checkpoint 0; the last injection uses the
final encoders).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmeki_core.records import JobStatus, RoundKind, RoundState, RoundSummary
from fedmeki_core.tasks import SUITES, get_task


@dataclass(frozen=True)
class TaskRow:
    task: str
    modality: str
    role: str
    metric: str
    federated: tuple[float | None, float | None]  # (round 0, last round)
    injected: tuple[float | None, float | None]  # (injection 0, last injection)
    injected_rounds: tuple[int, int] | None  # which checkpoints the injected columns come from


def task_report(job: JobStatus) -> list[TaskRow]:
    names = SUITES[job.spec.task].tasks if job.spec.task in SUITES else (job.spec.task,)
    several = len(names) > 1
    committed = [r for r in job.rounds if r.state == RoundState.COMMITTED]
    first_train = next((r for r in committed if r.kind == RoundKind.TRAIN), None)
    final = next((r for r in reversed(committed) if r.kind == RoundKind.EVALUATE), None)
    injections = [r for r in job.injections if r.state == RoundState.COMMITTED]
    first_injection, last_injection = (injections[0], injections[-1]) if injections else (None, None)
    rows = []
    for name in names:
        info = get_task(name)
        encoder_key = f"{name}.eval_{info.metric}" if several else f"eval_{info.metric}"
        rows.append(
            TaskRow(
                task=name,
                modality=str(info.modality),
                role=str(info.role),
                metric=info.metric,
                federated=(_metric(first_train, encoder_key), _metric(final, encoder_key)),
                injected=(
                    _metric(first_injection, f"{name}.{info.metric}"),
                    _metric(last_injection, f"{name}.{info.metric}"),
                ),
                injected_rounds=(first_injection.number, last_injection.number)
                if first_injection and last_injection
                else None,
            )
        )
    return rows


def _metric(summary: RoundSummary | None, key: str) -> float | None:
    return None if summary is None else summary.metrics.get(key)


def format_report(job: JobStatus) -> str:
    rows = task_report(job)
    lines = [
        f"job {job.id} ({job.spec.name}): {job.state.value}, task {job.spec.task}, {job.spec.rounds} rounds",
        f"{'task':<28} {'modality':<9} {'role':<10} {'metric':<9} {'federated r0 -> last':<22} injected r0 -> last",
    ]
    for row in rows:
        columns = f"{row.task:<28} {row.modality:<9} {row.role:<10} {row.metric:<9}"
        lines.append(f"{columns} {_pair(row.federated):<22} {_pair(row.injected)}")
    injected = next((row.injected_rounds for row in rows if row.injected_rounds), None)
    if injected is not None:
        lines.append(
            f"(injected: checkpoints {injected[0]} and {injected[1]}; '-' where a stage does not score a task)"
        )
    return "\n".join(lines)


def _pair(values: tuple[float | None, float | None]) -> str:
    first, last = values
    if first is None and last is None:
        return "-"
    return f"{_number(first)} -> {_number(last)}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
